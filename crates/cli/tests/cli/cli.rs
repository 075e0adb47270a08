//! The `ferry` binary's contract with scripts: exit codes, messages that name the flag, output formats, and the
//! `FERRY_*` environment variables.

use std::process::Output;

use anyhow::Result;
use ferry_broker::prelude::*;
use ferry_core::{JobId, JobState, Priority, QueueName};

use crate::support;

fn ferry(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = support::ferry();
    cmd.args(args).env("FERRY_LOG", "warn");
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run ferry")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_input_exits_64_naming_the_flag_before_connecting() {
    // Port 1: nothing listens, so reaching the check proves validation came first.
    let r = "redis://127.0.0.1:1";
    let cases: &[(&[&str], &str)] = &[
        (
            &[
                "enqueue",
                "--redis",
                r,
                "--queue",
                "q",
                "--kind",
                "k",
                "--payload",
                "{nope",
            ],
            "invalid --payload: expected JSON: ",
        ),
        (
            &[
                "enqueue",
                "--redis",
                r,
                "--queue",
                "bad queue",
                "--kind",
                "k",
            ],
            "invalid --queue: ",
        ),
        (
            &[
                "enqueue",
                "--redis",
                r,
                "--queue",
                "q",
                "--kind",
                "k",
                "--max-attempts",
                "0",
            ],
            "invalid --max-attempts: ",
        ),
        (
            &[
                "enqueue",
                "--redis",
                "localhost:6379",
                "--queue",
                "q",
                "--kind",
                "k",
            ],
            "invalid --redis: ",
        ),
        (
            &["worker", "--redis", r, "--queues", "q", "--batch-size", "0"],
            "invalid --batch-size: ",
        ),
        (
            &[
                "worker",
                "--redis",
                r,
                "--queues",
                "q",
                "--webhook",
                "nourl",
            ],
            "invalid --webhook: ",
        ),
        (
            &[
                "worker",
                "--redis",
                r,
                "--queues",
                "q",
                "--concurrency",
                "many",
            ],
            "--concurrency",
        ),
        (&["worker", "--queues", "q"], "--redis"),
        (
            &[
                "worker",
                "--redis",
                r,
                "--queues",
                "q",
                "--drain-timeout-ms",
                "5000",
                "--shutdown-deadline-ms",
                "5000",
            ],
            "invalid --shutdown-deadline-ms: must exceed --drain-timeout-ms + --cancel-grace-ms + \
             --flush-timeout-ms (11000 ms)",
        ),
        (
            &[
                "worker",
                "--redis",
                r,
                "--queues",
                "q",
                "--recorder-writers",
                "0",
                "--database-url",
                "postgres://ferry@127.0.0.1:1/ferry",
            ],
            "invalid --recorder-writers: must be at least 1",
        ),
        (
            &[
                "worker",
                "--redis",
                r,
                "--queues",
                "q",
                "--recorder-batch-bytes",
                "0",
                "--database-url",
                "postgres://ferry@127.0.0.1:1/ferry",
            ],
            "invalid --recorder-batch-bytes: must be at least 1",
        ),
        (
            &[
                "worker",
                "--redis",
                r,
                "--queues",
                "q",
                "--queue-metrics-interval-ms",
                "0",
            ],
            "invalid --queue-metrics-interval-ms: ",
        ),
        (
            &[
                "worker",
                "--redis",
                r,
                "--queues",
                "q",
                "--redis-timeout-ms",
                "0",
            ],
            "invalid --redis-timeout-ms: must be at least 1",
        ),
        (
            &[
                "gateway",
                "--redis",
                r,
                "--jwt-secret",
                "0123456789abcdef0123456789abcdef",
                "--breaker-failures",
                "0",
            ],
            "invalid --breaker-failures: must be at least 1",
        ),
        (
            &[
                "gateway",
                "--redis",
                r,
                "--jwt-secret",
                "0123456789abcdef0123456789abcdef",
                "--ws-ping-interval-ms",
                "0",
            ],
            "invalid --ws-ping-interval-ms: must be at least 1",
        ),
        (
            &[
                "gateway",
                "--redis",
                r,
                "--jwt-secret",
                "0123456789abcdef0123456789abcdef",
                "--header-timeout-ms",
                "0",
            ],
            "invalid --header-timeout-ms: must be at least 1",
        ),
        (
            &[
                "gateway",
                "--redis",
                r,
                "--jwt-secret",
                "0123456789abcdef0123456789abcdef",
                "--history-size",
                "0",
            ],
            "invalid --history-size: must be at least 1",
        ),
        (
            &["dev", "--history-ttl-ms", "0"],
            "invalid --history-ttl-ms: must be at least 1",
        ),
    ];
    for (args, expected) in cases {
        let out = ferry(args, &[]);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains(expected),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[test]
fn unreachable_broker_exits_69() {
    for args in [
        &[
            "enqueue",
            "--redis",
            "redis://127.0.0.1:1",
            "--queue",
            "q",
            "--kind",
            "k",
        ][..],
        &["worker", "--redis", "redis://127.0.0.1:1", "--queues", "q"][..],
        // A password in the URL is never printed.
        &[
            "enqueue",
            "--redis",
            "redis://:pw-s3cret@127.0.0.1:1",
            "--queue",
            "q",
            "--kind",
            "k",
        ][..],
    ] {
        // The worker binds its admin listener first: off, so no other test's port is in the way.
        let out = ferry(args, &[("FERRY_ADMIN_LISTEN", "off")]);
        assert_eq!(out.status.code(), Some(69), "{args:?}: {}", stderr(&out));
        assert!(
            stderr(&out).contains("cannot reach redis"),
            "{}",
            stderr(&out)
        );
        assert!(!stderr(&out).contains("pw-s3cret"), "{}", stderr(&out));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_prints_ids_or_a_summary_and_reads_env() -> Result<()> {
    let (_redis, url, broker) = support::redis_and_broker().await?;

    let out = ferry(
        &[
            "enqueue",
            "--redis",
            &url,
            "--queue",
            "cli",
            "--kind",
            "ferry.echo",
            "--payload",
            r#"{"a":1}"#,
            "--priority",
            "high",
            "--delay-ms",
            "60000",
            "--max-attempts",
            "5",
        ],
        &[],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let id = JobId::parse(String::from_utf8(out.stdout)?.trim())?;
    let info = broker.job(id).await?.expect("job stored");
    assert_eq!(info.state, JobState::Scheduled);
    assert_eq!(info.spec.priority, Priority::High);
    assert_eq!(info.spec.max_attempts, 5);
    assert_eq!(info.spec.payload, serde_json::json!({"a": 1}));

    // Everything from the environment, 1,200 jobs in batches of at most 500.
    let out = ferry(
        &["enqueue"],
        &[
            ("FERRY_REDIS_URLS", url.as_str()),
            ("FERRY_QUEUE", "cli-bulk"),
            ("FERRY_KIND", "ferry.noop"),
            ("FERRY_COUNT", "1200"),
        ],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let line = String::from_utf8(out.stdout)?;
    assert!(
        line.starts_with("enqueued 1200 jobs to queue cli-bulk in "),
        "{line}"
    );
    assert_eq!(
        broker.stats(&QueueName::parse("cli-bulk")?).await?.depth,
        1200
    );
    Ok(())
}

#[test]
fn database_flags_are_checked_and_an_unreachable_database_exits_69() {
    let r = "redis://127.0.0.1:1";
    for (args, flag) in [
        (vec!["migrate"], "--database-url"),
        (
            vec!["migrate", "--database-url", "mysql://h/db"],
            "--database-url",
        ),
        (
            vec!["migrate", "--database-url", "nonsense"],
            "--database-url",
        ),
        (
            vec![
                "migrate",
                "--database-url",
                "postgres://h/db",
                "--database-pool-size",
                "0",
            ],
            "--database-pool-size",
        ),
        (
            vec!["worker", "--redis", r, "--queues", "q", "--migrate"],
            "--migrate",
        ),
        (
            vec![
                "migrate",
                "--database-url",
                "postgres://h/db",
                "--database-read-url",
                "mysql://replica/db",
            ],
            "invalid --database-read-url: expected a postgres:// URL, got a mysql:// one",
        ),
        (
            vec![
                "gateway",
                "--redis",
                r,
                "--jwt-secret",
                "0123456789abcdef0123456789abcdef",
                "--database-read-url",
                "postgres://replica/db",
            ],
            "invalid --database-read-url: needs --database-url",
        ),
        (
            vec![
                "worker",
                "--redis",
                r,
                "--queues",
                "q",
                "--database-url",
                "postgres://h/db",
                "--recorder-batch",
                "0",
            ],
            "--recorder-batch",
        ),
        (
            // The reclaim idle time must exceed what a live recorder may hold: 50 + 2 × 30,000 + 1,000 ms.
            vec![
                "worker",
                "--redis",
                r,
                "--queues",
                "q",
                "--database-url",
                "postgres://h/db",
                "--recorder-write-timeout-ms",
                "30000",
            ],
            "invalid --recorder-reclaim-idle-ms: must exceed max delay + 2 × write timeout + 1000 ms = 61050 ms",
        ),
        (
            vec![
                "gateway",
                "--redis",
                r,
                "--jwt-secret",
                "0123456789abcdef0123456789abcdef",
                "--broker-timeout-ms",
                "0",
            ],
            "--broker-timeout-ms",
        ),
        (
            vec![
                "worker",
                "--redis",
                r,
                "--queues",
                "q",
                "--record-retention",
                "30x",
            ],
            "invalid --record-retention: unknown unit \"x\": use s, m, h or d",
        ),
        (
            vec![
                "worker",
                "--redis",
                r,
                "--queues",
                "q",
                "--record-retention",
                "10m",
            ],
            "invalid --record-retention: must be at least an hour",
        ),
        (
            vec![
                "worker",
                "--redis",
                r,
                "--queues",
                "q",
                "--record-partition-width",
                "30m",
            ],
            "invalid --record-partition-width: must be at least an hour",
        ),
    ] {
        let out = ferry(&args, &[]);
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", stderr(&out));
        assert!(stderr(&out).contains(flag), "{args:?}: {}", stderr(&out));
    }
    // Nothing listens on port 1; the password never shows.
    let out = ferry(
        &[
            "migrate",
            "--database-url",
            "postgres://u:s3cret@127.0.0.1:1/db",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(69), "{}", stderr(&out));
    assert!(!stderr(&out).contains("s3cret"), "{}", stderr(&out));
}

#[test]
fn config_files_are_checked_and_printed_without_secrets() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, text: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_owned()
    };
    // Each documented message, from a real start (exit 64, nothing connects).
    for (text, message) in [
        (
            "[worker]\nconcurency = 3\n",
            "unknown key worker.concurency: ferry worker has no --concurency",
        ),
        (
            "colour = \"red\"\n",
            "unknown key colour: no role has --colour",
        ),
        (
            "[worker]\nconcurrency = \"lots\"\n",
            "worker.concurrency: invalid value 'lots'",
        ),
        ("[worker\n", "invalid config file"),
        (
            "redis = [\"redis://127.0.0.1:1\"]\n[worker]\nqueues = [\"q\"]\nconcurrency = 0\n",
            "invalid --concurrency: must be at least 1",
        ),
    ] {
        let path = write("bad.toml", text);
        let out = ferry(&["--config", &path, "worker"], &[]);
        assert_eq!(out.status.code(), Some(64), "{text}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(message), "{text}: {err}");
        // One prefix, no usage block: the file is at fault, not the command line.
        assert!(
            err.starts_with("ferry: ") && !err.contains("ferry: ferry"),
            "{text}: {err}"
        );
        assert!(
            !err.contains("Usage:") && !err.contains(" it:"),
            "{text}: {err}"
        );
    }
    // check-config's errors: one prefix, and a bad variable named.
    let path = write(
        "env.toml",
        "redis = [\"redis://127.0.0.1:1\"]\n[worker]\nqueues = [\"q\"]\n",
    );
    let out = ferry(
        &["check-config", "--config", &path, "--role", "worker"],
        &[("FERRY_CONCURRENCY", "lots")],
    );
    assert_eq!(out.status.code(), Some(64), "{}", stderr(&out));
    assert_eq!(
        stderr(&out).trim_end(),
        "ferry: worker: invalid value 'lots' for '--concurrency <N>' (from FERRY_CONCURRENCY): invalid digit found in string"
    );
    let out = ferry(&["check-config", "--role", "worker"], &[]);
    let err = stderr(&out);
    assert!(
        err.starts_with("ferry: worker: the following required arguments were not provided")
            && !err.contains("ferry: ferry"),
        "{err}"
    );
    // check-config: the effective settings with their sources; variables over the file; secrets hidden.
    let path = write(
        "ok.toml",
        "redis = [\"redis://:pw123@10.0.0.1:6379\"]\n[gateway]\njwt-secret = \"0123456789abcdef0123456789abcdef\"\nmax-batch = 50\nmax-unauthenticated-per-ip = 512\n",
    );
    let out = ferry(
        &["check-config", "--config", &path, "--role", "gateway"],
        &[("FERRY_MAX_BATCH", "70")],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("max-batch = 70  # env"), "{text}");
    assert!(
        text.contains("jwt-secret = \"<redacted>\"  # file"),
        "{text}"
    );
    assert!(
        text.contains("max-body-bytes = 1048576  # default"),
        "{text}"
    );
    assert!(
        text.contains("max-unauthenticated-per-ip = 512  # file")
            && text.contains("idle-timeout-ms = 75000  # default"),
        "{text}"
    );
    assert!(
        !text.contains("pw123") && !text.contains("0123456789abcdef"),
        "{text}"
    );
}

/// An admin address another process holds ends the start of a worker and of an autoscaler alike: exit 69 with a
/// message naming the address, the flag and the way out (`off`), instead of a worker that runs without
/// `/metrics`, `/healthz` and `/readyz`. `--admin-listen off` runs without the listener.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_admin_address_fails_the_start_naming_it() -> Result<()> {
    use std::process::Stdio;
    use std::time::Duration;
    let redis = ferry_testkit::RedisServer::start()?;
    let url = redis.url();
    // The second worker on the host: the first one holds the address.
    let held = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = held.local_addr()?.to_string();
    let regions = redis.dir().join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[regions]]\nname = \"z\"\nredis = [\"{url}\"]\nqueues = [\"q\"]\n[regions.actuator]\nkind = \"metrics\"\n"
        ),
    )?;
    let regions = regions.to_str().unwrap().to_owned();
    for args in [
        vec!["worker", "--redis", &url, "--queues", "q"],
        vec!["autoscaler", "--regions", &regions],
    ] {
        let mut proc = support::Proc::spawn_logged(
            support::ferry()
                .args(&args)
                .args(["--admin-listen", &addr])
                .env("FERRY_LOG", "warn")
                .env_remove("FERRY_CONFIG")
                .stdin(Stdio::null())
                .stdout(Stdio::null()),
        )?;
        let status = proc.wait_exit(Duration::from_secs(20)).await?;
        let log = proc.log();
        assert_eq!(status.code(), Some(69), "{args:?}: {log}");
        for part in [
            addr.as_str(),
            "--admin-listen",
            "in use",
            "--admin-listen off",
        ] {
            assert!(log.contains(part), "{args:?} names {part:?}: {log}");
        }
    }
    // Opted out: the worker runs.
    let mut worker = support::Proc::spawn_logged(
        support::ferry()
            .args(["worker", "--redis", &url, "--queues", "q"])
            .args(["--admin-listen", "off"])
            .env("FERRY_LOG", "warn")
            .env_remove("FERRY_CONFIG")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(worker.alive(), "{}", worker.log());
    let status = worker.stop(Duration::from_secs(20)).await?;
    assert_eq!(status.code(), Some(0), "{}", worker.log());
    drop(held);
    Ok(())
}
