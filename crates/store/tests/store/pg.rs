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
        ["V1__jobs", "V2__jobs_open"]
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
    let server = tokio::task::block_in_place(server);
    let url = tokio::task::block_in_place(|| fresh_db(server));
    let store = PgStore::connect(PgConfig::new(url.clone())).unwrap();
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

/// A batch of a few thousand events is two statements, whatever its size.
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
