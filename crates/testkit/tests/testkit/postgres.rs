//! The PostgreSQL wrapper against a real cluster: start, query through psql, extra databases, stop and start
//! again, cleanup on drop.

use ferry_testkit::{PostgresServer, psql};

#[test]
fn postgres_lifecycle() -> anyhow::Result<()> {
    let mut pg = PostgresServer::start()?;
    assert_ne!(pg.port(), 5432, "must never use the system cluster's port");
    assert_eq!(
        pg.url(),
        format!("postgres://postgres@127.0.0.1:{}/ferry", pg.port())
    );
    assert_eq!(pg.psql("SELECT 1")?, "1");
    assert_eq!(pg.psql("SELECT current_database()")?, "ferry");
    assert_eq!(pg.psql("SHOW fsync")?, "off");
    assert_eq!(pg.psql("SHOW server_encoding")?, "UTF8");

    pg.psql("CREATE TABLE t (v int); INSERT INTO t VALUES (42)")?;
    let other = pg.create_database("second_db")?;
    assert!(other.ends_with("/second_db"));
    assert_eq!(psql(&other, "SELECT current_database()")?, "second_db");
    assert!(pg.create_database("bad name; drop").is_err());

    pg.stop()?;
    let down = pg.psql("SELECT 1").unwrap_err();
    assert!(format!("{down:#}").contains("failed"), "{down:#}");
    pg.stop()?; // idempotent

    pg.start_again()?;
    assert_eq!(
        pg.psql("SELECT v FROM t")?,
        "42",
        "data survives a clean stop"
    );

    let err = pg.psql("SELECT * FROM no_such_table").unwrap_err();
    assert!(format!("{err:#}").contains("no_such_table"), "{err:#}");

    let dir = pg.dir().to_path_buf();
    let pid_file = dir.join("data/postmaster.pid");
    let pid: u32 = std::fs::read_to_string(&pid_file)?
        .lines()
        .next()
        .unwrap_or_default()
        .parse()?;
    drop(pg);
    assert!(!dir.exists(), "temp dir removed");
    assert!(gone(pid), "postmaster {pid} still running after drop");
    Ok(())
}

/// Whether a process has exited. The postmaster is not our child (pg_ctl detaches it), so after it exits it may
/// linger briefly as a zombie until init reaps it; that counts as gone.
fn gone(pid: u32) -> bool {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
            Err(_) => return true,
            Ok(stat)
                if stat
                    .rsplit(')')
                    .next()
                    .is_some_and(|r| r.trim_start().starts_with('Z')) =>
            {
                return true;
            }
            Ok(_) if std::time::Instant::now() >= deadline => return false,
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// `start_tls`: `ssl = on` with the test certificate; libpq's `sslmode=verify-full` with the test CA gets an
/// encrypted connection, and without it libpq refuses the certificate.
#[test]
fn tls_cluster_accepts_verified_tls() -> anyhow::Result<()> {
    let certs = ferry_testkit::TestCerts::generate()?;
    let server = PostgresServer::start_tls(&certs, "")?;
    let ca = certs.ca_file().to_str().expect("UTF-8 path");
    let url = format!(
        "postgres://postgres@localhost:{}/ferry?sslmode=verify-full&sslrootcert={ca}",
        server.port()
    );
    assert_eq!(
        ferry_testkit::psql(
            &url,
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
        )?,
        "t"
    );
    let other = ferry_testkit::TestCerts::generate()?;
    let wrong = url.replace(ca, other.ca_file().to_str().expect("UTF-8 path"));
    let e = ferry_testkit::psql(&wrong, "SELECT 1").unwrap_err();
    assert!(format!("{e:#}").contains("certificate"), "{e:#}");
    Ok(())
}
