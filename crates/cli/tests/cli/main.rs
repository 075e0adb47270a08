//! The `ferry` binary's integration tests: real `ferry` processes (`env!("CARGO_BIN_EXE_ferry")`) against real
//! redis-server and PostgreSQL (ferry-testkit), one module per area: the command line (`cli`), each role and
//! `ferry dev` end to end, the in-process cluster harness (`harness`), shutdown, faults and partitions, the durable record, scale-out, OpenTelemetry export,
//! the OpenAPI fuzzer, the TypeScript client's node suites (`ts_client`), the web dashboard in headless Chromium (`dashboard`), and the deployment artefacts (`container`, `deploy`, `k8s`, `proxies`, `terraform`,
//! `topology`). `support` holds what they share (spawned processes, waits, tokens, broker helpers), and
//! `support::manifests` what the deployment checks share.
//!
//! One test binary for the crate, so its dependencies link once rather than once per file.

mod autoscale;
mod balancer;
mod cli;
mod cluster;
mod container;
mod dashboard;
mod deploy;
mod dev;
mod fault_suite;
mod faults;
mod harness;
mod k8s;
mod logs;
mod openapi_fuzz;
mod otlp;
mod partition;
mod proxies;
mod reconcile;
mod record;
mod redis_cluster;
mod scale_out;
mod shutdown;
mod support;
mod terraform;
mod tls_deps;
mod topology;
mod ts_client;
