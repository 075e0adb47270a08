//! TLS to ferry's dependencies end to end, with the real `ferry` binary: a TLS-only redis-server (`rediss://`)
//! and a PostgreSQL with `ssl = on`, both with certificates of a private CA generated for the test and trusted
//! through `--redis-ca-file` / `--database-ca-file`. `ferry enqueue` submits a job over TLS, `ferry worker` runs
//! it and its recorder writes it to PostgreSQL over `sslmode=verify-full`; without the CA both refuse to start,
//! naming the certificate problem.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{Result, bail};
use ferry_testkit::{PostgresServer, RedisServer, TestCerts, eventually};

use crate::support::{Proc, ferry};

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("UTF-8 temp path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_runs_a_job_over_tls_and_records_it_over_tls() -> Result<()> {
    let certs = TestCerts::generate()?;
    let ca = path(certs.ca_file());
    let redis = tokio::task::block_in_place(|| RedisServer::start_tls(&certs, &[]))?;
    let pg = tokio::task::block_in_place(|| PostgresServer::start_tls(&certs, ""))?;
    let redis_url = redis.url();
    assert!(redis_url.starts_with("rediss://"), "{redis_url}");
    let db = format!(
        "postgres://postgres@127.0.0.1:{}/ferry?sslmode=verify-full&application_name=ferry-tls-worker",
        pg.port()
    );

    let out = ferry()
        .args(["migrate", "--database-url", &db, "--database-ca-file", ca])
        .env_remove("FERRY_DATABASE_URL")
        .output()?;
    if !out.status.success() {
        bail!(
            "ferry migrate over TLS: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let mut worker = Proc::spawn_logged(
        ferry()
            .args(["worker", "--redis", &redis_url, "--redis-ca-file", ca])
            .args(["--queues", "tls", "--consumer", "tls-worker"])
            .args(["--database-url", &db, "--database-ca-file", ca])
            .env("FERRY_LOG", "warn,ferry_store=info,ferry_cli=info")
            .env_remove("FERRY_LOG_FORMAT")
            .env_remove("FERRY_DATABASE_URL")
            .env_remove("FERRY_REDIS_URLS")
            .env("FERRY_ADMIN_LISTEN", "off")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
    )?;

    let out = ferry()
        .args(["enqueue", "--redis", &redis_url, "--redis-ca-file", ca])
        .args([
            "--queue",
            "tls",
            "--kind",
            "ferry.noop",
            "--payload",
            r#"{"over":"tls"}"#,
        ])
        .env_remove("FERRY_REDIS_URLS")
        .output()?;
    if !out.status.success() {
        bail!(
            "ferry enqueue over TLS: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = stdout
        .split(|c: char| !(c.is_ascii_hexdigit() || c == '-'))
        .find(|w| w.len() == 36)
        .unwrap_or_else(|| panic!("no job id in {stdout:?}"))
        .to_owned();

    let sql = |q: &str| -> Result<String> {
        Ok(tokio::task::block_in_place(|| pg.psql(q))?
            .trim()
            .to_owned())
    };
    let recorded = eventually(
        Duration::from_secs(60),
        "the job completed and recorded in PostgreSQL",
        || async {
            Ok((sql(&format!(
                "select state || '/' || (select count(*) from job_events where job_id = '{id}') \
                 from jobs where id = '{id}'"
            ))? == "completed/3")
                .then_some(()))
        },
    )
    .await;
    if let Err(e) = recorded {
        bail!("{e}\nworker log:\n{}", worker.log());
    }
    assert_eq!(
        sql(&format!("select payload::text from jobs where id = '{id}'"))?,
        r#"{"over": "tls"}"#
    );

    // The worker's (and recorder's) PostgreSQL connections are encrypted.
    let ssl = sql(
        "select string_agg(s.ssl::text, ',') from pg_stat_ssl s join pg_stat_activity a using (pid) \
         where a.application_name = 'ferry-tls-worker'",
    )?;
    assert!(!ssl.is_empty(), "the worker holds connections");
    assert!(
        ssl.split(',').all(|s| s == "true"),
        "every worker connection uses TLS: {ssl}"
    );
    // And Redis has no plain port at all: the worker's connections can only be TLS ones.
    assert_eq!(redis.cli(&["CONFIG", "GET", "port"])?, "port\n0");
    let clients = redis.cli(&["CLIENT", "LIST"])?;
    assert!(
        clients
            .lines()
            .filter(|l| l.contains("laddr=127.0.0.1"))
            .count()
            >= 2,
        "the worker is connected over TCP (TLS): {clients}"
    );

    worker.stop(Duration::from_secs(30)).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_ferry_refuses_both_dependencies() -> Result<()> {
    let certs = TestCerts::generate()?;
    let redis = tokio::task::block_in_place(|| RedisServer::start_tls(&certs, &[]))?;
    let pg = tokio::task::block_in_place(|| PostgresServer::start_tls(&certs, ""))?;

    // Redis: the system roots do not know the test CA.
    let out = ferry()
        .args(["enqueue", "--redis", &redis.url(), "--queue", "tls"])
        .args(["--kind", "ferry.noop", "--redis-connect-timeout-ms", "1000"])
        .env_remove("FERRY_REDIS_URLS")
        .env_remove("FERRY_REDIS_CA_FILE")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("invalid peer certificate: UnknownIssuer"),
        "{stderr}"
    );

    // PostgreSQL with verify-full.
    let db = format!(
        "postgres://postgres@127.0.0.1:{}/ferry?sslmode=verify-full",
        pg.port()
    );
    let out = ferry()
        .args(["migrate", "--database-url", &db])
        .env_remove("FERRY_DATABASE_URL")
        .env_remove("FERRY_DATABASE_CA_FILE")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("invalid peer certificate: UnknownIssuer"),
        "{stderr}"
    );

    // Bad settings are refused before connecting (exit 64), naming the flag.
    let out = ferry()
        .args(["migrate", "--database-url", &format!("{db}x")])
        .env_remove("FERRY_DATABASE_URL")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--database-url"), "{stderr}");
    let out = ferry()
        .args(["enqueue", "--redis", "redis://127.0.0.1:1", "--queue", "q"])
        .args(["--kind", "ferry.noop", "--redis-ca-file"])
        .arg(certs.ca_file())
        .env_remove("FERRY_REDIS_URLS")
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("--redis-ca-file"), "{stderr}");
    Ok(())
}
