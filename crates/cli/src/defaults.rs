//! The drift test of the flags' defaults: each long-running role, parsed with only its required flags and
//! resolved (which connects to nothing), must give exactly the libraries' own defaults. The flags read their
//! defaults from those libraries (see [`crate::args`]); this catches a setting resolved from the wrong flag, a
//! flag left with a literal, or a resolve step that changes a value on the way.
//!
//! Also: every field a library's validation can name maps to a real flag of its role (`flag_of`).

use std::collections::BTreeSet;

use clap::Parser;
use ferry_balancer::BalancerConfig;
use ferry_broker::{ChannelHistory, EngineConfig, RedisOptions};
use ferry_core::QueueName;
use ferry_gateway::config::{
    ClusterConfig, ConnectionConfig, LimitsConfig, ReadinessConfig, ResilienceConfig,
    ShutdownConfig,
};
use ferry_store::PgConfig;
use ferry_store::reconciler::ReconcilerConfig;
use ferry_store::recorder::RecorderConfig;
use ferry_worker::WorkerConfig;

use crate::args::{Cli, Command};

const REDIS: &str = "redis://127.0.0.1:1";
const DATABASE: &str = "postgres://ferry@127.0.0.1:1/ferry";
const SECRET: &str = "0123456789abcdef0123456789abcdef";

fn parse(argv: &[&str]) -> Command {
    let mut full = vec!["ferry"];
    full.extend_from_slice(argv);
    Cli::try_parse_from(full).expect("parses").command
}

/// Debug output: most library configs have no `PartialEq`, and their `Debug` shows every field.
fn dbg(v: &impl std::fmt::Debug) -> String {
    format!("{v:#?}")
}

#[test]
fn worker_defaults_are_the_libraries() {
    let Command::Worker(a) = parse(&[
        "worker",
        "--redis",
        REDIS,
        "--queues",
        "q",
        // Only so that the recorder's, the reconciler's and the pool's settings are resolved too.
        "--database-url",
        DATABASE,
    ]) else {
        panic!("not a worker");
    };
    let r = crate::worker::resolve(a).expect("resolves");
    let expected = WorkerConfig::for_queues([QueueName::parse("q").unwrap()]);
    assert_eq!(r.node.worker, expected);
    // With the record, finished jobs leave Redis once recorded: the one engine setting a database changes.
    let engine = EngineConfig {
        drop_recorded: true,
        ..EngineConfig::default()
    };
    assert_eq!(dbg(&r.engine), dbg(&engine));
    assert_eq!(dbg(&r.redis_options), dbg(&RedisOptions::default()));
    assert_eq!(
        dbg(&r.node.recorder),
        dbg(&Some(RecorderConfig::new(String::new())))
    );
    assert_eq!(
        dbg(&r.node.reconciler),
        dbg(&Some(ReconcilerConfig::new(String::new())))
    );
    assert_eq!(
        r.node.maintenance,
        Some(ferry_store::maintenance::MaintenanceConfig::default())
    );
    assert_eq!(
        r.node.ready_budget,
        ferry_worker::node::DEFAULT_READY_BUDGET
    );
    let db = r.database.expect("a database");
    assert_eq!(dbg(&db.pg), dbg(&PgConfig::new(DATABASE)));
}

#[test]
fn gateway_defaults_are_the_libraries() {
    let Command::Gateway(a) = parse(&["gateway", "--redis", REDIS, "--jwt-secret", SECRET]) else {
        panic!("not a gateway");
    };
    let r = crate::gateway::resolve(a).expect("resolves");
    let c = &r.config;
    assert_eq!(dbg(&c.limits), dbg(&LimitsConfig::default()));
    assert_eq!(dbg(&c.connections), dbg(&ConnectionConfig::default()));
    assert_eq!(dbg(&c.resilience), dbg(&ResilienceConfig::default()));
    assert_eq!(dbg(&c.readiness), dbg(&ReadinessConfig::default()));
    assert_eq!(dbg(&c.shutdown), dbg(&ShutdownConfig::default()));
    // The node id is drawn per process.
    let cluster = ClusterConfig {
        node_id: c.cluster.node_id.clone(),
        ..ClusterConfig::default()
    };
    assert_eq!(dbg(&c.cluster), dbg(&cluster));
    assert_eq!(dbg(&r.engine), dbg(&EngineConfig::default()));
    assert_eq!(dbg(&r.redis_options), dbg(&RedisOptions::default()));
    assert_eq!(r.history, ChannelHistory::default());
    assert_eq!(c.cors_origin, library_cors_origin());
}

/// `GatewayConfig::new`'s CORS origins (none).
fn library_cors_origin() -> Vec<String> {
    let auth = ferry_gateway::auth::AuthConfig::default();
    ferry_gateway::GatewayConfig::new("127.0.0.1:0".parse().unwrap(), auth).cors_origin
}

#[test]
fn cors_origin_is_repeatable_and_a_comma_list_and_checked() {
    let Command::Dev(a) = parse(&[
        "dev",
        "--jwt-secret",
        SECRET,
        "--cors-origin",
        "http://127.0.0.1:1,http://127.0.0.1:2",
        "--cors-origin",
        "https://app.example.com",
    ]) else {
        panic!("not dev");
    };
    let r = crate::dev::resolve(a).expect("resolves");
    assert_eq!(
        r.gateway.cors_origin,
        [
            "http://127.0.0.1:1",
            "http://127.0.0.1:2",
            "https://app.example.com"
        ]
    );
    let Command::Gateway(a) = parse(&[
        "gateway",
        "--redis",
        REDIS,
        "--jwt-secret",
        SECRET,
        "--cors-origin",
        "app.example.com",
    ]) else {
        panic!("not a gateway");
    };
    let e = crate::gateway::resolve(a).map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("--cors-origin"), "{e}");
}

#[test]
fn dev_defaults_are_the_libraries() {
    let Command::Dev(a) = parse(&["dev", "--jwt-secret", SECRET]) else {
        panic!("not dev");
    };
    let r = crate::dev::resolve(a).expect("resolves");
    let expected = WorkerConfig::for_queues([QueueName::parse("default").unwrap()]);
    assert_eq!(r.worker, expected);
    assert_eq!(dbg(&r.gateway.limits), dbg(&LimitsConfig::default()));
    assert_eq!(dbg(&r.gateway.shutdown), dbg(&ShutdownConfig::default()));
    assert_eq!(r.history, ChannelHistory::default());
    assert_eq!(r.gateway.cors_origin, library_cors_origin());
}

#[test]
fn balancer_defaults_are_the_libraries() {
    let Command::Balancer(a) = parse(&["balancer", "--redis", REDIS]) else {
        panic!("not a balancer");
    };
    let r = crate::balancer::resolve(a).expect("resolves");
    // The listen addresses are the cli's own defaults; everything else is the library's.
    let mut expected = BalancerConfig::new(r.listen, vec![REDIS.to_owned()]);
    expected.admin_listen = r.admin_listen;
    assert_eq!(dbg(&r), dbg(&expected));
}

/// Snake-case string literals in `source` that are names of `pub` fields declared in `source`: the field
/// names a validation can report.
fn reported_fields(source: &str) -> BTreeSet<String> {
    let fields: BTreeSet<&str> = source
        .lines()
        .filter_map(|l| l.trim().strip_prefix("pub ")?.split_once(':'))
        .map(|(name, _)| name.trim())
        .filter(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        .collect();
    source
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|lit| fields.contains(lit))
        .map(str::to_owned)
        .collect()
}

fn validation_of(source: &str, start: &str) -> String {
    let from = source.find(start).expect("validation found");
    let to = source[from..]
        .find("#[cfg(test)]")
        .map_or(source.len(), |i| from + i);
    // The field declarations too, so that literals can be told from messages.
    let decls: String = source
        .lines()
        .filter(|l| l.trim().starts_with("pub ") && l.contains(':'))
        .collect::<Vec<_>>()
        .join("\n");
    format!("{decls}\n{}", &source[from..to])
}

#[test]
fn every_worker_field_validate_reports_has_a_flag() {
    let source = include_str!("../../worker/src/config.rs");
    let fields = reported_fields(&validation_of(source, "pub fn validate(&self)"));
    for must in [
        "queues",
        "default_job_timeout",
        "heartbeat_interval",
        "consumer",
    ] {
        assert!(fields.contains(must), "{must} not found in {fields:?}");
    }
    for field in &fields {
        let flag = crate::flag_of("worker", field);
        assert_ne!(flag, "configuration", "{field} has no flag");
    }
    assert_eq!(
        crate::flag_of("worker", "default_job_timeout"),
        "--job-timeout-ms"
    );
    assert_eq!(crate::flag_of("worker", "concurrency"), "--concurrency");
    assert_eq!(crate::flag_of("worker", "no_such_field"), "configuration");
}

#[test]
fn every_gateway_field_validate_reports_has_a_flag() {
    let source = include_str!("../../gateway/src/config.rs");
    let fields = reported_fields(&validation_of(source, "pub struct ConfigError"));
    for must in [
        "max_connections",
        "ping_interval",
        "membership_ttl",
        "idle_timeout",
    ] {
        assert!(fields.contains(must), "{must} not found in {fields:?}");
    }
    for field in &fields {
        let flag = crate::flag_of("gateway", field);
        assert_ne!(flag, "configuration", "{field} has no flag");
    }
    assert_eq!(
        crate::flag_of("gateway", "http_rate_per_sec"),
        "--http-rate"
    );
    assert_eq!(
        crate::flag_of("gateway", "ping_interval"),
        "--ws-ping-interval-ms"
    );
    assert_eq!(
        crate::flag_of("dev", "unauth_upgrades_per_sec_per_ip"),
        "--unauth-upgrade-rate"
    );
}

#[test]
fn gateway_limits_are_refused_naming_the_flag() {
    for (flag, value) in [
        ("--max-connections", "0"),
        ("--http-rate", "0"),
        ("--ws-ping-interval-ms", "0"),
        ("--max-unauthenticated-connections", "0"),
        ("--membership-ttl-ms", "1000"),
        ("--balance-epsilon", "0"),
    ] {
        let Command::Gateway(a) = parse(&[
            "gateway",
            "--redis",
            REDIS,
            "--jwt-secret",
            SECRET,
            flag,
            value,
        ]) else {
            panic!("not a gateway");
        };
        let err = crate::gateway::resolve(a).expect_err(flag).to_string();
        assert!(err.starts_with(&format!("invalid {flag}: ")), "{err}");
    }
}

#[test]
fn every_recorder_field_check_reports_has_a_flag() {
    use clap::CommandFactory;
    let source = include_str!("../../store/src/recorder.rs");
    let check = &source[source.find("pub fn check(&self)").expect("check found")..];
    let check = &check[..check.find("\n    }\n").expect("end of check")];
    let fields: Vec<&str> = check
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|lit| {
            lit.chars()
                .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
        })
        .collect();
    assert!(fields.len() >= 7, "{fields:?}");
    let cli = crate::args::Cli::command();
    let worker = cli.find_subcommand("worker").expect("worker");
    for field in fields {
        let flag = crate::worker::recorder_flag(field);
        let long = flag.trim_start_matches("--");
        assert!(
            worker.get_arguments().any(|a| a.get_long() == Some(long)),
            "{field} → {flag}, which `ferry worker` does not have"
        );
    }
}

#[test]
fn every_job_field_validate_reports_has_an_enqueue_flag() {
    let source = include_str!("../../core/src/job.rs");
    let fields = reported_fields(&validation_of(source, "pub fn validate(&self, limits"));
    for must in ["payload", "max_attempts", "timeout_ms", "delay_ms"] {
        assert!(fields.contains(must), "{must} not found in {fields:?}");
    }
    for field in &fields {
        let flag = crate::flag_of("enqueue", field);
        assert_ne!(flag, "configuration", "{field} has no flag");
    }
    assert_eq!(crate::flag_of("enqueue", "timeout_ms"), "--timeout-ms");
}
