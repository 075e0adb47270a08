//! The topology of deploy/compose.yaml, as processes: Redis, PostgreSQL, `ferry migrate`, two gateways, two
//! workers with recorders, the autoscaler (metrics actuator) and a Prometheus server scraping them all. No
//! container engine runs here; the compose file's own checks are in container.rs.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ferry_testkit::{PostgresServer, RedisServer, eventually, free_port};
use serde_json::{Value, json};

use crate::support::{self, Proc, ferry, read, submit, token, until_completed, until_ready};

const SECRET: &str = "topology-test-secret-topology-test-secret";

/// One instant query against Prometheus: the first sample's value.
async fn query(http: &reqwest::Client, prom: &str, q: &str) -> Result<Option<f64>> {
    let v: Value = http
        .get(format!("{prom}/api/v1/query"))
        .query(&[("query", q)])
        .send()
        .await?
        .json()
        .await?;
    Ok(v["data"]["result"][0]["value"][1]
        .as_str()
        .and_then(|s| s.parse().ok()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_compose_topology_runs_as_processes() -> Result<()> {
    let prometheus_bin = support::prometheus_tool("prometheus");
    let redis = RedisServer::start()?;
    let pg = PostgresServer::start()?;
    let (redis_url, db) = (redis.url(), pg.url());
    let out = ferry()
        .args(["migrate", "--database-url", &db])
        .env_remove("FERRY_CONFIG")
        .output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let shared = [
        ("FERRY_REDIS_URLS", redis_url.as_str()),
        ("FERRY_DATABASE_URL", db.as_str()),
    ];
    let mut procs = Vec::new();
    let mut gateways = Vec::new();
    for _ in 0..2 {
        let (proc, line) = Proc::spawn_listening(
            &mut support::role(
                &[
                    "gateway",
                    "--listen",
                    "127.0.0.1:0",
                    "--drain-delay-ms",
                    "0",
                ],
                &[shared[0], shared[1], ("FERRY_JWT_SECRET", SECRET)],
            ),
            "gateway listening",
        )
        .await?;
        procs.push(proc);
        gateways.push(format!("http://{}", support::announced(&line, "listen")?));
    }
    let mut admin = Vec::new();
    for _ in 0..2 {
        let (proc, line) = Proc::spawn_listening(
            &mut support::role(
                &[
                    "worker",
                    "--queues",
                    "default",
                    "--admin-listen",
                    "127.0.0.1:0",
                ],
                &shared,
            ),
            "admin listening",
        )
        .await?;
        procs.push(proc);
        admin.push(support::announced(&line, "admin")?);
    }
    let regions = redis.dir().join("regions.toml");
    std::fs::write(
        &regions,
        format!(
            "[[regions]]\nname = \"local\"\nredis = [\"{redis_url}\"]\nqueues = [\"default\"]\n\
             [regions.actuator]\nkind = \"metrics\"\n"
        ),
    )?;
    let (proc, line) = Proc::spawn_listening(
        &mut support::role(
            &[
                "autoscaler",
                "--regions",
                &regions.display().to_string(),
                "--interval-ms",
                "500",
                "--admin-listen",
                "127.0.0.1:0",
            ],
            &[],
        ),
        "admin listening",
    )
    .await?;
    procs.push(proc);
    let autoscaler = support::announced(&line, "admin")?;

    // Prometheus scrapes every role each second. (Its own port is picked here: it is not ferry's to announce.)
    let prom_port = free_port();
    let prom_dir = tempfile::tempdir()?;
    let targets = |list: Vec<String>| serde_json::to_string(&list).unwrap();
    std::fs::write(
        prom_dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n\
             - job_name: gateway\n  static_configs: [{{targets: {}}}]\n\
             - job_name: worker\n  static_configs: [{{targets: {}}}]\n\
             - job_name: autoscaler\n  static_configs: [{{targets: {}}}]\n",
            targets(
                gateways
                    .iter()
                    .map(|g| g.trim_start_matches("http://").to_owned())
                    .collect()
            ),
            targets(admin.clone()),
            targets(vec![autoscaler.clone()]),
        ),
    )?;
    let mut prometheus = Command::new(prometheus_bin);
    prometheus
        .arg(format!(
            "--config.file={}",
            prom_dir.path().join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            prom_dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    let _prometheus = Proc::spawn_logged(&mut prometheus)?;
    let prom = format!("http://127.0.0.1:{prom_port}");

    let http = reqwest::Client::new();
    for g in &gateways {
        until_ready(&http, g, Duration::from_secs(30)).await?;
    }
    let tok = token(
        SECRET,
        "alice",
        &["jobs:submit", "jobs:read"],
        Duration::from_secs(600),
    );
    // 200 jobs submitted alternately through both gateways, each looked up through the other.
    let mut ids = Vec::new();
    for i in 0..200 {
        let (id, _) = submit(
            &http,
            &gateways[i % 2],
            &tok,
            "default",
            &json!({"kind": "ferry.echo", "payload": {"n": i}}),
            &[],
        )
        .await?;
        ids.push(id);
    }
    for (i, id) in ids.iter().enumerate() {
        until_completed(
            &http,
            &gateways[(i + 1) % 2],
            &tok,
            id,
            Duration::from_secs(60),
        )
        .await?;
    }
    // The recorders wrote every job: the durable listing holds all 200, completed.
    eventually(Duration::from_secs(30), "200 recorded jobs", || async {
        let page: Value = http
            .get(format!(
                "{}/v1/jobs?queue=default&state=completed&limit=500",
                gateways[0]
            ))
            .bearer_auth(&tok)
            .send()
            .await?
            .json()
            .await?;
        Ok((page["jobs"].as_array().map_or(0, Vec::len) == 200).then_some(()))
    })
    .await?;

    // Prometheus sees every process up, the work the workers did, and the autoscaler's decision.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let up = query(&http, &prom, "sum(up)").await?;
        let done = query(&http, &prom, "sum(ferry_jobs_completed_total)").await?;
        let desired = query(
            &http,
            &prom,
            r#"ferry_autoscaler_desired_workers{region="local",queue="all"}"#,
        )
        .await?;
        if up == Some(5.0) && done == Some(200.0) && desired.is_some_and(|d| d >= 1.0) {
            break;
        }
        if Instant::now() > deadline {
            bail!("prometheus: up={up:?} completed={done:?} desired={desired:?}");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Everything the autoscaler exports is in the catalogue, docs/metrics.md.
    let text = http
        .get(format!("http://{autoscaler}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    let catalogue = read("docs/metrics.md");
    let names: std::collections::BTreeSet<&str> = text
        .lines()
        .filter(|l| l.starts_with("ferry_autoscaler_"))
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    assert!(names.len() >= 8, "{names:?}");
    for n in names {
        assert!(
            catalogue.contains(&format!("`{n}`")),
            "{n} is not in docs/metrics.md"
        );
    }

    // Every role stops cleanly on SIGTERM.
    for p in &mut procs {
        let status = p.stop(Duration::from_secs(60)).await?;
        assert_eq!(status.code(), Some(0), "{}", p.log());
    }
    Ok(())
}
