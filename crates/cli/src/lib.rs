//! The `ferry` binary's logic: parse flags and `FERRY_*` variables ([`args`]), validate them into typed
//! configuration, connect, wire the role crates and wait. Subcommands: [`dev`], [`gateway`], [`worker`],
//! [`enqueue`], [`token`], [`autoscaler`], [`balancer`] and `migrate` ([`store`]).
//!
//! Exit codes follow sysexits: 0 success, 64 bad input (checked before anything connects), 69 a broker that
//! cannot be reached, 70 an internal error. This crate must not hold job logic of its own: it only parses,
//! validates, wires and waits; whatever a test or `ferry dev` would need lives in the role crates.

pub mod args;
pub mod autoscaler;
pub mod balancer;
pub mod config;
#[cfg(test)]
mod defaults;
pub mod dev;
pub mod enqueue;
pub mod gateway;
pub mod store;
pub mod token;
pub mod worker;

use std::process::ExitCode;

pub use args::Cli;

/// EX_USAGE: the command was used incorrectly (bad flag, bad value).
pub const EXIT_USAGE: u8 = 64;
/// EX_UNAVAILABLE: a service the command needs (Redis) cannot be reached.
pub const EXIT_UNAVAILABLE: u8 = 69;
/// EX_SOFTWARE: an internal error.
pub const EXIT_SOFTWARE: u8 = ferry_telemetry::runner::EXIT_SOFTWARE;

/// Why a command failed, which decides the exit code.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Bad input; the message names the flag, e.g. `invalid --payload: expected JSON: …`.
    #[error("{0}")]
    Usage(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl CliError {
    pub fn usage(flag: &str, message: impl std::fmt::Display) -> Self {
        Self::Usage(format!("invalid {flag}: {message}"))
    }

    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Usage(_) => EXIT_USAGE,
            Self::Unavailable(_) => EXIT_UNAVAILABLE,
            Self::Internal(_) => EXIT_SOFTWARE,
        }
    }
}

/// Parse the process arguments; a parse error is printed and exits 64 (help and version exit 0).
pub fn parse_args() -> Result<Cli, ExitCode> {
    use clap::error::ErrorKind;
    config::parse(std::env::args_os().collect()).map_err(|e| match e {
        config::ParseError::Config(e) => {
            eprintln!("ferry: {e}");
            ExitCode::from(e.exit_code())
        }
        config::ParseError::Args(e) => {
            let _ = e.print();
            match e.kind() {
                ErrorKind::DisplayHelp
                | ErrorKind::DisplayVersion
                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => ExitCode::SUCCESS,
                _ => ExitCode::from(EXIT_USAGE),
            }
        }
    })
}

/// Run a parsed command to completion and map the outcome to an exit code.
pub fn run(cli: Cli) -> ExitCode {
    let telemetry = Telemetry::of(&cli);
    let result = match cli.command {
        args::Command::Dev(a) => {
            dev::resolve(a).and_then(|cfg| telemetry.serve("dev", dev::run(cfg)))
        }
        args::Command::Gateway(a) => {
            gateway::resolve(a).and_then(|cfg| telemetry.serve("gateway", gateway::run(cfg)))
        }
        args::Command::Token(a) => {
            token::resolve(a).and_then(|(secret, claims)| token::run(&secret, &claims))
        }
        args::Command::Worker(a) => {
            worker::resolve(a).and_then(|cfg| telemetry.serve("worker", worker::run(cfg)))
        }
        args::Command::Enqueue(a) => {
            enqueue::resolve(a).and_then(|cfg| telemetry.serve("enqueue", enqueue::run(cfg)))
        }
        args::Command::CheckConfig(a) => match config::check(cli.config.as_deref(), a.role) {
            Ok(text) => {
                print!("{text}");
                Ok(())
            }
            Err(e) => Err(e),
        },
        args::Command::Autoscaler(a) => autoscaler::resolve(a)
            .and_then(|cfg| telemetry.serve("autoscaler", autoscaler::run(cfg))),
        args::Command::Balancer(a) => {
            balancer::resolve(a).and_then(|cfg| telemetry.serve("balancer", balancer::run(cfg)))
        }
        args::Command::Migrate(a) => store::resolve_migrate(a.database)
            .and_then(|cfg| telemetry.serve("migrate", store::run_migrate(cfg))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

/// The process-wide logging and tracing settings: `--log-format`, `--log`, `--otlp-endpoint`,
/// `--otlp-service-name`.
#[derive(Debug, Clone)]
struct Telemetry {
    json: bool,
    log: Option<String>,
    otlp_endpoint: Option<String>,
    otlp_service_name: Option<String>,
}

impl Telemetry {
    fn of(cli: &Cli) -> Self {
        let set = |v: &Option<String>| {
            v.as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .map(str::to_owned)
        };
        Self {
            json: cli.log_format == args::LogFormat::Json,
            log: set(&cli.log),
            otlp_endpoint: set(&cli.otlp_endpoint),
            otlp_service_name: set(&cli.otlp_service_name),
        }
    }

    /// The log filter: `--log` / `FERRY_LOG` (or the file's `log`), else `RUST_LOG`, else `info`. A bad one
    /// names where it came from.
    fn filter(&self) -> Result<ferry_telemetry::EnvFilter, CliError> {
        let (value, source) = match &self.log {
            Some(v) => (v.clone(), "--log (FERRY_LOG)"),
            None => match std::env::var("RUST_LOG") {
                Ok(v) if !v.trim().is_empty() => (v, "RUST_LOG"),
                _ => (ferry_telemetry::DEFAULT_LOG_FILTER.to_owned(), "--log"),
            },
        };
        ferry_telemetry::parse_filter(&value, source).map_err(|e| CliError::Usage(e.to_string()))
    }

    /// Span export for `role`, when `--otlp-endpoint` is set (checked here, before anything starts).
    fn otlp(&self, role: &str) -> Result<Option<ferry_telemetry::OtlpConfig>, CliError> {
        let Some(endpoint) = &self.otlp_endpoint else {
            return Ok(None);
        };
        ferry_telemetry::otlp::traces_url(endpoint)
            .map_err(|e| CliError::usage("--otlp-endpoint (FERRY_OTLP_ENDPOINT)", e))?;
        Ok(Some(ferry_telemetry::OtlpConfig {
            endpoint: endpoint.clone(),
            service_name: self
                .otlp_service_name
                .clone()
                .unwrap_or_else(|| format!("ferry-{role}")),
            service_version: env!("CARGO_PKG_VERSION").to_owned(),
        }))
    }

    /// Check the settings, start the runtime, install the subscriber (and the exporter) and run `work` to
    /// completion; then send the spans still queued (at most 5 s) before the runtime goes.
    fn serve(
        &self,
        role: &str,
        work: impl std::future::Future<Output = Result<(), CliError>>,
    ) -> Result<(), CliError> {
        let filter = self.filter()?;
        let otlp = self.otlp(role)?;
        let rt = runtime()?;
        let guard = ferry_telemetry::install_tracing(
            self.json,
            filter,
            otlp.as_ref().map(|c| (c, rt.handle().clone())),
        )
        .map_err(|e| match e {
            ferry_telemetry::TelemetryError::InvalidFilter { .. } => CliError::Usage(e.to_string()),
            other => CliError::Internal(other.to_string()),
        })?;
        if let Some(c) = &otlp {
            tracing::info!(endpoint = %c.endpoint, service = %c.service_name, "exporting spans over OTLP/HTTP");
        }
        let result = rt.block_on(work);
        guard.shutdown();
        result
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, CliError> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Internal(format!("cannot start the async runtime: {e}")))
}

/// The checked URLs of `--redis` or `--redis-cluster`, whichever is given (clap lets only one through).
pub(crate) fn redis_urls(a: &args::RedisArgs) -> Result<Vec<String>, CliError> {
    if a.redis_cluster.is_empty() {
        return check_redis_urls(&a.redis);
    }
    check_urls("--redis-cluster", &a.redis_cluster)
}

/// Check `--redis` URLs without connecting: the engine speaks `redis://` (and `rediss://` for TLS).
pub(crate) fn check_redis_urls(urls: &[String]) -> Result<Vec<String>, CliError> {
    check_urls("--redis", urls)
}

fn check_urls(flag: &str, urls: &[String]) -> Result<Vec<String>, CliError> {
    let urls: Vec<String> = urls
        .iter()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty())
        .collect();
    if urls.is_empty() {
        return Err(CliError::usage(flag, "at least one URL is required"));
    }
    for u in &urls {
        let Some((scheme, rest)) = u.split_once("://") else {
            return Err(CliError::usage(
                "--redis",
                format!("expected redis://host:port[/db], got {u:?}"),
            ));
        };
        if !matches!(scheme, "redis" | "rediss") || rest.is_empty() {
            return Err(CliError::usage(
                "--redis",
                format!("expected redis://host:port[/db], got {u:?}"),
            ));
        }
    }
    let mut seen = std::collections::HashSet::new();
    if let Some(dup) = urls.iter().find(|u| !seen.insert(*u)) {
        return Err(CliError::usage(flag, format!("{dup} is listed twice")));
    }
    Ok(urls)
}

/// The process runner (signals, deadline, registry) for a role whose shutdown may take up to `deadline`.
pub(crate) fn runner(
    deadline: std::time::Duration,
) -> Result<ferry_telemetry::runner::Runner, CliError> {
    ferry_telemetry::runner::Runner::new(deadline).map_err(|e| CliError::Internal(e.to_string()))
}

/// `--admin-listen`: HOST:PORT, or `off` for no listener.
pub(crate) fn admin_listen(value: &str) -> Result<Option<std::net::SocketAddr>, CliError> {
    match value.trim() {
        "off" => Ok(None),
        addr => addr.parse().map(Some).map_err(|_| {
            CliError::usage(
                "--admin-listen",
                format!("expected HOST:PORT or off, got {addr:?}"),
            )
        }),
    }
}

/// Bind the admin listener (`/metrics`, `/healthz`, `/readyz`) of a worker or an autoscaler, before the role connects
/// to anything. An address that cannot be bound ends the start (exit 69, like a gateway whose `--listen` is
/// taken): a process running without its probes and metrics looks healthy to nobody and is invisible to
/// Prometheus, so an operator must choose a free address or say `off` on purpose.
pub(crate) async fn bind_admin(
    addr: Option<std::net::SocketAddr>,
) -> Result<Option<tokio::net::TcpListener>, CliError> {
    let Some(addr) = addr else {
        return Ok(None);
    };
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        let why = if e.kind() == std::io::ErrorKind::AddrInUse {
            " (another process holds it: a second worker on this host with the default address?)"
        } else {
            ""
        };
        CliError::Unavailable(format!(
            "cannot listen on {addr} (--admin-listen): {e}{why}; give each process its own \
             --admin-listen HOST:PORT, or --admin-listen off to run without /metrics, /healthz and /readyz"
        ))
    })?;
    // The address really bound (port 0 picks one): what an operator, or a test, connects to.
    let bound = listener.local_addr().unwrap_or(addr);
    tracing::info!(admin = %bound, "admin listening");
    Ok(Some(listener))
}

/// The `--long` flag of `role` that sets the library setting `field`: the argument (flattened groups included)
/// whose id is the field's name, or the name with `_ms` (durations are given in milliseconds). Read from clap
/// itself, so a renamed or added flag cannot leave a stale table behind; `configuration` when no flag sets it.
pub(crate) fn flag_of(role: &str, field: &str) -> String {
    use clap::CommandFactory;
    let cli = Cli::command();
    let with_ms = format!("{field}_ms");
    cli.find_subcommand(role)
        .and_then(|cmd| {
            cmd.get_arguments()
                .find(|a| {
                    let id = a.get_id().as_str();
                    id == field || id == with_ms
                })
                .and_then(|a| a.get_long())
                .map(|long| format!("--{long}"))
        })
        .unwrap_or_else(|| "configuration".to_owned())
}

/// A gateway setting that breaks a rule of the gateway's own validation, as a usage error naming `role`'s flag.
pub(crate) fn gateway_config_error(role: &str, e: ferry_gateway::config::ConfigError) -> CliError {
    CliError::usage(&flag_of(role, e.field), e.message)
}

/// Refuse the first `(flag, value)` that is zero: counts and durations that must be at least 1.
pub(crate) fn at_least_one(values: &[(&'static str, u64)]) -> Result<(), CliError> {
    match values.iter().find(|(_, v)| *v == 0) {
        Some((flag, _)) => Err(CliError::usage(flag, "must be at least 1")),
        None => Ok(()),
    }
}

/// The Redis client's timeouts, from `--redis-timeout-ms` and `--redis-connect-timeout-ms`.
pub(crate) fn redis_options(a: &args::RedisArgs) -> Result<ferry_broker::RedisOptions, CliError> {
    at_least_one(&[
        ("--redis-timeout-ms", a.redis_timeout_ms),
        ("--redis-connect-timeout-ms", a.redis_connect_timeout_ms),
    ])?;
    let cluster_vshards = if a.redis_cluster.is_empty() {
        None
    } else {
        let max = 16_384; // one virtual shard per slot at most
        if !(1..=max).contains(&a.redis_cluster_vshards) {
            return Err(CliError::usage(
                "--redis-cluster-vshards",
                format!(
                    "must be between 1 and {max}, got {}",
                    a.redis_cluster_vshards
                ),
            ));
        }
        Some(a.redis_cluster_vshards)
    };
    Ok(ferry_broker::RedisOptions {
        response_timeout: std::time::Duration::from_millis(a.redis_timeout_ms),
        connection_timeout: std::time::Duration::from_millis(a.redis_connect_timeout_ms),
        cluster_vshards,
    })
}

/// The TLS settings of `rediss://` shards, from `--redis-ca-file`: the file is read and checked here, at start,
/// before anything connects. A CA file with no `rediss://` URL is refused (it would silently do nothing).
pub(crate) fn redis_tls(
    urls: &[String],
    ca_file: Option<&std::path::Path>,
) -> Result<ferry_broker::RedisTls, CliError> {
    let Some(path) = ca_file else {
        return Ok(ferry_broker::RedisTls::default());
    };
    if !urls.iter().any(|u| u.starts_with("rediss://")) {
        return Err(CliError::usage(
            "--redis-ca-file",
            "applies to rediss:// URLs, and --redis lists none",
        ));
    }
    let pem = std::fs::read(path).map_err(|e| {
        CliError::usage(
            "--redis-ca-file",
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    if !String::from_utf8_lossy(&pem).contains("-----BEGIN CERTIFICATE-----") {
        return Err(CliError::usage(
            "--redis-ca-file",
            format!("{} holds no PEM certificate", path.display()),
        ));
    }
    Ok(ferry_broker::RedisTls { ca_pem: Some(pem) })
}

/// The engine settings shared by every process on Redis, from `--dead-letter-max`, `--event-log-max` and
/// `--idempotency-ttl-ms` (the rest are role flags).
pub(crate) fn engine_config(a: &args::EngineArgs) -> Result<ferry_broker::EngineConfig, CliError> {
    at_least_one(&[
        ("--dead-letter-max", a.dead_letter_max as u64),
        ("--event-log-max", a.event_log_max as u64),
        ("--idempotency-ttl-ms", a.idempotency_ttl_ms),
    ])?;
    Ok(ferry_broker::EngineConfig {
        dead_letter_max: a.dead_letter_max,
        event_stream_max: a.event_log_max,
        idempotency_ttl: std::time::Duration::from_millis(a.idempotency_ttl_ms),
        ..ferry_broker::EngineConfig::default()
    })
}

/// `--history-size` and `--history-ttl-ms`.
pub(crate) fn channel_history(
    a: &args::HistoryArgs,
) -> Result<ferry_broker::ChannelHistory, CliError> {
    at_least_one(&[
        ("--history-size", a.history_size as u64),
        ("--history-ttl-ms", a.history_ttl_ms),
    ])?;
    Ok(ferry_broker::ChannelHistory {
        size: a.history_size,
        ttl: std::time::Duration::from_millis(a.history_ttl_ms),
    })
}

/// Connect to every shard; an unreachable one is exit 69.
pub(crate) async fn connect(
    urls: &[String],
    config: ferry_broker::EngineConfig,
    options: ferry_broker::RedisOptions,
    tls: ferry_broker::RedisTls,
) -> Result<ferry_broker::RedisBroker, CliError> {
    use ferry_broker::Operations;
    // The URLs as the message shows them: a password inside one is never printed, nor in the error after them.
    let shown: Vec<String> = urls.iter().map(|u| config::shown("redis", u)).collect();
    let shown = shown.join(", ");
    let redactor = urls
        .iter()
        .fold(ferry_core::Redactor::new(), |r, u| r.url(u));
    let unavailable = |e: ferry_broker::BrokerError| {
        // A setting the engine refused (a Redis Cluster laid out over another number of virtual shards, TLS to
        // a cluster) is the command line's fault: exit 64 naming the flag.
        if let ferry_broker::BrokerError::Invalid(v) = &e
            && let Some(f) = v.errors.first()
        {
            let flag = f.field.split('[').next().unwrap_or(&f.field);
            return CliError::usage(&format!("--{flag}"), redactor.apply(&f.message));
        }
        let e = redactor.apply(&e.to_string());
        CliError::Unavailable(format!("cannot reach redis ({shown}): {e}"))
    };
    let broker = ferry_broker::RedisBroker::connect_with_tls(urls, config, options, tls)
        .await
        .map_err(unavailable)?;
    broker.ping().await.map_err(unavailable)?;
    Ok(broker)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_urls_are_checked() {
        let ok =
            check_redis_urls(&["redis://127.0.0.1:6379".into(), " redis://h:1/2 ".into()]).unwrap();
        assert_eq!(ok[1], "redis://h:1/2");
        for bad in ["127.0.0.1:6379", "http://x", "redis://"] {
            let e = check_redis_urls(&[bad.into()]).unwrap_err();
            assert!(e.to_string().starts_with("invalid --redis: "), "{e}");
            assert_eq!(e.exit_code(), EXIT_USAGE);
        }
        assert!(check_redis_urls(&["redis://a:1".into(), "redis://a:1".into()]).is_err());
        assert_eq!(
            check_redis_urls(&["rediss://cache.example:6380".into()]).unwrap(),
            ["rediss://cache.example:6380"]
        );
    }

    #[test]
    fn redis_ca_file_is_checked_at_start() {
        let tls = ["rediss://h:1".to_owned()];
        assert!(redis_tls(&tls, None).unwrap().ca_pem.is_none());
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = redis_tls(&tls, Some(&missing)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("invalid --redis-ca-file: cannot read"),
            "{e}"
        );
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not pem").unwrap();
        let e = redis_tls(&tls, Some(&junk)).unwrap_err();
        assert!(e.to_string().contains("holds no PEM certificate"), "{e}");
        let ca = dir.path().join("ca.pem");
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(redis_tls(&tls, Some(&ca)).unwrap().ca_pem.is_some());
        let e = redis_tls(&["redis://h:1".to_owned()], Some(&ca)).unwrap_err();
        assert_eq!(e.exit_code(), EXIT_USAGE);
        assert!(e.to_string().contains("rediss://"), "{e}");
    }
}
