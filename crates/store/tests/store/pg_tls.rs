//! TLS to PostgreSQL (`sslmode` in the URL, a private CA file) against a real cluster with `ssl = on` and a
//! certificate from a CA generated for the test. Whether a connection is encrypted is read from the server's
//! `pg_stat_ssl`, matched by `application_name`.

use std::path::Path;
use std::time::Duration;

use ferry_core::{EventType, JobId, JobState, Kind, QueueName};
use ferry_store::{PgConfig, PgStore, Store};
use ferry_testkit::{PostgresServer, TestCerts};

fn event(job: JobId) -> ferry_core::Event {
    ferry_core::Event {
        id: "1-0/0".into(),
        ty: EventType::Queued,
        job,
        queue: QueueName::parse("tls").unwrap(),
        kind: Kind::parse("ferry.noop").unwrap(),
        state: JobState::Queued,
        attempt: 0,
        at: 1_764_460_000_000,
        owner: None,
        tenant: None,
        data: None,
        correlation_id: None,
        actor: None,
        spec: None,
    }
}

/// A store on `server`'s `ferry` database through `host`, with `sslmode` and an application name to find its
/// connections by.
fn config(
    server: &PostgresServer,
    host: &str,
    sslmode: &str,
    app: &str,
    ca: Option<&Path>,
) -> PgConfig {
    let url = format!(
        "postgres://postgres@{host}:{}/ferry?application_name={app}&sslmode={sslmode}",
        server.port()
    );
    let mut c = PgConfig::new(url);
    c.ca_file = ca.map(Path::to_path_buf);
    c.connect_timeout = Duration::from_secs(5);
    c.wait_timeout = Duration::from_secs(5);
    c
}

/// `pg_stat_ssl.ssl` of every open connection named `app` (`t`/`f` per connection).
fn ssl_of(server: &PostgresServer, app: &str) -> Vec<String> {
    let out = server
        .psql(&format!(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.application_name = '{app}'"
        ))
        .unwrap();
    out.lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_with_the_ca_records_over_tls() {
    let certs = TestCerts::generate().unwrap();
    let server = tokio::task::block_in_place(|| PostgresServer::start_tls(&certs, "")).unwrap();

    let store = PgStore::connect(config(
        &server,
        "127.0.0.1",
        "verify-full",
        "tls_full",
        Some(certs.ca_file()),
    ))
    .unwrap();
    store.migrate().await.unwrap();
    let id = JobId::new();
    assert_eq!(store.record(&[event(id)]).await.unwrap(), 1);
    let info = store.job(id).await.unwrap().expect("the job is recorded");
    assert_eq!(info.state, JobState::Queued);
    let ssl = tokio::task::block_in_place(|| ssl_of(&server, "tls_full"));
    assert!(!ssl.is_empty(), "the pool holds a connection");
    assert!(
        ssl.iter().all(|s| s == "t"),
        "every connection is encrypted: {ssl:?}"
    );

    // The same check tells a plain connection apart.
    let plain = PgStore::connect(config(&server, "127.0.0.1", "disable", "tls_off", None)).unwrap();
    plain.ping().await.unwrap();
    let ssl = tokio::task::block_in_place(|| ssl_of(&server, "tls_off"));
    assert_eq!(ssl, ["f"]);

    // `require` encrypts without checking the certificate, as libpq does: no CA needed.
    let require =
        PgStore::connect(config(&server, "127.0.0.1", "require", "tls_req", None)).unwrap();
    require.ping().await.unwrap();
    let ssl = tokio::task::block_in_place(|| ssl_of(&server, "tls_req"));
    assert_eq!(ssl, ["t"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_full_without_the_ca_names_the_certificate_problem() {
    let certs = TestCerts::generate().unwrap();
    let server = tokio::task::block_in_place(|| PostgresServer::start_tls(&certs, "")).unwrap();

    // No CA file: the system roots do not know the test CA.
    let store = PgStore::connect(config(
        &server,
        "127.0.0.1",
        "verify-full",
        "tls_noca",
        None,
    ))
    .unwrap();
    let e = store.ping().await.unwrap_err().to_string();
    assert!(e.contains("certificate"), "{e}");

    // Another CA.
    let other = TestCerts::generate().unwrap();
    let store = PgStore::connect(config(
        &server,
        "127.0.0.1",
        "verify-full",
        "tls_other",
        Some(other.ca_file()),
    ))
    .unwrap();
    let e = store.ping().await.unwrap_err().to_string();
    assert!(e.contains("invalid peer certificate: UnknownIssuer"), "{e}");
    assert!(tokio::task::block_in_place(|| ssl_of(&server, "tls_other")).is_empty());

    // A CA file without certificates is refused before connecting.
    let empty = certs.dir().join("empty.pem");
    std::fs::write(&empty, "nothing here\n").unwrap();
    let e = PgStore::connect(config(
        &server,
        "127.0.0.1",
        "verify-full",
        "x",
        Some(&empty),
    ))
    .unwrap_err();
    assert!(e.to_string().contains("holds no PEM certificate"), "{e}");

    let e =
        PgStore::connect(config(&server, "127.0.0.1", "verify-everything", "x", None)).unwrap_err();
    assert!(e.to_string().contains("sslmode=verify-everything"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_ca_skips_the_host_name_and_verify_full_does_not() {
    // A certificate for another name than the one connected to.
    let certs = TestCerts::generate_for(&["db.invalid"]).unwrap();
    let server = tokio::task::block_in_place(|| PostgresServer::start_tls(&certs, "")).unwrap();

    let full = PgStore::connect(config(
        &server,
        "127.0.0.1",
        "verify-full",
        "tls_name",
        Some(certs.ca_file()),
    ))
    .unwrap();
    let e = full.ping().await.unwrap_err().to_string();
    assert!(
        e.contains("certificate not valid for name \"127.0.0.1\""),
        "{e}"
    );

    let ca = PgStore::connect(config(
        &server,
        "127.0.0.1",
        "verify-ca",
        "tls_ca",
        Some(certs.ca_file()),
    ))
    .unwrap();
    ca.ping().await.unwrap();
    assert_eq!(
        tokio::task::block_in_place(|| ssl_of(&server, "tls_ca")),
        ["t"]
    );

    // verify-ca still checks the chain.
    let other = TestCerts::generate().unwrap();
    let wrong = PgStore::connect(config(
        &server,
        "127.0.0.1",
        "verify-ca",
        "tls_ca2",
        Some(other.ca_file()),
    ))
    .unwrap();
    let e = wrong.ping().await.unwrap_err().to_string();
    assert!(e.contains("UnknownIssuer"), "{e}");
}
