//! The PostgreSQL store: `jobs` and `job_events`, partitioned by time slot (schema in `migrations/`, described in
//! `docs/store.md`) behind a deadpool connection pool, with an optional second pool on a read replica for
//! [`Store::job`], [`Store::jobs`] and [`Store::events`].
//!
//! [`Store::record`] is one transaction of set-based statements, whatever the batch size: the events go into
//! `job_events` by one binary `COPY` (or, when one is already there, one `INSERT … SELECT FROM UNNEST(…) ON
//! CONFLICT DO NOTHING`), and the batch, folded per job in Rust first ([`fold`]), goes into `jobs`: the rows of
//! jobs the batch starts by `COPY`, the others through one `UNNEST` upsert whose `ON CONFLICT` clause applies the
//! ordering rule (the state-bearing columns move only to a greater order key, the spec columns are filled in
//! whenever they are missing), in id order either way. [`Store::maintain`] creates time slots ahead and drops
//! expired ones (`ferry_create_partitions`, `ferry_drop_partition`).
//!
//! Times cross the wire as `i64` milliseconds and are converted in SQL (`to_timestamp(ms / 1000.0)` is exact to
//! the millisecond: PostgreSQL rounds to the microsecond), or as `SystemTime` in a `COPY`; they are read back as
//! `(extract(epoch from x) * 1000)::bigint`.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use deadpool_postgres::{
    Manager, ManagerConfig, Object, Pool, PoolError, RecyclingMethod, Runtime,
};
use ferry_core::{
    Backoff, DEFAULT_MAX_ATTEMPTS, Event, EventType, JobId, JobInfo, JobSpec, JobState, Kind,
    Priority, QueueName, Redactor, redact_url,
};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio_postgres::types::ToSql;
use tokio_postgres::{NoTls, Row, Statement};
use uuid::Uuid;

use crate::maintenance::{MaintenanceConfig, MaintenanceReport};
use crate::memory::{
    JobFold, created_ms, distinct_events, duplicate_completions, fold, id_floor, order_key,
};
use crate::{EventRecord, JobPage, JobQuery, Store, StoreError, tls};

mod embedded {
    refinery::embed_migrations!("migrations");
}

/// Connection settings of a [`PgStore`].
#[derive(Clone)]
pub struct PgConfig {
    /// `postgres://user[:password]@host[:port]/database[?options]`. Never logged: `Debug` and errors hide the
    /// password. `sslmode=disable|prefer|require|verify-ca|verify-full` chooses TLS as libpq does (see
    /// [`crate::tls`]); `prefer` when absent.
    pub url: String,
    /// PEM CA certificate(s) to trust for `sslmode=verify-ca|verify-full` (and `require`, which then checks the
    /// chain), instead of the system trust store. Default none.
    pub ca_file: Option<std::path::PathBuf>,
    /// Most connections the pool opens. Default 16.
    pub pool_size: usize,
    /// Limit on opening one connection (TCP, TLS handshake, startup, authentication). Default 5 s.
    pub connect_timeout: Duration,
    /// Limit on waiting for a free pooled connection when all are busy. Default 5 s.
    pub wait_timeout: Duration,
    /// `statement_timeout` of every connection (set in the startup options): a statement running longer is
    /// cancelled by the server. Default 30 s.
    pub statement_timeout: Duration,
    /// Prepare each statement once per connection and reuse it (true), or prepare it on every call (false, for
    /// poolers in transaction mode that cannot keep prepared statements). Default true.
    pub statement_cache: bool,
    /// A replica (or any other server with the same record) for listings, lookups and trails: [`Store::job`],
    /// [`Store::jobs`], [`Store::events`]. Writes, the reconciler's reads and upkeep stay on `url`. When the
    /// replica does not answer, reads go to `url` for [`READER_REST`]. Same settings as `url` otherwise (pool
    /// size, CA file, timeouts). Default none.
    pub read_url: Option<String>,
}

/// How long reads stay on the primary after the replica failed to answer one.
pub const READER_REST: Duration = Duration::from_secs(5);

impl PgConfig {
    /// `url` with every other setting at its default.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            ca_file: None,
            pool_size: 16,
            connect_timeout: Duration::from_secs(5),
            wait_timeout: Duration::from_secs(5),
            statement_timeout: Duration::from_secs(30),
            statement_cache: true,
            read_url: None,
        }
    }
}

impl fmt::Debug for PgConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PgConfig")
            .field("url", &redact_url(&self.url))
            .field("ca_file", &self.ca_file)
            .field("pool_size", &self.pool_size)
            .field("connect_timeout", &self.connect_timeout)
            .field("wait_timeout", &self.wait_timeout)
            .field("statement_timeout", &self.statement_timeout)
            .field("statement_cache", &self.statement_cache)
            .field("read_url", &self.read_url.as_deref().map(redact_url))
            .finish()
    }
}

/// The PostgreSQL [`Store`].
#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    statement_cache: bool,
    /// Scrubs the URL's password from anything that leaves this module (driver errors quote it).
    redactor: Redactor,
    /// `job.completed` events stored as `job.duplicate_completion` by this store.
    duplicate_completions: std::sync::Arc<AtomicU64>,
    /// The store of `PgConfig::read_url`, and until when (ms since the epoch) it is rested after a failure.
    reader: Option<(std::sync::Arc<PgStore>, std::sync::Arc<AtomicU64>)>,
}

impl fmt::Debug for PgStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.pool.status();
        f.debug_struct("PgStore")
            .field("pool_size", &s.size)
            .field("pool_max_size", &s.max_size)
            .field("statement_cache", &self.statement_cache)
            .finish()
    }
}

impl PgStore {
    /// Build the pool. No connection is opened yet: the database need not be up (see [`Store::ping`]).
    pub fn connect(cfg: PgConfig) -> Result<Self, StoreError> {
        let url_redactor = Redactor::for_url(&cfg.url);
        let (url, ssl_mode) = tls::split_sslmode(&cfg.url).map_err(|e| {
            StoreError::Internal(url_redactor.apply(&format!("invalid PostgreSQL URL: {e}")))
        })?;
        let mut pg: tokio_postgres::Config = url.parse().map_err(|e| {
            StoreError::Internal(url_redactor.apply(&format!("invalid PostgreSQL URL: {e}")))
        })?;
        pg.ssl_mode(ssl_mode.driver());
        let connector = tls::connector(ssl_mode, cfg.ca_file.as_deref())
            .map_err(|e| StoreError::Internal(format!("PostgreSQL TLS: {e}")))?;
        // The password as the driver parsed it too (decoded, or from a `key=value` string).
        let redactor = match pg.get_password() {
            Some(pw) => url_redactor.secret(&String::from_utf8_lossy(pw)),
            None => url_redactor,
        };
        let statement_timeout =
            format!("-c statement_timeout={}", cfg.statement_timeout.as_millis());
        let options = match pg.get_options() {
            Some(o) if !o.trim().is_empty() => format!("{o} {statement_timeout}"),
            _ => statement_timeout,
        };
        pg.options(options).connect_timeout(cfg.connect_timeout);
        // Verified: a pooled connection is checked with a round trip before reuse, so connections broken by a
        // server restart are dropped and replaced instead of failing the next call.
        let manager_config = ManagerConfig {
            recycling_method: RecyclingMethod::Verified,
        };
        let manager = match connector {
            Some(tls) => Manager::from_config(pg, tls, manager_config),
            None => Manager::from_config(pg, NoTls, manager_config),
        };
        let pool = Pool::builder(manager)
            .max_size(cfg.pool_size.max(1))
            .wait_timeout(Some(cfg.wait_timeout))
            .create_timeout(Some(cfg.connect_timeout))
            .recycle_timeout(Some(cfg.connect_timeout))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| {
                StoreError::Internal(redactor.apply(&format!("cannot build pool: {e}")))
            })?;
        let reader = match &cfg.read_url {
            Some(url) => {
                let replica = PgConfig {
                    url: url.clone(),
                    read_url: None,
                    ..cfg.clone()
                };
                Some((
                    std::sync::Arc::new(Self::connect(replica)?),
                    Default::default(),
                ))
            }
            None => None,
        };
        Ok(Self {
            pool,
            statement_cache: cfg.statement_cache,
            redactor,
            duplicate_completions: Default::default(),
            reader,
        })
    }

    /// The replica's store when one is configured and not resting after a failure.
    fn reader(&self) -> Option<&PgStore> {
        let (store, rest_until) = self.reader.as_ref()?;
        (ferry_core::now_ms() >= rest_until.load(Ordering::Relaxed)).then_some(&**store)
    }

    /// A read on the replica failed with `e`: rest it when it did not answer (or cancelled the query for
    /// recovery, SQLSTATE 40001), and say whether to read from the primary instead.
    fn reader_failed(&self, e: &StoreError) -> bool {
        let Some((_, rest_until)) = &self.reader else {
            return false;
        };
        let fall_back = match e {
            StoreError::Unavailable(_) => true,
            StoreError::Internal(m) => m.contains("conflict with recovery"),
        };
        if fall_back {
            rest_until.store(
                ferry_core::now_ms() + READER_REST.as_millis() as u64,
                Ordering::Relaxed,
            );
            tracing::warn!(error = %e, rest_ms = READER_REST.as_millis() as u64,
                "the read replica failed; reading from the primary");
        }
        fall_back
    }

    /// Apply the embedded migrations that are not applied yet (under an advisory lock, so nodes starting
    /// together take turns); returns the names (`V1__jobs`) of those applied now.
    pub async fn migrate(&self) -> Result<Vec<String>, StoreError> {
        self.migrate_to(None).await
    }

    /// [`migrate`](Self::migrate), stopping after migration `version` when given (upgrade tests start from an
    /// older schema this way).
    pub async fn migrate_to(&self, version: Option<u32>) -> Result<Vec<String>, StoreError> {
        /// Arbitrary, constant: "ferry" in ASCII.
        const LOCK: i64 = 0x0066_6572_7279;
        let mut client = self.client().await?;
        client
            .execute("SELECT pg_advisory_lock($1)", &[&LOCK])
            .await
            .map_err(|e| self.pg_err(e))?;
        let mut runner = embedded::migrations::runner();
        if let Some(v) = version {
            runner = runner.set_target(refinery::Target::Version(v));
        }
        let report = runner.run_async(&mut **client).await;
        let unlock = client
            .execute("SELECT pg_advisory_unlock($1)", &[&LOCK])
            .await;
        let report = report.map_err(|e| self.migration_err(e))?;
        unlock.map_err(|e| self.pg_err(e))?;
        Ok(report
            .applied_migrations()
            .iter()
            .map(ToString::to_string)
            .collect())
    }

    /// `(size, available, waiting)`: connections open, idle connections, callers waiting for one.
    pub fn pool_status(&self) -> (usize, usize, usize) {
        let s = self.pool.status();
        (s.size, s.available, s.waiting)
    }

    async fn client(&self) -> Result<Object, StoreError> {
        self.pool.get().await.map_err(|e| match e {
            PoolError::Backend(e) => self.pg_err(e),
            PoolError::Timeout(_) | PoolError::Closed => {
                StoreError::Unavailable(self.redactor.apply(&e.to_string()))
            }
            other => StoreError::Internal(self.redactor.apply(&other.to_string())),
        })
    }

    async fn prepare(&self, client: &Object, sql: &str) -> Result<Statement, StoreError> {
        let stmt = if self.statement_cache {
            client.prepare_cached(sql).await
        } else {
            client.prepare(sql).await
        };
        stmt.map_err(|e| self.pg_err(e))
    }

    /// Map a driver error, classified by [`is_transient`], with the password redacted.
    fn pg_err(&self, e: tokio_postgres::Error) -> StoreError {
        // The database's message may sit deeper in the source chain than the driver's `Display` shows.
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            let text = s.to_string();
            if !msg.contains(&text) {
                msg = format!("{msg}: {text}");
            }
            source = s.source();
        }
        let msg = self.redactor.apply(&msg);
        if is_transient(&e) {
            StoreError::Unavailable(msg)
        } else {
            StoreError::Internal(msg)
        }
    }

    /// A migration failed: unavailable if the driver error underneath is transient, else internal.
    fn migration_err(&self, e: refinery::Error) -> StoreError {
        let msg = self.redactor.apply(&format!("migration failed: {e}"));
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            if s.downcast_ref::<tokio_postgres::Error>()
                .is_some_and(is_transient)
            {
                return StoreError::Unavailable(msg);
            }
            source = s.source();
        }
        StoreError::Internal(msg)
    }

    fn corrupt(&self, what: impl fmt::Display) -> StoreError {
        StoreError::Internal(format!("unreadable row: {what}"))
    }

    fn info(&self, row: &Row) -> Result<JobInfo, StoreError> {
        let id = JobId(row.get::<_, Uuid>("id"));
        let payload: Option<Value> = row.get("payload");
        let known = payload.is_some();
        let text = |c: &str| row.get::<_, Option<String>>(c);
        let priority = match text("priority") {
            Some(p) => parse_text::<Priority>(&p).map_err(|e| self.corrupt(e))?,
            None => Priority::Normal,
        };
        let backoff = match row.get::<_, Option<Value>>("backoff") {
            Some(b) => serde_json::from_value(b).map_err(|e| self.corrupt(e))?,
            None => Backoff::default(),
        };
        let ms = |c: &str| row.get::<_, Option<i64>>(c).map(|v| v.max(0) as u64);
        Ok(JobInfo {
            id,
            queue: QueueName::parse(row.get::<_, String>("queue")).map_err(|e| self.corrupt(e))?,
            state: parse_text(row.get("state")).map_err(|e| self.corrupt(e))?,
            attempts: row.get::<_, i32>("attempts").max(0) as u32,
            spec: JobSpec {
                kind: Kind::parse(row.get::<_, String>("kind")).map_err(|e| self.corrupt(e))?,
                payload: payload.unwrap_or(Value::Null),
                priority,
                max_attempts: row
                    .get::<_, Option<i32>>("max_attempts")
                    .filter(|_| known)
                    .map_or(DEFAULT_MAX_ATTEMPTS, |n| n.max(0) as u32),
                timeout_ms: ms("timeout_ms"),
                backoff,
                owner: text("owner"),
                tenant: text("tenant"),
                correlation_id: text("correlation_id"),
                // Not kept in the record (yet): the trace id is in the job's log lines.
                traceparent: None,
                created_at: created_ms(id),
            },
            result: row.get("result"),
            error: text("error"),
            run_at: ms("run_at_ms"),
            updated_at: ms("updated_at_ms").unwrap_or(0),
        })
    }
}

/// One time slot of the record: a partition of `jobs` (and its twin of `job_events`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Partition {
    /// The `jobs` partition's name (`jobs_p20261205`); the events' is `job_events_p20261205`.
    pub name: String,
    /// The slot's start, ms since the Unix epoch (inclusive).
    pub lower_ms: u64,
    /// The slot's end, ms since the Unix epoch (exclusive).
    pub upper_ms: u64,
}

impl PgStore {
    /// Create the time slots of `width` (aligned to the Unix epoch) that meet `[since_ms, upto_ms)` and do not
    /// exist yet, for both tables (`ferry_create_partitions`, migrations/V3); returns how many. Gives up with
    /// `Ok(None)` when the tables' locks are not free within `lock_timeout` (retried at the next pass).
    pub async fn create_partitions(
        &self,
        since_ms: u64,
        upto_ms: u64,
        width: Duration,
        lock_timeout: Duration,
    ) -> Result<Option<u64>, StoreError> {
        let mut client = self.client().await?;
        let tx = client.transaction().await.map_err(|e| self.pg_err(e))?;
        self.set_lock_timeout(&tx, lock_timeout).await?;
        let row = tx
            .query_one(
                "SELECT ferry_create_partitions(to_timestamp($1::bigint / 1000.0), \
                 to_timestamp($2::bigint / 1000.0), make_interval(secs => $3::bigint))",
                &[
                    &ms(since_ms),
                    &ms(upto_ms),
                    &i64::try_from(width.as_secs()).unwrap_or(i64::MAX),
                ],
            )
            .await;
        let made: i32 = match row {
            Ok(r) => r.get(0),
            Err(e) if lock_not_available(&e) => return Ok(None),
            Err(e) => return Err(self.pg_err(e)),
        };
        tx.commit().await.map_err(|e| self.pg_err(e))?;
        Ok(Some(u64::try_from(made).unwrap_or(0)))
    }

    /// `SET LOCAL lock_timeout` for the rest of `tx`.
    async fn set_lock_timeout(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        lock_timeout: Duration,
    ) -> Result<(), StoreError> {
        tx.batch_execute(&format!(
            "SET LOCAL lock_timeout = {}",
            lock_timeout.as_millis().max(1)
        ))
        .await
        .map_err(|e| self.pg_err(e))
    }

    /// The time slots of the record, oldest first.
    pub async fn partitions(&self) -> Result<Vec<Partition>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT name, (extract(epoch FROM lower) * 1000)::bigint, \
                 (extract(epoch FROM upper) * 1000)::bigint FROM ferry_partitions('jobs')",
                &[],
            )
            .await
            .map_err(|e| self.pg_err(e))?;
        Ok(rows
            .iter()
            .map(|r| Partition {
                name: r.get(0),
                lower_ms: r.get::<_, i64>(1).max(0) as u64,
                upper_ms: r.get::<_, i64>(2).max(0) as u64,
            })
            .collect())
    }

    /// Drop one slot past the retention (`ferry_drop_partition`), keeping its jobs not finished or finished at or
    /// after `cutoff_ms` (they move to the default partitions with their events). The jobs to keep are read
    /// first, with no lock beyond a reader's; the drop itself is one transaction that waits at most
    /// `lock_timeout` for each lock and, under the exclusive lock, only looks rows up by key. Returns the jobs kept
    /// and how long that transaction took, or `None` when the locks were not free (after a few tries), another
    /// node is at it, or the slot is gone.
    pub async fn drop_partition(
        &self,
        name: &str,
        cutoff_ms: u64,
        lock_timeout: Duration,
    ) -> Result<Option<(u64, Duration)>, StoreError> {
        let mut client = self.client().await?;
        // The jobs to keep as of this read: open, or finished since the cutoff. A job that becomes open later
        // (a dead job retried) is in `jobs_open` under the lock; only one retried and finished again between this
        // read and the lock would go, and it is finished.
        let keep: Vec<Uuid> = client
            .query(
                &format!(
                    "SELECT id FROM {} WHERE finished_at IS NULL OR finished_at >= to_timestamp($1::bigint / 1000.0)",
                    quote_ident(name)
                ),
                &[&ms(cutoff_ms)],
            )
            .await
            .map_err(|e| self.pg_err(e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for attempt in 1..=5u32 {
            let started = std::time::Instant::now();
            let tx = client.transaction().await.map_err(|e| self.pg_err(e))?;
            self.set_lock_timeout(&tx, lock_timeout).await?;
            let kept = tx
                .query_one("SELECT ferry_drop_partition($1, $2)", &[&name, &keep])
                .await;
            match kept {
                Ok(row) => {
                    let kept: Option<i64> = row.get(0);
                    tx.commit().await.map_err(|e| self.pg_err(e))?;
                    return Ok(kept.map(|k| (k.max(0) as u64, started.elapsed())));
                }
                Err(e) if lock_not_available(&e) => {
                    drop(tx);
                    tracing::debug!(
                        partition = name,
                        attempt,
                        "retention drop: locks busy; retrying"
                    );
                    tokio::time::sleep(lock_timeout * attempt).await;
                }
                Err(e) => return Err(self.pg_err(e)),
            }
        }
        tracing::warn!(
            partition = name,
            "retention drop: the tables' locks stayed busy; retried at the next pass"
        );
        Ok(None)
    }
}

/// `name` as an SQL identifier (double-quoted, quotes doubled).
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// SQLSTATE 55P03: a lock not taken within `lock_timeout`.
fn lock_not_available(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE)
}

/// Retryable: connection trouble (no SQLSTATE but an IO cause or a closed connection; class 08), an operator
/// shutting the server down or refusing connections for now (57P), a server out of resources (53). Anything
/// else (a bug, a schema mismatch, bad data, a statement timeout) is not.
fn is_transient(e: &tokio_postgres::Error) -> bool {
    match e.code() {
        Some(code) => ["08", "57P", "53"]
            .iter()
            .any(|class| code.code().starts_with(class)),
        None => e.is_closed() || has_io_source(e),
    }
}

fn has_io_source(e: &tokio_postgres::Error) -> bool {
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    false
}

/// A unit enum (state, priority, event type) from its wire name.
fn parse_text<T: DeserializeOwned>(s: &str) -> Result<T, serde_json::Error> {
    serde_json::from_value(Value::String(s.to_owned()))
}

fn ms(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A time in milliseconds since the epoch as a `COPY` sends a `timestamptz`.
fn system_time(ms: i64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

/// The columns of a [`JobInfo`], times as milliseconds.
const JOB_COLUMNS: &str = "id, queue, kind, state, attempts, payload, priority, max_attempts, timeout_ms, \
     backoff, owner, tenant, correlation_id, result, error, \
     (extract(epoch FROM run_at) * 1000)::bigint AS run_at_ms, \
     (extract(epoch FROM updated_at) * 1000)::bigint AS updated_at_ms";

/// The completions already recorded for a batch's completed jobs (`job_events_pkey` by job).
const RECORDED_COMPLETIONS: &str = "\
SELECT job_id, id, type FROM job_events
WHERE job_id = ANY($1::uuid[]) AND type IN ('job.completed', 'job.duplicate_completion')";

const INSERT_EVENTS: &str = "\
INSERT INTO job_events (id, job_id, type, state, attempt, at, correlation_id, actor, data, ord_ms, ord_seq, ord_n)
SELECT e.id, e.job_id, e.type, e.state, e.attempt, to_timestamp(e.at / 1000.0), e.correlation_id, e.actor,
       e.data, e.ord_ms, e.ord_seq, e.ord_n
FROM UNNEST($1::text[], $2::uuid[], $3::text[], $4::text[], $5::int[], $6::bigint[], $7::text[], $8::text[],
            $9::jsonb[], $10::bigint[], $11::bigint[], $12::int[])
     AS e(id, job_id, type, state, attempt, at, correlation_id, actor, data, ord_ms, ord_seq, ord_n)
ON CONFLICT (job_id, id) DO NOTHING";

/// The upsert of one folded row per job. Built once from three column groups:
/// * moved only by a newer event (greater order key): state, attempts, result, error, run_at, updated_at,
///   finished_at and the key itself;
/// * the spec, taken whole from the first event that carries it (`payload IS NULL` = not known yet);
/// * owner / tenant / correlation_id: from the spec once known, else from whichever event named them.
static UPSERT_JOBS: LazyLock<String> = LazyLock::new(|| {
    const NEWER: &str =
        "(excluded.ord_ms, excluded.ord_seq, excluded.ord_n) > (j.ord_ms, j.ord_seq, j.ord_n)";
    let moved = [
        "state",
        "attempts",
        "result",
        "error",
        "run_at",
        "updated_at",
        "finished_at",
        "ord_ms",
        "ord_seq",
        "ord_n",
    ]
    // A completed record keeps its first completion: nothing leaves `completed`, so newer events are a rerun
    // after the engine lost that completion.
    .map(|c| {
        format!(
            "{c} = CASE WHEN {NEWER} AND j.state <> 'completed' THEN excluded.{c} ELSE j.{c} END"
        )
    });
    let spec = [
        "payload",
        "priority",
        "max_attempts",
        "timeout_ms",
        "backoff",
    ]
    .map(|c| format!("{c} = CASE WHEN j.payload IS NULL THEN excluded.{c} ELSE j.{c} END"));
    let named = ["owner", "tenant", "correlation_id"].map(|c| {
        format!(
            "{c} = CASE WHEN j.payload IS NULL AND excluded.payload IS NOT NULL THEN excluded.{c} \
             ELSE COALESCE(j.{c}, excluded.{c}) END"
        )
    });
    format!(
        "\
INSERT INTO jobs AS j (id, queue, kind, state, attempts, payload, priority, max_attempts, timeout_ms, backoff,
                       owner, tenant, correlation_id, result, error, run_at, created_at, updated_at, finished_at,
                       ord_ms, ord_seq, ord_n)
SELECT u.id, u.queue, u.kind, u.state, u.attempts, u.payload, u.priority, u.max_attempts, u.timeout_ms, u.backoff,
       u.owner, u.tenant, u.correlation_id, u.result, u.error, to_timestamp(u.run_at / 1000.0),
       to_timestamp(u.created_at / 1000.0), to_timestamp(u.updated_at / 1000.0),
       to_timestamp(u.finished_at / 1000.0), u.ord_ms, u.ord_seq, u.ord_n
FROM UNNEST($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::jsonb[], $7::text[], $8::int[],
            $9::bigint[], $10::jsonb[], $11::text[], $12::text[], $13::text[], $14::jsonb[], $15::text[],
            $16::bigint[], $17::bigint[], $18::bigint[], $19::bigint[], $20::bigint[], $21::bigint[], $22::int[])
     AS u(id, queue, kind, state, attempts, payload, priority, max_attempts, timeout_ms, backoff, owner, tenant,
          correlation_id, result, error, run_at, created_at, updated_at, finished_at, ord_ms, ord_seq, ord_n)
ON CONFLICT (id) DO UPDATE SET {}",
        moved.iter().chain(&spec).chain(&named).cloned().collect::<Vec<_>>().join(",\n    ")
    )
});

/// [`UPSERT_JOBS`] putting the ids of the jobs it left open into `jobs_open` (the reconciler's candidates,
/// migrations/V2) in the same statement, and returning the ids of those it left final, which [`CLOSE_OPEN`]
/// then takes out. Ordered by id like the upsert, and under the `jobs` row locks the upsert holds, so concurrent
/// batches cannot deadlock on it.
///
/// The removal is a statement of its own because of what it must see. When this upsert waits for another
/// transaction that is inserting the same new job (its `job.queued` batch, with the job's `jobs_open` entry) and
/// then makes the job final, that entry was committed after this statement's snapshot: a `DELETE` in the same
/// statement does not see it, and the entry of a finished job stays for good (measured before this split: 0.5 %
/// of the jobs of a sustained 14,000 jobs/s run). The next statement has a new snapshot, taken after the wait.
static UPSERT_JOBS_AND_OPEN: LazyLock<String> = LazyLock::new(|| {
    format!(
        "\
WITH up AS (
{}
RETURNING j.id, j.finished_at IS NULL AS open
), opened AS (
INSERT INTO jobs_open (id) SELECT id FROM up WHERE open ORDER BY id ON CONFLICT DO NOTHING
)
SELECT id FROM up WHERE NOT open ORDER BY id",
        *UPSERT_JOBS
    )
});

/// Take the ids of jobs left final by [`UPSERT_JOBS_AND_OPEN`] out of `jobs_open`.
const CLOSE_OPEN: &str = "DELETE FROM jobs_open WHERE id = ANY($1::uuid[])";

/// The `job_events` columns of a batch, one array per column.
#[derive(Default)]
struct EventColumns {
    id: Vec<String>,
    job_id: Vec<Uuid>,
    ty: Vec<&'static str>,
    state: Vec<&'static str>,
    attempt: Vec<i32>,
    at: Vec<i64>,
    correlation_id: Vec<Option<String>>,
    actor: Vec<Option<String>>,
    data: Vec<Option<Value>>,
    ord_ms: Vec<i64>,
    ord_seq: Vec<i64>,
    ord_n: Vec<i32>,
}

impl EventColumns {
    /// `ty` is the event's type as stored (a duplicate completion is renamed).
    fn push(&mut self, e: &Event, ty: EventType) {
        let (k_ms, k_seq, k_n) = order_key(e);
        self.id.push(e.id.clone());
        self.job_id.push(e.job.0);
        self.ty.push(ty.as_str());
        self.state.push(e.state.as_str());
        self.attempt
            .push(i32::try_from(e.attempt).unwrap_or(i32::MAX));
        self.at.push(ms(e.at));
        self.correlation_id.push(e.correlation_id.clone());
        self.actor.push(e.actor.clone());
        self.data.push(e.data.clone());
        self.ord_ms.push(ms(k_ms));
        self.ord_seq.push(ms(k_seq));
        self.ord_n.push(i32::try_from(k_n).unwrap_or(i32::MAX));
    }

    /// `COPY job_events FROM STDIN BINARY` of these rows; returns the rows written.
    async fn copy_into(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<u64, tokio_postgres::Error> {
        use tokio_postgres::binary_copy::BinaryCopyInWriter;
        use tokio_postgres::types::Type;
        let sink = tx
            .copy_in(
                "COPY job_events (id, job_id, type, state, attempt, at, correlation_id, actor, data, ord_ms, \
                 ord_seq, ord_n) FROM STDIN BINARY",
            )
            .await?;
        let types = [
            Type::TEXT,
            Type::UUID,
            Type::TEXT,
            Type::TEXT,
            Type::INT4,
            Type::TIMESTAMPTZ,
            Type::TEXT,
            Type::TEXT,
            Type::JSONB,
            Type::INT8,
            Type::INT8,
            Type::INT4,
        ];
        let writer = BinaryCopyInWriter::new(sink, &types);
        let mut writer = std::pin::pin!(writer);
        for i in 0..self.id.len() {
            let at = system_time(self.at[i]);
            writer
                .as_mut()
                .write(&[
                    &self.id[i],
                    &self.job_id[i],
                    &self.ty[i],
                    &self.state[i],
                    &self.attempt[i],
                    &at,
                    &self.correlation_id[i],
                    &self.actor[i],
                    &self.data[i],
                    &self.ord_ms[i],
                    &self.ord_seq[i],
                    &self.ord_n[i],
                ])
                .await?;
        }
        writer.finish().await
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 12] {
        [
            &self.id,
            &self.job_id,
            &self.ty,
            &self.state,
            &self.attempt,
            &self.at,
            &self.correlation_id,
            &self.actor,
            &self.data,
            &self.ord_ms,
            &self.ord_seq,
            &self.ord_n,
        ]
    }
}

/// The `jobs` columns of a folded batch, one array per column.
#[derive(Default)]
struct JobColumns {
    id: Vec<Uuid>,
    queue: Vec<String>,
    kind: Vec<String>,
    state: Vec<&'static str>,
    attempts: Vec<i32>,
    payload: Vec<Option<Value>>,
    priority: Vec<Option<&'static str>>,
    max_attempts: Vec<Option<i32>>,
    timeout_ms: Vec<Option<i64>>,
    backoff: Vec<Option<Value>>,
    owner: Vec<Option<String>>,
    tenant: Vec<Option<String>>,
    correlation_id: Vec<Option<String>>,
    result: Vec<Option<Value>>,
    error: Vec<Option<String>>,
    run_at: Vec<Option<i64>>,
    created_at: Vec<i64>,
    updated_at: Vec<i64>,
    finished_at: Vec<Option<i64>>,
    ord_ms: Vec<i64>,
    ord_seq: Vec<i64>,
    ord_n: Vec<i32>,
}

impl JobColumns {
    fn push(&mut self, f: &JobFold<'_>) -> Result<(), StoreError> {
        let e = f.newest;
        let out = f.outcome();
        let spec = f.spec;
        self.id.push(e.job.0);
        self.queue.push(e.queue.as_str().to_owned());
        self.kind.push(e.kind.as_str().to_owned());
        self.state.push(e.state.as_str());
        self.attempts
            .push(i32::try_from(e.attempt).unwrap_or(i32::MAX));
        self.payload.push(spec.map(|s| s.payload.clone()));
        self.priority.push(spec.map(|s| priority_str(s.priority)));
        self.max_attempts
            .push(spec.map(|s| i32::try_from(s.max_attempts).unwrap_or(i32::MAX)));
        self.timeout_ms
            .push(spec.and_then(|s| s.timeout_ms).map(ms));
        self.backoff.push(
            spec.map(|s| serde_json::to_value(s.backoff))
                .transpose()
                .map_err(|e| StoreError::Internal(format!("cannot encode backoff: {e}")))?,
        );
        self.owner.push(f.owner.map(str::to_owned));
        self.tenant.push(f.tenant.map(str::to_owned));
        self.correlation_id
            .push(f.correlation_id.map(str::to_owned));
        self.result.push(out.result);
        self.error.push(out.error);
        self.run_at.push(out.run_at.map(ms));
        self.created_at.push(ms(created_ms(e.job)));
        self.updated_at.push(ms(e.at));
        self.finished_at.push(f.finished_at().map(ms));
        self.ord_ms.push(ms(f.key.0));
        self.ord_seq.push(ms(f.key.1));
        self.ord_n.push(i32::try_from(f.key.2).unwrap_or(i32::MAX));
        Ok(())
    }

    /// `COPY jobs FROM STDIN BINARY` of these rows, then `COPY jobs_open` of the open ones.
    async fn copy_into(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
    ) -> Result<(), tokio_postgres::Error> {
        use tokio_postgres::binary_copy::BinaryCopyInWriter;
        use tokio_postgres::types::Type;
        let sink = tx
            .copy_in(
                "COPY jobs (id, queue, kind, state, attempts, payload, priority, max_attempts, timeout_ms, backoff, \
                 owner, tenant, correlation_id, result, error, run_at, created_at, updated_at, finished_at, ord_ms, \
                 ord_seq, ord_n) FROM STDIN BINARY",
            )
            .await?;
        let types = [
            Type::UUID,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::INT4,
            Type::JSONB,
            Type::TEXT,
            Type::INT4,
            Type::INT8,
            Type::JSONB,
            Type::TEXT,
            Type::TEXT,
            Type::TEXT,
            Type::JSONB,
            Type::TEXT,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
            Type::TIMESTAMPTZ,
            Type::INT8,
            Type::INT8,
            Type::INT4,
        ];
        let writer = BinaryCopyInWriter::new(sink, &types);
        let mut writer = std::pin::pin!(writer);
        for i in 0..self.id.len() {
            let run_at = self.run_at[i].map(system_time);
            let created_at = system_time(self.created_at[i]);
            let updated_at = system_time(self.updated_at[i]);
            let finished_at = self.finished_at[i].map(system_time);
            writer
                .as_mut()
                .write(&[
                    &self.id[i],
                    &self.queue[i],
                    &self.kind[i],
                    &self.state[i],
                    &self.attempts[i],
                    &self.payload[i],
                    &self.priority[i],
                    &self.max_attempts[i],
                    &self.timeout_ms[i],
                    &self.backoff[i],
                    &self.owner[i],
                    &self.tenant[i],
                    &self.correlation_id[i],
                    &self.result[i],
                    &self.error[i],
                    &run_at,
                    &created_at,
                    &updated_at,
                    &finished_at,
                    &self.ord_ms[i],
                    &self.ord_seq[i],
                    &self.ord_n[i],
                ])
                .await?;
        }
        writer.finish().await?;
        let sink = tx.copy_in("COPY jobs_open (id) FROM STDIN BINARY").await?;
        let writer = BinaryCopyInWriter::new(sink, &[Type::UUID]);
        let mut writer = std::pin::pin!(writer);
        for (id, finished) in self.id.iter().zip(&self.finished_at) {
            if finished.is_none() {
                writer.as_mut().write(&[id]).await?;
            }
        }
        writer.finish().await?;
        Ok(())
    }

    fn params(&self) -> [&(dyn ToSql + Sync); 22] {
        [
            &self.id,
            &self.queue,
            &self.kind,
            &self.state,
            &self.attempts,
            &self.payload,
            &self.priority,
            &self.max_attempts,
            &self.timeout_ms,
            &self.backoff,
            &self.owner,
            &self.tenant,
            &self.correlation_id,
            &self.result,
            &self.error,
            &self.run_at,
            &self.created_at,
            &self.updated_at,
            &self.finished_at,
            &self.ord_ms,
            &self.ord_seq,
            &self.ord_n,
        ]
    }
}

fn priority_str(p: Priority) -> &'static str {
    match p {
        Priority::High => "high",
        Priority::Normal => "normal",
        Priority::Low => "low",
    }
}

impl PgStore {
    /// Run `copy` in a savepoint of `tx`: its result, or `None` when it hit a row already there (a unique
    /// violation), after rolling the savepoint back so the transaction goes on.
    async fn copy_unless_present<T>(
        &self,
        tx: &mut tokio_postgres::Transaction<'_>,
        copy: impl AsyncFnOnce(&tokio_postgres::Transaction<'_>) -> Result<T, tokio_postgres::Error>,
    ) -> Result<Option<T>, StoreError> {
        let sp = tx.savepoint("copy").await.map_err(|e| self.pg_err(e))?;
        match copy(&sp).await {
            Ok(v) => {
                sp.commit().await.map_err(|e| self.pg_err(e))?;
                Ok(Some(v))
            }
            Err(e) if e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION) => {
                sp.rollback().await.map_err(|e| self.pg_err(e))?;
                Ok(None)
            }
            Err(e) => Err(self.pg_err(e)),
        }
    }

    /// [`UPSERT_JOBS_AND_OPEN`] of `rows`, then [`CLOSE_OPEN`] of the jobs it left final (nothing for no rows).
    async fn upsert_jobs(
        &self,
        tx: &tokio_postgres::Transaction<'_>,
        upsert: &Statement,
        close: &Statement,
        rows: &JobColumns,
    ) -> Result<(), StoreError> {
        if rows.id.is_empty() {
            return Ok(());
        }
        let closed: Vec<Uuid> = tx
            .query(upsert, &rows.params())
            .await
            .map_err(|e| self.pg_err(e))?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if !closed.is_empty() {
            tx.execute(close, &[&closed])
                .await
                .map_err(|e| self.pg_err(e))?;
        }
        Ok(())
    }
}

/// `$read`, an expression of the store `$s`, on the replica when one is configured and not resting, else (or when
/// the replica fails to answer) on this server: the reads of [`Store`] that may be served by a replica.
macro_rules! replica_first {
    ($self:ident, $s:ident => $read:expr) => {{
        let mut answer = None;
        if let Some($s) = $self.reader() {
            match $read.await {
                Err(e) if $self.reader_failed(&e) => {}
                other => answer = Some(other),
            }
        }
        match answer {
            Some(a) => a,
            None => {
                let $s = $self;
                $read.await
            }
        }
    }};
}

/// The reads of [`Store`] on this server alone ([`Store`]'s own go through [`replica_first!`]).
impl PgStore {
    async fn job_here(&self, id: JobId) -> Result<Option<JobInfo>, StoreError> {
        let client = self.client().await?;
        let sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = $1");
        let stmt = self.prepare(&client, &sql).await?;
        let row = client
            .query_opt(&stmt, &[&id.0])
            .await
            .map_err(|e| self.pg_err(e))?;
        row.map(|r| self.info(&r)).transpose()
    }

    async fn jobs_here(&self, q: &JobQuery) -> Result<JobPage, StoreError> {
        let limit = q.limit.max(1);
        // created_after / created_before / after become bounds on the primary key (UUIDv7 ids sort by time).
        let lower = q.created_after.map(id_floor);
        let upper = [q.after.map(|a| a.0), q.created_before.map(id_floor)]
            .into_iter()
            .flatten()
            .min();
        let fetch = i64::try_from(limit + 1).unwrap_or(i64::MAX);
        let queue = q.queue.as_ref().map(|x| x.as_str().to_owned());
        let state = q.state.map(JobState::as_str);
        let kind = q.kind.as_ref().map(|x| x.as_str().to_owned());
        let filters: [(&str, Option<&(dyn ToSql + Sync)>); 7] = [
            ("id >= ", lower.as_ref().map(|v| v as _)),
            ("id < ", upper.as_ref().map(|v| v as _)),
            ("queue = ", queue.as_ref().map(|v| v as _)),
            ("state = ", state.as_ref().map(|v| v as _)),
            ("kind = ", kind.as_ref().map(|v| v as _)),
            ("owner = ", q.owner.as_ref().map(|v| v as _)),
            ("tenant = ", q.tenant.as_ref().map(|v| v as _)),
        ];
        let mut sql = format!("SELECT {JOB_COLUMNS} FROM jobs WHERE true");
        let mut params: Vec<&(dyn ToSql + Sync)> = Vec::new();
        for (cond, value) in filters {
            if let Some(v) = value {
                params.push(v);
                sql.push_str(&format!(" AND {cond}${}", params.len()));
            }
        }
        params.push(&fetch);
        sql.push_str(&format!(" ORDER BY id DESC LIMIT ${}", params.len()));

        let client = self.client().await?;
        let stmt = self.prepare(&client, &sql).await?;
        let rows = client
            .query(&stmt, &params)
            .await
            .map_err(|e| self.pg_err(e))?;
        let jobs = rows
            .iter()
            .map(|r| self.info(r))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(JobPage::of(jobs, limit))
    }

    async fn events_here(&self, id: JobId, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        const SQL: &str = "\
SELECT id, type, state, attempt, (extract(epoch FROM at) * 1000)::bigint AS at_ms,
       (extract(epoch FROM recorded_at) * 1000)::bigint AS recorded_at_ms, correlation_id, actor, data
FROM job_events WHERE job_id = $1
ORDER BY ord_ms, ord_seq, ord_n
LIMIT $2";
        let client = self.client().await?;
        let stmt = self.prepare(&client, SQL).await?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(&stmt, &[&id.0, &limit])
            .await
            .map_err(|e| self.pg_err(e))?;
        rows.iter()
            .map(|r| {
                Ok(EventRecord {
                    id: r.get("id"),
                    job_id: id,
                    ty: parse_text::<EventType>(r.get("type")).map_err(|e| self.corrupt(e))?,
                    state: parse_text::<JobState>(r.get("state")).map_err(|e| self.corrupt(e))?,
                    attempt: r.get::<_, i32>("attempt").max(0) as u32,
                    at: r.get::<_, i64>("at_ms").max(0) as u64,
                    recorded_at: r.get::<_, i64>("recorded_at_ms").max(0) as u64,
                    correlation_id: r.get("correlation_id"),
                    actor: r.get("actor"),
                    data: r.get("data"),
                })
            })
            .collect()
    }
}

#[async_trait]
impl Store for PgStore {
    fn pool_stats(&self) -> Option<crate::PoolStats> {
        let s = self.pool.status();
        Some(crate::PoolStats {
            size: s.size,
            available: s.available,
            waiting: s.waiting,
            max: s.max_size,
        })
    }

    async fn record(&self, events: &[Event]) -> Result<u64, StoreError> {
        if events.is_empty() {
            return Ok(0);
        }
        // Rows in key order, so two transactions that insert overlapping batches wait for each other instead of
        // deadlocking.
        let mut distinct = distinct_events(events);
        distinct.sort_unstable_by(|a, b| (a.job, &a.id).cmp(&(b.job, &b.id)));
        let mut done: Vec<Uuid> = distinct
            .iter()
            .filter(|e| e.ty == EventType::Completed)
            .map(|e| e.job.0)
            .collect();
        done.dedup();
        // One row per job, in id order (the fold is keyed by job id). The jobs whose spec the batch carries (it
        // holds their first event, `job.queued` or `job.scheduled`) are new, unless the batch is redelivered or
        // a later event of the job was recorded first: their rows are copied (see below). When they all sort after
        // the batch's other jobs, as new jobs' ids usually do, the others are upserted first, so every row is still
        // written in id order and concurrent batches cannot deadlock; otherwise the whole batch is upserted.
        let folds = fold(events);
        let first_new = folds
            .iter()
            .position(|f| f.spec.is_some())
            .unwrap_or(folds.len());
        let fresh_from = if folds[first_new..].iter().all(|f| f.spec.is_some()) {
            first_new
        } else {
            folds.len()
        };
        let (mut old, mut fresh) = (JobColumns::default(), JobColumns::default());
        let (older, newer) = folds.split_at(fresh_from);
        for f in older {
            old.push(f)?;
        }
        for f in newer {
            fresh.push(f)?;
        }
        let mut client = self.client().await?;
        let insert = self.prepare(&client, INSERT_EVENTS).await?;
        let upsert = self.prepare(&client, &UPSERT_JOBS_AND_OPEN).await?;
        let close = self.prepare(&client, CLOSE_OPEN).await?;
        let find = if done.is_empty() {
            None
        } else {
            Some(self.prepare(&client, RECORDED_COMPLETIONS).await?)
        };
        let mut tx = client.transaction().await.map_err(|e| self.pg_err(e))?;
        // Completions already recorded, read before the insert that renames the duplicates. Two transactions in
        // flight at once with two different completions of one job could each miss the other's; a rerun's
        // completion comes a claim and a run after the first, whose batch has long committed by then. (Taking
        // the jobs rows' locks first closes that window but made the recorders wait on each other enough to cut
        // the share of HOT updates below what the 10,000-job test requires.)
        let mut recorded: HashMap<JobId, (HashSet<String>, bool)> = HashMap::new();
        if let Some(find) = &find {
            for row in tx.query(find, &[&done]).await.map_err(|e| self.pg_err(e))? {
                let entry = recorded.entry(JobId(row.get::<_, Uuid>(0))).or_default();
                entry.0.insert(row.get(1));
                entry.1 |= row.get::<_, &str>(2) == EventType::Completed.as_str();
            }
        }
        let duplicates = duplicate_completions(&distinct, &recorded);
        let mut ev = EventColumns::default();
        for e in distinct {
            let ty = if duplicates.contains(&(e.job, e.id.as_str())) {
                EventType::DuplicateCompletion
            } else {
                e.ty
            };
            ev.push(e, ty);
        }
        // COPY straight into the table (bulk inserts: far less work per row than an INSERT ... ON CONFLICT);
        // an event already recorded (a redelivered batch) fails it, and the batch then goes through the insert
        // that skips what it holds.
        let new = match self
            .copy_unless_present(&mut tx, async |sp| ev.copy_into(sp).await)
            .await?
        {
            Some(n) => n,
            None => tx
                .execute(&insert, &ev.params())
                .await
                .map_err(|e| self.pg_err(e))?,
        };
        // The other jobs' rows through the upsert, which applies the ordering rule; then the new jobs' rows by
        // COPY (and their `jobs_open` entries), like the events. A row already there fails the COPY and those rows
        // go through the upsert too; a COPY that fails leaves the rows it wrote before the conflict as dead
        // tuples, which is why only the rows of first events are tried.
        self.upsert_jobs(&tx, &upsert, &close, &old).await?;
        let copied = !fresh.id.is_empty()
            && self
                .copy_unless_present(&mut tx, async |sp| fresh.copy_into(sp).await)
                .await?
                .is_some();
        if !copied {
            self.upsert_jobs(&tx, &upsert, &close, &fresh).await?;
        }
        tx.commit().await.map_err(|e| self.pg_err(e))?;
        self.duplicate_completions
            .fetch_add(duplicates.len() as u64, Ordering::Relaxed);
        Ok(new)
    }

    fn duplicate_completions(&self) -> u64 {
        self.duplicate_completions.load(Ordering::Relaxed)
    }

    async fn unfinished(
        &self,
        updated_before: u64,
        after: Option<JobId>,
        limit: usize,
    ) -> Result<Vec<JobInfo>, StoreError> {
        // Walks `jobs_open` (the ids of jobs not final, migrations/V2) in id order, not the whole table.
        let sql = format!(
            "SELECT {JOB_COLUMNS} FROM jobs_open JOIN jobs USING (id) \
             WHERE finished_at IS NULL AND payload IS NOT NULL \
             AND updated_at < to_timestamp($1::bigint / 1000.0) AND id > $2 ORDER BY id LIMIT $3"
        );
        let client = self.client().await?;
        let stmt = self.prepare(&client, &sql).await?;
        let after = after.map_or(Uuid::nil(), |a| a.0);
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = client
            .query(&stmt, &[&ms(updated_before), &after, &limit])
            .await
            .map_err(|e| self.pg_err(e))?;
        rows.iter().map(|r| self.info(r)).collect()
    }

    async fn job(&self, id: JobId) -> Result<Option<JobInfo>, StoreError> {
        let Some(replica) = self.reader() else {
            return self.job_here(id).await;
        };
        match replica.job_here(id).await {
            Ok(Some(j)) if j.state.is_final() => Ok(Some(j)),
            // Not final (or not there yet) on the replica: it may be behind the primary, and a lookup comes
            // here when Redis no longer holds the job, which it drops once the primary has its final state.
            Ok(_) => self.job_here(id).await,
            Err(e) if self.reader_failed(&e) => self.job_here(id).await,
            Err(e) => Err(e),
        }
    }

    async fn jobs(&self, q: &JobQuery) -> Result<JobPage, StoreError> {
        replica_first!(self, s => s.jobs_here(q))
    }

    async fn events(&self, id: JobId, limit: usize) -> Result<Vec<EventRecord>, StoreError> {
        replica_first!(self, s => s.events_here(id, limit))
    }

    async fn maintain(
        &self,
        config: &MaintenanceConfig,
        now_ms: u64,
    ) -> Result<MaintenanceReport, StoreError> {
        let mut report = MaintenanceReport::default();
        let ahead = u64::try_from(config.ahead.as_millis()).unwrap_or(u64::MAX);
        report.created = self
            .create_partitions(
                now_ms,
                now_ms.saturating_add(ahead),
                config.width,
                config.lock_timeout,
            )
            .await?
            .unwrap_or(0);
        let Some(retention) = config.retention else {
            return Ok(report);
        };
        let cutoff =
            now_ms.saturating_sub(u64::try_from(retention.as_millis()).unwrap_or(u64::MAX));
        for p in self.partitions().await? {
            if p.upper_ms > cutoff {
                break;
            }
            if let Some((kept, took)) = self
                .drop_partition(&p.name, cutoff, config.lock_timeout)
                .await?
            {
                report.dropped += 1;
                report.kept += kept;
                report.longest_drop = report.longest_drop.max(took);
            }
        }
        // What earlier drops kept (or ids outside every slot) and has since expired: a small table, deleted row
        // by row with its events.
        const EXPIRED: &str = "\
WITH gone AS (DELETE FROM jobs_default WHERE finished_at < to_timestamp($1::bigint / 1000.0) RETURNING id),
     trail AS (DELETE FROM job_events_default e USING gone WHERE e.job_id = gone.id)
SELECT count(*) FROM gone";
        let client = self.client().await?;
        let row = client
            .query_one(EXPIRED, &[&ms(cutoff)])
            .await
            .map_err(|e| self.pg_err(e))?;
        report.deleted = row.get::<_, i64>(0).max(0) as u64;
        Ok(report)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let client = self.client().await?;
        client
            .simple_query("SELECT 1")
            .await
            .map(drop)
            .map_err(|e| self.pg_err(e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_the_password() {
        let r = Redactor::for_url("postgres://u:s3cret@h:5/db?x=1");
        assert_eq!(r.apply("oops s3cret here"), "oops <redacted> here");
        // A user alone is not looked for in messages (it would blank out every word that spells it).
        let r = Redactor::for_url("postgres://u@h/db");
        assert_eq!(r.apply("role u"), "role u");
        let cfg = PgConfig::new("postgres://u:s3cret@h/db");
        assert!(!format!("{cfg:?}").contains("s3cret"));
        let cfg = PgConfig::new("host=h user=u password=s3cret");
        assert!(!format!("{cfg:?}").contains("s3cret"), "{cfg:?}");
    }

    #[test]
    fn driver_errors_lose_the_password() {
        // The driver's own parse (percent-decoded) is scrubbed as well as the URL's text.
        let store = PgStore::connect(PgConfig::new("postgres://u:p%40ss@127.0.0.1:1/db")).unwrap();
        assert_eq!(
            store.redactor.apply("x p@ss p%40ss"),
            "x <redacted> <redacted>"
        );
        let store =
            PgStore::connect(PgConfig::new("host=127.0.0.1 port=1 password='a b'")).unwrap();
        assert_eq!(store.redactor.apply("x a b"), "x <redacted>");
    }

    #[test]
    fn upsert_is_well_formed() {
        assert!(UPSERT_JOBS.contains("payload = CASE WHEN j.payload IS NULL"));
        assert_eq!(UPSERT_JOBS.matches("$").count(), 22);
    }
}
