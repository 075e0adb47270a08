//! The redis-server wrapper against a real redis-server: readiness, persistence across a graceful restart,
//! crash by SIGKILL, cleanup on drop.

use ferry_testkit::{RedisServer, redis_cli};

#[test]
fn starts_on_a_private_port_and_answers() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    assert_ne!(redis.port(), 6379, "must never use the system redis port");
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{}", redis.port()));
    assert_eq!(redis.cli(&["PING"])?, "PONG");
    assert_eq!(
        redis.cli(&["CONFIG", "GET", "appendonly"])?,
        "appendonly\nyes"
    );
    assert_eq!(
        redis.cli(&["CONFIG", "GET", "save"])?,
        "save",
        "no RDB snapshots"
    );
    assert!(redis.pid().is_some());
    Ok(())
}

#[test]
fn graceful_restart_keeps_data() -> anyhow::Result<()> {
    let mut redis = RedisServer::start()?;
    let port = redis.port();
    let first_pid = redis.pid();
    redis.cli(&["SET", "k", "v"])?;
    redis.cli(&["XADD", "s", "*", "f", "1"])?;

    redis.stop()?;
    assert!(!redis.is_running());
    assert_eq!(redis.pid(), None);
    redis.stop()?; // idempotent

    redis.restart()?;
    assert!(redis.is_running());
    assert_eq!(redis.port(), port, "a restart keeps the port clients know");
    assert_ne!(redis.pid(), first_pid);
    assert_eq!(redis.cli(&["GET", "k"])?, "v", "{}", redis.log_tail());
    assert_eq!(redis.cli(&["XLEN", "s"])?, "1");

    // Restarting a running server stops it gracefully first.
    redis.cli(&["SET", "k2", "v2"])?;
    redis.restart()?;
    assert_eq!(redis.cli(&["GET", "k2"])?, "v2");
    Ok(())
}

#[test]
fn kill_is_a_crash_and_restart_recovers() -> anyhow::Result<()> {
    let mut redis = RedisServer::start()?;
    let pid = redis.pid().expect("running");
    redis.kill();
    assert!(!redis.is_running());
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "process reaped"
    );
    let answer = redis_cli(redis.port(), &["PING"]);
    assert!(!matches!(&answer, Ok(r) if r == "PONG"), "{answer:?}");
    redis.kill(); // idempotent

    redis.restart()?;
    assert_eq!(redis.cli(&["PING"])?, "PONG");
    Ok(())
}

#[test]
fn extra_args_override_defaults() -> anyhow::Result<()> {
    let redis = RedisServer::start_with(&["--appendonly", "no", "--maxmemory", "10mb"])?;
    assert_eq!(
        redis.cli(&["CONFIG", "GET", "appendonly"])?,
        "appendonly\nno"
    );
    assert_eq!(
        redis.cli(&["CONFIG", "GET", "maxmemory"])?,
        "maxmemory\n10485760"
    );
    Ok(())
}

#[test]
fn bad_arguments_fail_with_the_log() {
    let err = RedisServer::start_with(&["--no-such-option", "1"]).unwrap_err();
    let msg = format!("{err:#}");
    assert!(
        msg.contains("no-such-option"),
        "error should carry the log tail: {msg}"
    );
}

#[test]
fn drop_kills_the_server_and_removes_its_dir() -> anyhow::Result<()> {
    let redis = RedisServer::start()?;
    let pid = redis.pid().expect("running");
    let dir = redis.dir().to_path_buf();
    drop(redis);
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists());
    assert!(!dir.exists());
    Ok(())
}

#[test]
fn several_servers_at_once_get_distinct_ports() -> anyhow::Result<()> {
    let servers = (0..3)
        .map(|_| RedisServer::start())
        .collect::<anyhow::Result<Vec<_>>>()?;
    let mut ports: Vec<u16> = servers.iter().map(RedisServer::port).collect();
    ports.sort();
    ports.dedup();
    assert_eq!(ports.len(), 3);
    for s in &servers {
        s.cli(&["SET", "owner", &s.port().to_string()])?;
    }
    for s in &servers {
        assert_eq!(s.cli(&["GET", "owner"])?, s.port().to_string());
    }
    Ok(())
}

/// A TLS server has no plain port; the harness still reaches it (unix socket), a restart keeps TLS and data, and a
/// TLS client with the test CA gets through (`openssl s_client`-free: redis-cli's TLS mode).
#[test]
fn tls_server_serves_only_tls_and_restarts() -> anyhow::Result<()> {
    let certs = ferry_testkit::TestCerts::generate()?;
    let mut server = RedisServer::start_tls(&certs, &[])?;
    assert!(server.is_tls());
    assert_eq!(
        server.url(),
        format!("rediss://127.0.0.1:{}", server.port())
    );
    assert_eq!(server.cli(&["CONFIG", "GET", "port"])?, "port\n0");
    assert_eq!(
        server.cli(&["CONFIG", "GET", "tls-port"])?,
        format!("tls-port\n{}", server.port())
    );
    server.cli(&["SET", "k", "v"])?;
    // Plain RESP on the TLS port gets no answer.
    assert!(redis_cli(server.port(), &["PING"]).map_or(true, |out| !out.contains("PONG")));
    let over_tls = std::process::Command::new("redis-cli")
        .args(["--tls", "--cacert"])
        .arg(certs.ca_file())
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &server.port().to_string(),
            "GET",
            "k",
        ])
        .output()?;
    assert_eq!(String::from_utf8_lossy(&over_tls.stdout).trim(), "v");
    server.restart()?;
    assert_eq!(server.cli(&["GET", "k"])?, "v");
    assert_eq!(server.cli(&["CONFIG", "GET", "port"])?, "port\n0");
    server.stop()?;
    assert!(!server.is_running());
    Ok(())
}
