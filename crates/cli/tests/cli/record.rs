//! The durable record end to end: a gateway and workers (each running a recorder) against a real redis-server
//! and a real PostgreSQL (ferry-testkit). Jobs flow, PostgreSQL stops, recorders are killed; afterwards every
//! job has exactly one `jobs` row in its final state and exactly its events in `job_events`.
//!
//! The 10,000-job run is an in-process cluster (`ferry_testkit::cluster`). The others are about processes and
//! stay `ferry` processes: the recorder's breaker is read from a worker's log, a recorder is killed with -9,
//! and readiness is read from a worker's admin listener.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use ferry_broker::{RedisBroker, prelude::*};
use ferry_core::{Kind, NewJob, QueueName};
use ferry_testkit::cluster::Cluster as InProcess;
use ferry_testkit::{PostgresServer, RedisServer, eventually};
use serde_json::{Value, json};

use crate::support::{
    self, Proc, completions_total, count_completions, enqueue_many, ferry, migrated_database,
    until_healthy,
};

const SECRET: &str = "record-test-secret-0123456789abcdef";

/// A `ferry gateway` on port 0 on `redis`, with the record at `db`, once it listens: the process and its
/// address. Its stderr is kept the same way.
async fn spawn_gateway(redis: &str, db: &str) -> Result<(Proc, String)> {
    let args = [
        "gateway",
        "--redis",
        redis,
        "--jwt-secret",
        SECRET,
        "--database-url",
        db,
    ];
    Proc::spawn_gateway(&mut command(&args)).await
}

fn command(args: &[&str]) -> Command {
    let mut cmd = ferry();
    cmd.args(args)
        .env("FERRY_LOG", "warn,ferry_store=info,ferry_cli=info")
        .env_remove("FERRY_LOG_FORMAT")
        .env_remove("FERRY_DATABASE_URL")
        // Several workers on one machine: no fixed admin port to fight over.
        .env("FERRY_ADMIN_LISTEN", "off")
        .stdin(Stdio::null())
        .stdout(Stdio::null());
    cmd
}

/// Redis + a migrated database, for `ferry` processes; reads the record through [`Record`].
struct Cluster {
    redis: RedisServer,
    pg: PostgresServer,
    record: Record,
}

impl std::ops::Deref for Cluster {
    type Target = Record;

    fn deref(&self) -> &Record {
        &self.record
    }
}

impl Cluster {
    fn start() -> Result<Self> {
        let redis = RedisServer::start()?;
        let pg = PostgresServer::start()?;
        let db = migrated_database(&pg, "record")?;
        Ok(Self {
            redis,
            pg,
            record: Record { db },
        })
    }

    /// `ferry worker` on `queue`, recording in the database, with `extra` flags.
    fn worker_command(&self, queue: &str, extra: &[&str]) -> Command {
        let url = self.redis.url();
        let mut args = vec![
            "worker",
            "--redis",
            &url,
            "--queues",
            queue,
            "--database-url",
            &self.record.db,
        ];
        args.extend_from_slice(extra);
        command(&args)
    }

    /// A worker whose stderr goes to a file (read by the test, printed if it fails).
    fn worker(&self, queue: &str, extra: &[&str]) -> Result<Proc> {
        Proc::spawn_logged(&mut self.worker_command(queue, extra))
    }

    /// A worker on `queue` whose admin listener is on port 0, once it listens: the process and that address.
    async fn worker_listening(&self, queue: &str) -> Result<(Proc, String)> {
        let mut cmd = self.worker_command(queue, &["--admin-listen", "127.0.0.1:0"]);
        let (proc, line) = Proc::spawn_listening(&mut cmd, "admin listening").await?;
        Ok((proc, support::announced(&line, "admin")?))
    }

    async fn broker(&self) -> Result<RedisBroker> {
        crate::support::test_broker(&self.redis.url()).await
    }
}

/// The record's database (its URL), read with `psql`.
struct Record {
    db: String,
}

impl Record {
    fn sql(&self, q: &str) -> Result<String> {
        Ok(ferry_testkit::psql(&self.db, q)?.trim().to_owned())
    }

    fn count(&self, q: &str) -> Result<u64> {
        let s = self.sql(q)?;
        s.parse().with_context(|| format!("{q} answered {s:?}"))
    }

    /// Waits (up to `within`) until `jobs` jobs are completed in PostgreSQL with three events each, lets any
    /// straggling redelivery land, then checks them with [`Record::assert_recorded_exactly`].
    async fn until_recorded(&self, jobs: u64, within: Duration, what: &str) -> Result<()> {
        eventually(within, what, || async {
            let completed = self.count("select count(*) from jobs where state = 'completed'")?;
            let events = self.count("select count(*) from job_events")?;
            ensure!(
                completed == jobs && events == jobs * 3,
                "{completed} completed jobs and {events} events recorded"
            );
            Ok(Some(()))
        })
        .await?;
        tokio::time::sleep(Duration::from_secs(1)).await;
        self.assert_recorded_exactly(jobs)
    }

    /// Every job of the test has one `jobs` row, completed, and exactly the events queued, active, completed
    /// in that order; no other event rows.
    fn assert_recorded_exactly(&self, jobs: u64) -> Result<()> {
        assert_eq!(self.count("select count(*) from jobs")?, jobs);
        assert_eq!(
            self.count("select count(*) from jobs where state = 'completed' and finished_at is not null and payload is not null")?,
            jobs
        );
        assert_eq!(self.count("select count(*) from job_events")?, jobs * 3);
        assert_eq!(
            self.count(
                "select count(*) from (select job_id, array_agg(type order by ord_ms, ord_seq, ord_n) t
                 from job_events group by job_id) s
                 where t = array['job.queued', 'job.active', 'job.completed']"
            )?,
            jobs,
            "each job's trail is queued, active, completed"
        );
        assert_eq!(
            self.count("select count(*) from job_events e left join jobs j on j.id = e.job_id where j.id is null")?,
            0
        );
        Ok(())
    }
}

fn noop() -> NewJob {
    NewJob::new(Kind::parse("ferry.noop").unwrap(), json!({ "n": 1 }))
}

/// 10,000 jobs submitted through a gateway and run by two workers, each with a recorder: an in-process
/// cluster (`ferry_testkit::cluster`), as nothing here is about the processes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_through_a_cluster_are_recorded_exactly_once() -> Result<()> {
    let cluster = InProcess::builder()
        .postgres()
        .worker(&["bulk"])
        .worker(&["bulk"])
        .start()
        .await?;
    let c = Record {
        db: cluster.postgres.as_ref().context("a PostgreSQL")?.url(),
    };
    let (worker_a, worker_b) = (cluster.worker(0).consumer(), cluster.worker(1).consumer());
    let client = cluster.client(0, "submitter", "jobs:submit jobs:read");
    let (http, base, token) = (&client.http, &client.base, &client.token);
    until_healthy(http, base, Duration::from_secs(30)).await?;
    let total = 10_000u64;
    for b in 0..10 {
        let jobs: Vec<Value> = (0..1000)
            .map(|i| json!({ "kind": "ferry.noop", "payload": { "n": b * 1000 + i } }))
            .collect();
        let r = http
            .post(format!("{base}/v1/queues/bulk/jobs/batch"))
            .bearer_auth(token)
            .header("x-request-id", format!("batch-{b}"))
            .json(&json!({ "jobs": jobs }))
            .send()
            .await?;
        assert!(r.status().is_success(), "batch {b}: {}", r.text().await?);
    }

    c.until_recorded(total, Duration::from_secs(180), "10,000 completed rows")
        .await?;
    // Who did what, and under which request.
    assert_eq!(
        c.count("select count(*) from job_events where type = 'job.queued' and actor = 'submitter' and correlation_id like 'batch-%'")?,
        total
    );
    assert_eq!(
        c.count(&format!("select count(*) from job_events where type <> 'job.queued' and actor in ('{worker_a}', '{worker_b}')"))?,
        total * 2
    );
    assert_eq!(
        c.count("select count(*) from jobs where owner = 'submitter' and correlation_id like 'batch-%' and attempts = 1")?,
        total
    );
    // The row updates of a job's life write no index (docs/store.md): PostgreSQL counts them as HOT. Measured
    // 94-98 % here, alone or with both cores busy; an index on a column that a transition changes makes it 0 %.
    // The rest are updates that found their page full because a snapshot (an autoanalyze, a slow recorder
    // transaction) held off pruning, which a loaded CI machine makes longer: 90 % failed there once, so the bar
    // is 75 %, still far from what a wrong index gives.
    let seen = std::cell::RefCell::new(String::new());
    let hot = eventually(
        Duration::from_secs(15),
        "HOT updates of jobs rows",
        || async {
            let row = c.sql(
                // Summed over the partitions of `jobs` (migrations/V3).
                "select sum(s.n_tup_upd) || ' ' || sum(s.n_tup_hot_upd) from pg_stat_user_tables s \
             join pg_inherits i on i.inhrelid = s.relid where i.inhparent = 'jobs'::regclass",
            )?;
            let (upd, hot) = row.split_once(' ').context("two counts")?;
            let (upd, hot): (f64, f64) = (upd.parse()?, hot.parse()?);
            *seen.borrow_mut() = format!("{hot} of {upd} updates HOT");
            Ok((upd > 0.0 && hot >= 0.75 * upd).then_some(()))
        },
    )
    .await;
    eprintln!("jobs: {}", seen.borrow());
    hot.with_context(|| seen.borrow().clone())?;
    // The gateway answers from the record: every job once through the pages, and a job's trail.
    let mut seen = std::collections::HashSet::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut url = format!("{base}/v1/jobs?queue=bulk&state=completed&limit=500");
        if let Some(c) = &cursor {
            url.push_str(&format!("&cursor={c}"));
        }
        let page: Value = http
            .get(url)
            .bearer_auth(token)
            .send()
            .await?
            .json()
            .await?;
        for j in page["jobs"].as_array().context("jobs")? {
            assert!(seen.insert(j["id"].as_str().context("id")?.to_owned()));
        }
        match page["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
    }
    assert_eq!(seen.len() as u64, total);
    let id = seen.iter().next().context("a job")?;
    let trail: Value = http
        .get(format!("{base}/v1/jobs/{id}/events"))
        .bearer_auth(token)
        .send()
        .await?
        .json()
        .await?;
    let types: Vec<&str> = trail["events"]
        .as_array()
        .context("events")?
        .iter()
        .filter_map(|e| e["type"].as_str())
        .collect();
    assert_eq!(
        types,
        ["job.queued", "job.active", "job.completed"],
        "{trail}"
    );
    cluster.shutdown().await;
    Ok(())
}

/// PostgreSQL stops for 30 s while jobs keep flowing: jobs keep completing, the recorder's breaker opens and
/// closes, and afterwards every job and event is in PostgreSQL.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_outage_of_thirty_seconds_loses_nothing() -> Result<()> {
    let mut c = Cluster::start()?;
    let worker = c.worker("steady", &["--consumer", "steady-worker"])?;
    let broker = c.broker().await?;
    let completed = count_completions(&broker).await?;
    let q = QueueName::parse("steady")?;

    // A steady stream of jobs for the whole test, 50 every 100 ms.
    let feeder = {
        let broker = c.broker().await?;
        let q = q.clone();
        tokio::spawn(async move {
            let mut sent = 0u64;
            let start = tokio::time::Instant::now();
            while start.elapsed() < Duration::from_secs(45) {
                broker.enqueue_batch(&q, vec![noop(); 50]).await?;
                sent += 50;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok(sent)
        })
    };
    eventually(Duration::from_secs(30), "the first rows", || async {
        Ok((c.count("select count(*) from jobs where state = 'completed'")? > 0).then_some(()))
    })
    .await?;

    c.pg.stop()?;
    let completed_at_stop = completions_total(&completed);
    tokio::time::sleep(Duration::from_secs(30)).await;
    let completed_in_outage = completions_total(&completed) - completed_at_stop;
    assert!(
        completed_in_outage > 1000,
        "jobs keep completing while PostgreSQL is down ({completed_in_outage} did)"
    );
    let log = worker.log();
    assert!(
        log.contains("breaker=open"),
        "the recorder's breaker opened:\n{log}"
    );
    c.pg.start_again()?;

    let sent = feeder.await??;
    c.until_recorded(sent, Duration::from_secs(120), "every job recorded")
        .await?;
    let log = worker.log();
    assert!(
        log.contains("circuit breaker closed"),
        "the breaker closed again:\n{log}"
    );
    Ok(())
}

/// A recorder killed with -9 while it holds a batch it read and did not write: another recorder takes those
/// entries over; nothing is lost and nothing recorded twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_killed_recorder_are_taken_over() -> Result<()> {
    let c = Cluster::start()?;
    // The victim holds whatever it reads for 60 s before writing it: killed long before then.
    let mut victim = c.worker(
        "takeover",
        &[
            "--consumer",
            "victim",
            "--recorder-max-delay-ms",
            "60000",
            "--recorder-batch",
            "1000000",
            "--visibility-timeout-ms",
            "2000",
            // Above its own longest hold (the 60 s delay): it is alive until the kill.
            "--recorder-reclaim-idle-ms",
            "120000",
        ],
    )?;
    let broker = c.broker().await?;
    let completed = count_completions(&broker).await?;
    let q = QueueName::parse("takeover")?;
    let total = 2000u64;
    enqueue_many(&broker, &q, 2000, noop()).await?;
    // The victim's recorder has read entries and sits on them.
    eventually(
        Duration::from_secs(60),
        "the victim to hold log entries",
        || async {
            let pending = c.redis.cli(&[
                "XPENDING",
                "ferry:events",
                "recorder",
                "-",
                "+",
                "10",
                "victim",
            ])?;
            Ok(
                (!pending.trim().is_empty() && completions_total(&completed) == total)
                    .then_some(()),
            )
        },
    )
    .await?;
    assert_eq!(c.count("select count(*) from job_events")?, 0);
    victim.kill9();

    let _survivor = c.worker(
        "takeover",
        &[
            "--consumer",
            "survivor",
            "--recorder-reclaim-idle-ms",
            "2000",
            "--recorder-write-timeout-ms",
            "400",
        ],
    )?;
    c.until_recorded(total, Duration::from_secs(90), "every job recorded")
        .await?;
    // The victim did the work; the survivor recorded it.
    assert_eq!(
        c.count(
            "select count(*) from job_events where type = 'job.completed' and actor = 'victim'"
        )?,
        total
    );
    let pending = c.redis.cli(&["XPENDING", "ferry:events", "recorder"])?;
    assert!(
        pending.trim_start().starts_with('0'),
        "nothing left pending: {pending}"
    );
    Ok(())
}

/// A `ferry worker` with a database keeps the record's time slots ahead of need and applies
/// `--record-retention`: with the slots after today dropped by hand and a job finished 40 days ago in a slot of
/// its own, the worker's first upkeep pass makes the slots ahead again and drops the old day, and says so in
/// its metrics.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_keeps_slots_ahead_and_drops_expired_days() -> Result<()> {
    let c = Cluster::start()?;
    let ahead =
        c.sql("select substr(name, 6) from ferry_partitions('jobs') where lower > now()")?;
    ensure!(
        ahead.lines().count() == 3,
        "the migration made three slots ahead: {ahead}"
    );
    for suffix in ahead.lines() {
        c.sql(&format!(
            "drop table jobs_{suffix}; drop table job_events_{suffix}"
        ))?;
    }
    c.sql(
        "select ferry_create_partitions(date_trunc('day', now() - interval '40 days', 'UTC'), \
         date_trunc('day', now() - interval '40 days', 'UTC') + interval '1 day')",
    )?;
    c.sql(
        "insert into jobs (id, queue, kind, state, attempts, created_at, updated_at, finished_at, ord_ms, ord_seq, \
         ord_n) select ferry_uuid_floor(t), 'old', 'k', 'completed', 1, t, t, t, 1, 0, 0 \
         from (select now() - interval '40 days' as t) x",
    )?;
    ensure!(
        c.sql("select tableoid::regclass from jobs")? != "jobs_default",
        "the old job is in its day's slot"
    );
    let mut cmd = c.worker_command(
        "upkeep",
        &["--admin-listen", "127.0.0.1:0", "--record-retention", "30d"],
    );
    let (_worker, line) = Proc::spawn_listening(&mut cmd, "admin listening").await?;
    let admin = format!("http://{}", support::announced(&line, "admin")?);
    eventually(
        Duration::from_secs(30),
        "slots ahead again, the old day gone",
        || async {
            let ahead =
                c.count("select count(*) from ferry_partitions('jobs') where lower > now()")?;
            let old = c.count("select count(*) from jobs")?;
            Ok((ahead >= 3 && old == 0).then_some(()))
        },
    )
    .await?;
    assert_eq!(
        c.count(
            "select count(*) from ferry_partitions('jobs') where upper < now() - interval '30 days'"
        )?,
        0
    );
    let metrics = reqwest::get(format!("{admin}/metrics"))
        .await?
        .text()
        .await?;
    assert!(
        metrics.contains("ferry_record_partitions_dropped_total 1"),
        "{metrics}"
    );
    Ok(())
}

/// With the record, finished jobs leave Redis once recorded, and the gateway answers for them from PostgreSQL
/// as it did from Redis: a completed job (payload and result), a cancelled one; a cancel of a finished job is
/// still a conflict, and its job channel can still be subscribed to. A dead job stays in Redis (retryable).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_leave_redis_once_recorded_and_answer_from_the_record() -> Result<()> {
    let c = Cluster::start()?;
    let (_gateway, gw) = spawn_gateway(&c.redis.url(), &c.record.db).await?;
    let base = format!("http://{gw}");
    let _worker = c.worker("gone", &[])?;
    let http = reqwest::Client::new();
    let token = support::token(SECRET, "alice", &["admin"], Duration::from_secs(600));
    let pad = "x".repeat(2_000);
    let echo = json!({"kind": "ferry.echo", "payload": {"pad": pad}});
    let (done, _) = support::submit(&http, &base, &token, "gone", &echo, &[]).await?;
    let later = json!({"kind": "ferry.noop", "payload": {}, "delay_ms": 600_000});
    let (cancelled, _) = support::submit(&http, &base, &token, "gone", &later, &[]).await?;
    let r = http
        .delete(format!("{base}/v1/jobs/{cancelled}"))
        .bearer_auth(&token)
        .send()
        .await?;
    ensure!(r.status() == 200, "cancel answered {}", r.status());
    let fail = json!({"kind": "ferry.fail", "payload": {"error": "no"}, "max_attempts": 1});
    let (dead, _) = support::submit(&http, &base, &token, "gone", &fail, &[]).await?;

    let redis = |args: &[&str]| -> Result<String> { Ok(c.redis.cli(args)?.trim().to_owned()) };
    eventually(
        Duration::from_secs(30),
        "the completed and the cancelled job gone from Redis",
        || async {
            let records = redis(&["HKEYS", "ferry:{gone}:jobs"])?;
            let notes = redis(&["LLEN", "ferry:{gone}:done"])?;
            Ok((records == dead && notes == "0").then_some(()))
        },
    )
    .await?;
    // The completed job's stream entry (its payload) went with its record; the dead job's too, since its
    // dead-letter entry holds its spec.
    assert_eq!(redis(&["XLEN", "ferry:{gone}:p1"])?, "0");
    assert_eq!(redis(&["XLEN", "ferry:{gone}:dead"])?, "1");

    let get = |id: String| {
        let (http, base, token) = (http.clone(), base.clone(), token.clone());
        async move {
            let r = http
                .get(format!("{base}/v1/jobs/{id}"))
                .bearer_auth(&token)
                .send()
                .await?;
            ensure!(r.status() == 200, "GET {id} answered {}", r.status());
            anyhow::Ok(r.json::<Value>().await?)
        }
    };
    let j = get(done.clone()).await?;
    assert_eq!(j["state"], "completed");
    assert_eq!(j["payload"], json!({"pad": pad}));
    assert_eq!(j["result"], json!({"pad": pad}));
    assert_eq!(
        (j["attempts"].as_u64(), j["queue"].as_str()),
        (Some(1), Some("gone"))
    );
    assert_eq!(get(cancelled.clone()).await?["state"], "cancelled");
    assert_eq!(get(dead.clone()).await?["state"], "dead");

    let r = http
        .delete(format!("{base}/v1/jobs/{done}"))
        .bearer_auth(&token)
        .send()
        .await?;
    assert_eq!(r.status(), 409, "a finished job only in the record");
    let body: Value = r.json().await?;
    assert!(
        body["detail"].as_str().unwrap_or("").contains("completed"),
        "{body}"
    );

    let (mut ws, _) =
        tokio_tungstenite::connect_async(format!("ws://{gw}/v1/ws?token={token}")).await?;
    use futures::{SinkExt, StreamExt};
    ws.send(tokio_tungstenite::tungstenite::Message::text(
        json!({"id": 1, "op": "subscribe", "channel": format!("job:{done}")}).to_string(),
    ))
    .await?;
    let reply = loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await?
            .context("the socket closed")??;
        if let tokio_tungstenite::tungstenite::Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str())?;
            if v["id"] == 1 {
                break v;
            }
        }
    };
    assert_eq!(reply["ok"], true, "{reply}");
    Ok(())
}

/// Readiness means "can serve its traffic": with PostgreSQL stopped, a gateway and a worker stay ready (200),
/// say `degraded` with the `postgres` check false, still accept and run jobs, and export
/// `ferry_dependency_up{dependency="postgres"} 0`; with Redis stopped too, both are unready (503).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_degrades_readiness_and_redis_down_fails_it() -> Result<()> {
    let mut c = Cluster::start()?;
    let (_gateway, gw) = spawn_gateway(&c.redis.url(), &c.record.db).await?;
    let (_worker, admin) = c.worker_listening("degraded").await?;
    let http = reqwest::Client::new();
    let (gw, admin) = (format!("http://{gw}"), format!("http://{admin}"));
    for base in [&gw, &admin] {
        let body = support::until_ready(&http, base, Duration::from_secs(30)).await?;
        assert_eq!(body["status"], "ready", "{base}: {body}");
        assert_eq!(body["checks"]["postgres"]["ok"], true, "{base}: {body}");
    }

    c.pg.stop()?;
    for base in [&gw, &admin] {
        eventually(Duration::from_secs(30), "postgres seen down", || {
            let http = &http;
            async move {
                let (_, body) = support::readyz(http, base).await?;
                Ok((body["checks"]["postgres"]["ok"] == false).then_some(()))
            }
        })
        .await?;
        // PostgreSQL stays down: this answer is the degraded one.
        let (status, body) = support::readyz(&http, base).await?;
        assert_eq!(body["checks"]["postgres"]["ok"], false, "{base}: {body}");
        assert_eq!(status, 200, "{base}: {body}");
        assert_eq!(body["status"], "degraded", "{base}: {body}");
        assert_eq!(body["checks"]["redis"]["ok"], true, "{base}: {body}");
        let metrics = http
            .get(format!("{base}/metrics"))
            .send()
            .await?
            .text()
            .await?;
        assert!(
            metrics.contains("ferry_dependency_up{dependency=\"postgres\"} 0")
                && metrics.contains("ferry_dependency_up{dependency=\"redis\"} 1"),
            "{base}: {metrics}"
        );
    }
    // Jobs are still accepted and run.
    let token = support::token(
        SECRET,
        "submitter",
        &["jobs:submit", "jobs:read"],
        Duration::from_secs(3600),
    );
    let (id, _) = support::submit(
        &http,
        &gw,
        &token,
        "degraded",
        &json!({"kind": "ferry.noop"}),
        &[],
    )
    .await?;
    support::until_completed(&http, &gw, &token, &id, Duration::from_secs(30)).await?;

    c.redis.stop()?;
    for base in [&gw, &admin] {
        eventually(Duration::from_secs(30), "unready without redis", || {
            let http = &http;
            async move { Ok((support::readyz(http, base).await?.0 == 503).then_some(())) }
        })
        .await?;
        let (_, body) = support::readyz(&http, base).await?;
        assert_eq!(body["status"], "unready", "{base}: {body}");
        assert_eq!(body["checks"]["redis"]["ok"], false, "{base}: {body}");
    }
    Ok(())
}
