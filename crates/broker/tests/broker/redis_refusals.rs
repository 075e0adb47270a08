//! Redis refusing a client, provoked on real servers (ferry-testkit): the error names the cause and the fix
//! instead of the driver's `broken pipe` / `NOAUTH` / `AuthenticationFailed` wording.

use ferry_broker::{EngineConfig, RedisBroker, prelude::*};
use ferry_core::{Kind, NewJob, QueueName};
use ferry_testkit::RedisServer;

async fn connect_error(url: &str) -> String {
    match RedisBroker::connect(&[url.to_owned()], EngineConfig::default()).await {
        Ok(_) => panic!("{url} connected"),
        Err(e) => e.to_string(),
    }
}

#[tokio::test]
async fn a_missing_or_wrong_password_is_named() {
    let redis = RedisServer::start().expect("redis-server starts");
    // Set after the start: the harness's readiness probe has no password.
    redis
        .cli(&["CONFIG", "SET", "requirepass", "s3cret-pw"])
        .expect("config set");
    let port = redis.port();

    let e = connect_error(&format!("redis://127.0.0.1:{port}")).await;
    assert!(
        e.contains("requires a password (NOAUTH)") && e.contains("redis://:PASSWORD@HOST:PORT"),
        "{e}"
    );
    let e = connect_error(&format!("redis://:n0t-the-pw@127.0.0.1:{port}")).await;
    assert!(
        e.contains("refused the password") && e.contains("--redis URL"),
        "{e}"
    );
    assert!(!e.contains("n0t-the-pw"), "the password is not shown: {e}");
    // The right one works.
    RedisBroker::connect(
        &[format!("redis://:s3cret-pw@127.0.0.1:{port}")],
        EngineConfig::default(),
    )
    .await
    .expect("connects with the password");
}

/// Protected mode refuses clients that are not on the loopback interface: the server is bound to this host's
/// own non-loopback address too, and the broker connects through it.
#[tokio::test]
async fn protected_mode_is_named_not_a_reset() {
    // The address this host would send from; no packet is sent.
    let ip = std::net::UdpSocket::bind("0.0.0.0:0")
        .and_then(|s| s.connect("192.0.2.1:9").map(|_| s))
        .and_then(|s| s.local_addr())
        .map(|a| a.ip());
    let ip = match ip {
        Ok(ip) if !ip.is_loopback() && !ip.is_unspecified() => ip.to_string(),
        // A test that cannot run fails, saying why, rather than passing without having run.
        other => panic!(
            "this test needs a non-loopback address to reach Redis through, and this host has none \
             ({other:?}); the mapping of -DENIED alone is covered by refusal::tests"
        ),
    };
    let bind = format!("127.0.0.1 {ip}");
    let redis = RedisServer::start_with(&["--bind", &bind, "--protected-mode", "yes"])
        .unwrap_or_else(|e| {
            panic!("redis-server cannot bind {ip}, so this test cannot run: {e:#}")
        });
    let e = connect_error(&format!("redis://{ip}:{}", redis.port())).await;
    assert!(
        e.contains("protected mode") && e.contains("requirepass") && e.contains(&ip),
        "{e}"
    );
    assert!(!e.contains("os error") && !e.contains("broken pipe"), "{e}");
}

#[tokio::test]
async fn out_of_memory_is_named() {
    let redis = RedisServer::start().expect("redis-server starts");
    let broker = RedisBroker::connect(&[redis.url()], EngineConfig::default())
        .await
        .expect("connects");
    redis
        .cli(&["CONFIG", "SET", "maxmemory", "1"])
        .expect("config set");
    let q = QueueName::parse("q").unwrap();
    let job = NewJob::new(Kind::parse("k").unwrap(), serde_json::json!({}));
    let e = broker
        .enqueue_batch(&q, vec![job])
        .await
        .expect_err("refused")
        .to_string();
    assert!(
        e.contains("refuses writes (OOM)") && e.contains("maxmemory"),
        "{e}"
    );
}
