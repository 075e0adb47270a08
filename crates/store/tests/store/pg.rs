//! The store contract (`tests/store/contract/`) against PostgreSQL, plus what only the PostgreSQL store has:
//! migrations, recovery after a server restart, error classification and password hygiene.
//!
//! One PostgreSQL cluster per test process (nextest runs each test in its own process, so in practice one per
//! test), and a fresh database per case, so cases are isolated and parallel-safe.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_core::{EventType, JobId, JobState};
use ferry_store::{PgConfig, PgStore, Store, StoreError};
use ferry_testkit::PostgresServer;

use crate::contract::DAY;
use crate::{contract, contract_suite};

/// The process's shared cluster (stopped by the testkit's watchdog when the process exits).
fn server() -> &'static PostgresServer {
    static SERVER: OnceLock<PostgresServer> = OnceLock::new();
    SERVER.get_or_init(|| PostgresServer::start().expect("PostgreSQL starts"))
}

/// A fresh database on `server` and its URL.
fn fresh_db(server: &PostgresServer) -> String {
    let name = format!("t_{}", JobId::new().0.simple());
    server.create_database(&name).expect("database created")
}

/// A store on a fresh database of the shared server, not migrated yet, and the database's URL (for SQL of the
/// test's own).
fn fresh_store() -> (PgStore, String) {
    let url = tokio::task::block_in_place(|| fresh_db(server()));
    let store = PgStore::connect(PgConfig::new(url.clone())).expect("pool builds");
    (store, url)
}

/// A migrated store on a fresh database of `server`.
async fn store_on(server: &PostgresServer, cfg: impl FnOnce(&mut PgConfig)) -> PgStore {
    let url = tokio::task::block_in_place(|| fresh_db(server));
    let mut c = PgConfig::new(url);
    c.connect_timeout = Duration::from_secs(2);
    c.wait_timeout = Duration::from_secs(2);
    cfg(&mut c);
    let store = PgStore::connect(c).expect("pool builds");
    assert_eq!(
        store.migrate().await.expect("migrates"),
        [
            "V1__jobs",
            "V2__jobs_open",
            "V3__partitions",
            "V4__listing_indexes_and_jobs_open"
        ]
    );
    store
}

struct Pg(Arc<PgStore>);

#[async_trait::async_trait]
impl contract::Backend for Pg {
    async fn start() -> Self {
        let server = tokio::task::block_in_place(server);
        Pg(Arc::new(store_on(server, |_| {}).await))
    }

    fn store(&self) -> Arc<dyn Store> {
        self.0.clone()
    }
}

contract_suite!(Pg);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_twice_is_a_no_op() {
    let store = store_on(tokio::task::block_in_place(server), |_| {}).await;
    assert!(store.migrate().await.unwrap().is_empty());
    store.ping().await.unwrap();
}

/// The record spans daily partitions: each job and its events live in the partition of the job's creation day.
/// Retention drops the days that ended more than the retention ago and moves the jobs they still had to keep
/// (open, or finished within the retention) into the default partitions with their events; lookups, listings and
/// trails stay right, and the next passes delete kept jobs once they expire, never open ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_drops_whole_days_and_keeps_open_jobs() {
    use ferry_store::maintenance::MaintenanceConfig;
    let (store, url) = fresh_store();
    store.migrate().await.unwrap();
    let now = ferry_core::now_ms();
    let day = Duration::from_secs(86_400);
    // The migration made today and three days ahead; the eleven days before are made here.
    assert_eq!(store.partitions().await.unwrap().len(), 4);
    let made = store
        .create_partitions(now - 11 * DAY, now, day, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(made, Some(11));
    let s: Arc<dyn Store> = Arc::new(store.clone());
    let r = contract::retention_scenario(&s, now).await;
    let sql = |q: String| tokio::task::block_in_place(|| ferry_testkit::psql(&url, &q)).unwrap();
    let home = |id: JobId| {
        let row = sql(format!(
            "select j.tableoid::regclass || ' ' || e.tableoid::regclass || ' ' || \
             to_char(to_timestamp({}::bigint / 1000.0) at time zone 'UTC', 'YYYYMMDD') \
             from jobs j join job_events e on e.job_id = j.id where j.id = '{id}' limit 1",
            (id.0.as_u128() >> 80) as u64
        ));
        row.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    for id in r.kept.iter().chain(&r.expired) {
        let h = home(*id);
        assert_eq!(h[0], format!("jobs_p{}", h[2]), "{id}");
        assert_eq!(h[1], format!("job_events_p{}", h[2]), "{id}");
    }

    let config = MaintenanceConfig {
        retention: Some(3 * day),
        ..MaintenanceConfig::default()
    };
    let report = store.maintain(&config, now).await.unwrap();
    // Days -11 to -4 ended at least 3 days ago; day -3 ends within the retention.
    assert_eq!(report.dropped, 8, "{report:?}");
    // Both from day -10: the open job and the one that finished an hour ago.
    assert_eq!(report.kept, 2, "{report:?}");
    assert_eq!(report.deleted, 0, "{report:?}");
    assert!(report.longest_drop < Duration::from_secs(5), "{report:?}");
    contract::assert_retained(&s, &r.expired, &r.kept).await;
    for id in &[r.open[1], r.finished_lately[1]] {
        assert_eq!(
            home(*id)[..2],
            ["jobs_default", "job_events_default"],
            "{id}"
        );
    }
    let cutoff = now - 3 * DAY;
    let parts = store.partitions().await.unwrap();
    assert!(parts.iter().all(|p| p.upper_ms > cutoff), "{parts:?}");
    assert!(parts.first().unwrap().lower_ms <= cutoff, "{parts:?}");
    assert_eq!(
        sql("select count(*) from pg_class where relkind = 'r' and relname ~ '^(jobs|job_events)_p'".into()).trim(),
        (parts.len() * 2).to_string(),
        "every slot has its two partitions, no orphan"
    );
    // The open job is still a reconciler candidate.
    let open = store.unfinished(now, None, 10).await.unwrap();
    assert!(open.iter().any(|j| j.id == r.open[1]), "{open:?}");

    // Four days later: days -3 to 0 go; of what was kept, the job that finished an hour before `now` has expired
    // (deleted from the default partition), the open one stays; the job finished a day ago goes with its day.
    let report = store.maintain(&config, now + 4 * DAY).await.unwrap();
    assert_eq!(
        (report.dropped, report.kept, report.deleted),
        (4, 1, 1),
        "{report:?}"
    );
    assert!(report.created >= 4, "{report:?}");
    contract::assert_retained(&s, &r.finished_lately, &r.open).await;
}

/// An existing record (schema V2, unpartitioned) moves into the partitions whole when V3 is applied: every job
/// and event, each in its day's partition, with listings unchanged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_moves_the_existing_record_into_partitions() {
    let (store, url) = fresh_store();
    assert_eq!(
        store.migrate_to(Some(2)).await.unwrap(),
        ["V1__jobs", "V2__jobs_open"]
    );
    let now = ferry_core::now_ms();
    let s: Arc<dyn Store> = Arc::new(store.clone());
    let r = contract::retention_scenario(&s, now).await;
    let all: Vec<JobId> = {
        let page = s
            .jobs(&ferry_store::JobQuery {
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        page.jobs.iter().map(|j| j.id).collect()
    };
    assert_eq!(all.len(), 7);
    assert_eq!(
        store.migrate().await.unwrap(),
        ["V3__partitions", "V4__listing_indexes_and_jobs_open"]
    );
    contract::assert_retained(&s, &[], &all).await;
    assert_eq!(r.kept.len() + r.expired.len(), all.len());
    // Slots from the oldest job's day (10 days ago) to three days ahead, and nothing in the default partitions.
    assert_eq!(store.partitions().await.unwrap().len(), 14);
    let sql = |q: &str| tokio::task::block_in_place(|| ferry_testkit::psql(&url, q)).unwrap();
    assert_eq!(
        sql(
            "select (select count(*) from jobs_default) + (select count(*) from job_events_default)"
        )
        .trim(),
        "0"
    );
    assert_eq!(sql("select count(*) from job_events").trim(), "12");
}

/// With a read replica (`read_url`, a real streaming replica), listings, lookups and trails are read there while
/// writes go to the primary (a lookup the replica cannot answer with a final state is asked of the primary too);
/// when the replica stops answering, reads go to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_the_replica_and_fall_back_to_the_primary() {
    let primary = tokio::task::block_in_place(PostgresServer::start).expect("primary starts");
    let url = primary.url();
    let mut replica =
        tokio::task::block_in_place(|| primary.start_replica()).expect("replica starts");
    let mut cfg = PgConfig::new(url.clone());
    cfg.read_url = Some(replica.url());
    cfg.connect_timeout = Duration::from_secs(2);
    cfg.wait_timeout = Duration::from_secs(2);
    let store = PgStore::connect(cfg).unwrap();
    store.migrate().await.unwrap();
    let listed = |s: &PgStore| {
        let s = s.clone();
        async move {
            let page = s
                .jobs(&ferry_store::JobQuery {
                    limit: 10,
                    ..Default::default()
                })
                .await
                .unwrap();
            page.jobs.iter().map(|j| j.id).collect::<Vec<_>>()
        }
    };
    let done = JobId::new();
    let a = JobId::new();
    let now = ferry_core::now_ms();
    store
        .record(&[
            contract::queued(done, "1-0/0", now),
            contract::ev(
                done,
                "1-0/1",
                EventType::Completed,
                JobState::Completed,
                1,
                now,
            ),
        ])
        .await
        .unwrap();
    store
        .record(&[contract::queued(a, "1-1/0", now)])
        .await
        .unwrap();
    // The replica catches up (the migration and the jobs).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while listed(&store).await != [a, done] {
        assert!(
            std::time::Instant::now() < deadline,
            "the replica never showed the job"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Replay paused: a job written now is on the primary only, and the store's reads do not see it.
    let sql = |u: &str, q: &str| {
        let (u, q) = (u.to_owned(), q.to_owned());
        tokio::task::block_in_place(move || ferry_testkit::psql(&u, &q)).unwrap()
    };
    sql(&replica.url(), "select pg_wal_replay_pause()");
    let b = JobId::new();
    store
        .record(&[
            contract::queued(b, "2-0/0", ferry_core::now_ms()),
            contract::ev(
                a,
                "2-1/0",
                EventType::Completed,
                JobState::Completed,
                1,
                now,
            ),
        ])
        .await
        .unwrap();
    sql(
        &url,
        &format!("update jobs set attempts = 7 where id = '{done}'"),
    );
    assert_eq!(sql(&url, "select count(*) from jobs").trim(), "3");
    assert_eq!(
        listed(&store).await,
        [a, done],
        "listings come from the replica"
    );
    assert!(store.events(b, 10).await.unwrap().is_empty(), "trails too");
    // Lookups of a job final on the replica too; one the replica does not show finished is asked of the
    // primary (Redis drops a job once the primary has it final, and the replica may be behind).
    assert_eq!(store.job(done).await.unwrap().unwrap().attempts, 1);
    assert_eq!(
        store.job(a).await.unwrap().unwrap().state,
        JobState::Completed
    );
    assert!(store.job(b).await.unwrap().is_some());
    // The reconciler reads the primary.
    let open = store
        .unfinished(ferry_core::now_ms() + 1, None, 10)
        .await
        .unwrap();
    assert_eq!(open.len(), 1);
    // The replica stops: reads fall back to the primary, which has them all.
    tokio::task::block_in_place(|| replica.stop()).unwrap();
    assert_eq!(listed(&store).await, [b, a, done]);
    assert_eq!(store.job(done).await.unwrap().unwrap().attempts, 7);
    assert!(store.job(b).await.unwrap().is_some());
    assert_eq!(store.events(b, 10).await.unwrap().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn works_without_statement_cache() {
    let store = store_on(tokio::task::block_in_place(server), |c| {
        c.statement_cache = false;
        c.pool_size = 1;
    })
    .await;
    let id = JobId::new();
    let e = contract::queued(id, "1-0/0", 1_700_000_000_001);
    for _ in 0..3 {
        store.record(std::slice::from_ref(&e)).await.unwrap();
        assert_eq!(
            store.job(id).await.unwrap().unwrap().state,
            JobState::Queued
        );
    }
    assert_eq!(store.events(id, 10).await.unwrap().len(), 1);
}

/// `jobs_open` (the reconciler's candidates) holds exactly the jobs whose record is not final: an id goes in
/// when its job is recorded open and leaves when the job becomes final (in the same batch or a later one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_open_holds_exactly_the_open_jobs() {
    let (store, url) = fresh_store();
    store.migrate().await.unwrap();
    let (a, b, c) = (JobId::new(), JobId::new(), JobId::new());
    let done =
        |id, eid: &str| contract::ev(id, eid, EventType::Completed, JobState::Completed, 1, 3_000);
    store
        .record(&[
            contract::queued(a, "1-0/0", 1_000),
            contract::queued(b, "1-1/0", 1_000),
            contract::queued(c, "1-2/0", 1_000),
            done(c, "2-0/0"),
        ])
        .await
        .unwrap();
    let open = || {
        let rows = ferry_testkit::psql(&url, "select id from jobs_open order by id").unwrap();
        let mut ids: Vec<String> = rows.split_whitespace().map(str::to_owned).collect();
        ids.sort();
        ids
    };
    let mut want = vec![a.to_string(), b.to_string()];
    want.sort();
    assert_eq!(tokio::task::block_in_place(open), want);
    store.record(&[done(a, "3-0/0")]).await.unwrap();
    assert_eq!(tokio::task::block_in_place(open), [b.to_string()]);
}

/// A job made final by a batch that waited for the transaction recording the job's first event (two batches
/// of one shard in flight at once) leaves `jobs_open`: the entry that transaction committed during the wait is
/// removed too. Before the removal became a statement of its own, it stayed for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_finished_while_its_first_batch_commits_leaves_jobs_open() {
    let (store, url) = fresh_store();
    store.migrate().await.unwrap();
    let x = JobId::new();
    // The first batch, held open: the job's row and its `jobs_open` entry, as the recorder's COPY writes them.
    let (first, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    first
        .batch_execute(&format!(
            "BEGIN; \
             INSERT INTO jobs (id, queue, kind, state, attempts, payload, created_at, updated_at, ord_ms, ord_seq, \
             ord_n) VALUES ('{x}', 'emails', 'send', 'queued', 0, '{{}}', now(), now(), 1, 0, 0); \
             INSERT INTO jobs_open (id) VALUES ('{x}')"
        ))
        .await
        .unwrap();
    // The second batch completes the job: its upsert waits for the first batch's row.
    let second = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .record(&[contract::ev(
                    x,
                    "2-0/0",
                    EventType::Completed,
                    JobState::Completed,
                    1,
                    3_000,
                )])
                .await
        })
    };
    let sql = |q: &str| tokio::task::block_in_place(|| ferry_testkit::psql(&url, q)).unwrap();
    ferry_testkit::eventually(
        Duration::from_secs(10),
        "the second batch waits",
        || async {
            let waiting =
                sql("select count(*) from pg_stat_activity where wait_event_type = 'Lock'");
            Ok((waiting.trim() == "1").then_some(()))
        },
    )
    .await
    .unwrap();
    first.batch_execute("COMMIT").await.unwrap();
    second.await.unwrap().unwrap();
    assert_eq!(
        sql("select state from jobs").trim(),
        "completed",
        "the completion is recorded"
    );
    assert_eq!(sql("select count(*) from jobs_open").trim(), "0");
}

/// V4 takes the entries of finished jobs that the race above left in `jobs_open` out, and keeps the open ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_to_v4_takes_finished_jobs_out_of_jobs_open() {
    let (store, url) = fresh_store();
    store.migrate_to(Some(3)).await.unwrap();
    let (open, done) = (JobId::new(), JobId::new());
    store
        .record(&[
            contract::queued(open, "1-0/0", 1_000),
            contract::queued(done, "1-1/0", 1_000),
            contract::ev(
                done,
                "2-0/0",
                EventType::Completed,
                JobState::Completed,
                1,
                3_000,
            ),
        ])
        .await
        .unwrap();
    let sql = |q: &str| tokio::task::block_in_place(|| ferry_testkit::psql(&url, q)).unwrap();
    sql(&format!("insert into jobs_open (id) values ('{done}')"));
    assert_eq!(
        store.migrate().await.unwrap(),
        ["V4__listing_indexes_and_jobs_open"]
    );
    assert_eq!(sql("select id from jobs_open").trim(), open.to_string());
}

/// Listings walk the listing indexes (V4: ascending, owner and tenant only where set) backward, newest first,
/// with the generic plan of the prepared statement the store uses: no sort, no sequential scan. Jobs without an
/// owner or tenant have no entry in those indexes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_walk_the_ascending_indexes_backward() {
    let (store, url) = fresh_store();
    store.migrate().await.unwrap();
    let sql = |q: &str| tokio::task::block_in_place(|| ferry_testkit::psql(&url, q)).unwrap();
    // 30,000 jobs of the last 30 s: a thousand owners on half of them, 300 tenants on a third, 200 queues
    // (values rare enough that walking the primary key and filtering is not the cheaper plan).
    sql(
        "insert into jobs (id, queue, kind, state, attempts, owner, tenant, created_at, updated_at, ord_ms, \
         ord_seq, ord_n) \
         select (lpad(to_hex((extract(epoch from now()) * 1000)::bigint - i), 12, '0') \
                 || lpad(to_hex(i), 20, '0'))::uuid, \
                'q' || i % 200, 'k', 'queued', 0, \
                case when i % 2 = 0 then 'o' || i % 2000 end, case when i % 3 = 0 then 't' || i % 900 end, \
                now(), now(), 1, i, 0 \
         from generate_series(1, 30000) i; analyze jobs",
    );
    let listing = |filter: &str| {
        sql(&format!(
            "set plan_cache_mode = force_generic_plan; \
             prepare l(text, bigint) as select id from jobs where {filter} = $1 order by id desc limit $2; \
             explain execute l('x', 51)"
        ))
    };
    for (filter, index) in [
        ("owner", "owner_id_idx"),
        ("tenant", "tenant_id_idx"),
        ("queue", "queue_id_idx"),
    ] {
        let plan = listing(filter);
        // Every partition's scan is of its index for this filter, walked backward.
        let scans: Vec<&str> = plan.lines().filter(|l| l.contains(" Scan")).collect();
        assert!(
            !scans.is_empty()
                && scans
                    .iter()
                    .all(|l| l.contains("Backward using jobs_") && l.contains(index)),
            "{filter}: {plan}"
        );
        assert!(
            !plan.contains("Seq Scan") && !plan.contains("Sort  ("),
            "{filter}: {plan}"
        );
    }
    // Only the jobs with an owner (half) and with a tenant (a third) are in those indexes.
    let entries = |index: &str| -> i64 {
        sql(&format!(
            "select sum(reltuples)::bigint from pg_class c join pg_index i on i.indexrelid = c.oid \
             where c.relname like 'jobs_%{index}'"
        ))
        .trim()
        .parse()
        .unwrap()
    };
    assert_eq!(entries("owner_id_idx"), 15_000);
    assert_eq!(entries("tenant_id_idx"), 10_000);
    assert_eq!(entries("queue_id_idx"), 30_000);
}

/// A batch of a few thousand events is a handful of statements, whatever its size.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_batch() {
    let store = store_on(tokio::task::block_in_place(server), |_| {}).await;
    let ids: Vec<JobId> = (0..1_000).map(|_| JobId::new()).collect();
    let mut batch = Vec::new();
    for (i, id) in ids.iter().enumerate() {
        batch.push(contract::queued(*id, &format!("5-{i}/0"), 1_000));
        batch.push(contract::ev(
            *id,
            &format!("6-{i}/0"),
            EventType::Active,
            JobState::Active,
            1,
            2_000,
        ));
        batch.push(contract::ev(
            *id,
            &format!("7-{i}/0"),
            EventType::Completed,
            JobState::Completed,
            1,
            3_000,
        ));
    }
    assert_eq!(store.record(&batch).await.unwrap(), 3_000);
    let page = store
        .jobs(&ferry_store::JobQuery {
            state: Some(JobState::Completed),
            limit: 2_000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(page.jobs.len(), 1_000);
    assert_eq!(page.next, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_unavailable_while_stopped_and_recovers() {
    // A cluster of its own: this case stops it.
    let mut pg =
        tokio::task::block_in_place(|| PostgresServer::start().expect("PostgreSQL starts"));
    let store = store_on(&pg, |c| c.pool_size = 2).await;
    store.ping().await.unwrap();
    // Two pooled connections, both broken by the stop.
    let id = JobId::new();
    store
        .record(&[contract::queued(id, "1-0/0", 5)])
        .await
        .unwrap();

    tokio::task::block_in_place(|| pg.stop()).unwrap();
    match store.ping().await {
        Err(StoreError::Unavailable(_)) => {}
        other => panic!("expected Unavailable, got {other:?}"),
    }
    assert!(matches!(
        store.job(id).await,
        Err(StoreError::Unavailable(_))
    ));

    tokio::task::block_in_place(|| pg.start_again()).unwrap();
    // The pool recovers by itself: broken connections are dropped and replaced.
    for _ in 0..3 {
        store.ping().await.expect("ping after restart");
        assert!(store.job(id).await.unwrap().is_some());
    }
    let (size, available, waiting) = store.pool_status();
    assert!(
        size <= 2 && available <= size && waiting == 0,
        "{size} {available} {waiting}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_never_contain_the_password() {
    const SECRET: &str = "hunter2-Zq9";
    let server = tokio::task::block_in_place(server);
    // Trust authentication ignores the password; it is still in the URL and must not leak.
    let url = tokio::task::block_in_place(|| fresh_db(server))
        .replace("postgres@", &format!("postgres:{SECRET}@"));
    let cfg = PgConfig::new(url.clone());
    assert!(!format!("{cfg:?}").contains(SECRET));
    let store = PgStore::connect(cfg).unwrap();
    assert!(!format!("{store:?}").contains(SECRET));

    // Not migrated: a query fails with a schema error, which is not retryable.
    match store.job(JobId::new()).await {
        Err(StoreError::Internal(m)) => {
            assert!(m.contains("jobs"), "{m}");
            assert!(!m.contains(SECRET), "{m}");
        }
        other => panic!("expected Internal, got {other:?}"),
    }

    // Nobody listens on this port (bound, then released): connection refused is retryable.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cfg = PgConfig::new(format!(
        "postgres://postgres:{SECRET}@127.0.0.1:{port}/ferry"
    ));
    cfg.connect_timeout = Duration::from_secs(2);
    let store = PgStore::connect(cfg).unwrap();
    match store.ping().await {
        Err(e @ StoreError::Unavailable(_)) => assert!(!e.to_string().contains(SECRET), "{e}"),
        other => panic!("expected Unavailable, got {other:?}"),
    }

    // A malformed URL is reported without echoing the password.
    let err = PgStore::connect(PgConfig::new(format!(
        "postgres://u:{SECRET}@h:notaport/db"
    )))
    .unwrap_err();
    assert!(!err.to_string().contains(SECRET), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeout_is_applied() {
    let server = tokio::task::block_in_place(server);
    let url = tokio::task::block_in_place(|| fresh_db(server));
    PgStore::connect(PgConfig::new(url.clone()))
        .unwrap()
        .migrate()
        .await
        .unwrap();
    let mut cfg = PgConfig::new(url);
    cfg.statement_timeout = Duration::from_millis(1);
    let store = PgStore::connect(cfg).unwrap();
    // Far more than a millisecond of work.
    let batch: Vec<_> = (0..20_000)
        .map(|i| contract::queued(JobId::new(), &format!("1-{i}/0"), 5))
        .collect();
    match store.record(&batch).await {
        Err(StoreError::Internal(m)) => assert!(m.contains("statement timeout"), "{m}"),
        other => panic!("expected a statement timeout, got {other:?}"),
    }
}
