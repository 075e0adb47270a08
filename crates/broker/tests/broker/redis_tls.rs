//! The Redis engine over TLS (`rediss://`) against a real TLS-only redis-server with a private CA generated for
//! the test: every kind of connection (commands, blocking reads, job-event pub/sub, application channels) must
//! work, and an untrusted server certificate must be refused with a message that says so.

use std::time::Duration;

use ferry_broker::{Completion, EngineConfig, RedisBroker, RedisOptions, RedisTls, prelude::*};
use ferry_core::{EventType, Kind, NewJob, QueueName};
use ferry_testkit::{RedisServer, TestCerts};
use futures::StreamExt;
use serde_json::json;

fn q(s: &str) -> QueueName {
    QueueName::parse(s).unwrap()
}

fn noop() -> NewJob {
    NewJob::new(Kind::parse("ferry.noop").unwrap(), json!({"n": 1}))
}

fn trusting(certs: &TestCerts) -> RedisTls {
    RedisTls {
        ca_pem: Some(certs.ca_pem().unwrap()),
    }
}

async fn connect(url: &str, tls: RedisTls) -> Result<RedisBroker, ferry_broker::BrokerError> {
    let options = RedisOptions {
        response_timeout: Duration::from_secs(5),
        connection_timeout: Duration::from_secs(2),
        cluster_vshards: None,
    };
    RedisBroker::connect_with_tls(&[url.to_owned()], EngineConfig::default(), options, tls).await
}

#[tokio::test]
async fn engine_cycle_and_pubsub_over_tls() {
    let certs = TestCerts::generate().unwrap();
    let server = RedisServer::start_tls(&certs, &[]).unwrap();
    assert!(server.url().starts_with("rediss://"), "{}", server.url());
    // The server has no plain TCP port at all: whatever works below went through TLS.
    assert_eq!(server.cli(&["CONFIG", "GET", "port"]).unwrap(), "port\n0");

    let b = connect(&server.url(), trusting(&certs)).await.unwrap();
    b.ping().await.unwrap();
    let queue = q("tls");

    let mut events = b.subscribe().await.unwrap();
    let feed = b.channels().await.unwrap();
    let (control, mut messages) = feed.into_parts();
    tokio::time::timeout(Duration::from_secs(10), control.subscribe("room"))
        .await
        .expect("subscribe confirmed in time")
        .unwrap();

    // A claim that waits: the blocking read runs on its own TLS connection.
    let b = std::sync::Arc::new(b);
    let claim = {
        let (b, queue) = (b.clone(), queue.clone());
        tokio::spawn(async move { b.claim(&queue, "c1", 10, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let enq = b.enqueue(&queue, noop()).await.unwrap();
    let leased = claim.await.unwrap().unwrap();
    assert_eq!(leased.len(), 1);
    assert_eq!(leased[0].job.id, enq.id);
    let done = b
        .complete(vec![Completion {
            lease: leased[0].lease.clone(),
            result: json!({"ok": true}),
        }])
        .await
        .unwrap();
    assert!(done[0].is_ok(), "{done:?}");
    assert_eq!(
        b.job(enq.id).await.unwrap().unwrap().result,
        Some(json!({"ok": true}))
    );

    // The job's events arrive over the TLS pub/sub connection (the subscription may still be settling:
    // pub/sub loses what is published before it, so look for the completion of this job).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut seen = Vec::new();
    while let Ok(Some(e)) = tokio::time::timeout_at(deadline, events.next()).await {
        seen.push((e.job, e.ty));
        if e.job == enq.id && e.ty == EventType::Completed {
            break;
        }
    }
    assert!(
        seen.contains(&(enq.id, EventType::Completed)),
        "no completed event for {}: {seen:?}",
        enq.id
    );

    // Application channels too.
    b.publish("room", "hello over tls".into()).await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(10), messages.next())
        .await
        .expect("channel message in time")
        .expect("feed open");
    assert_eq!(
        (msg.channel.as_str(), msg.payload.as_str()),
        ("room", "hello over tls")
    );
}

#[tokio::test]
async fn untrusted_server_certificate_is_refused() {
    let certs = TestCerts::generate().unwrap();
    let server = RedisServer::start_tls(&certs, &[]).unwrap();
    let other = TestCerts::generate().unwrap();

    // Another CA than the one that signed the server's certificate.
    let e = connect(&server.url(), trusting(&other)).await.unwrap_err();
    let msg = e.to_string();
    assert!(
        msg.contains("certificate") && msg.contains("UnknownIssuer"),
        "the error names the certificate problem: {msg}"
    );
    assert!(msg.contains("rediss://127.0.0.1"), "{msg}");

    // The system roots (no CA given) do not know the test CA either.
    let e = connect(&server.url(), RedisTls::default())
        .await
        .unwrap_err();
    assert!(e.to_string().contains("certificate"), "{e}");

    // A CA file that is not PEM is a configuration error, reported as such.
    let e = connect(
        &server.url(),
        RedisTls {
            ca_pem: Some(b"not a certificate".to_vec()),
        },
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("no PEM certificate"), "{e}");

    // A plain client cannot talk to the TLS port.
    let plain = server.url().replacen("rediss://", "redis://", 1);
    assert!(connect(&plain, RedisTls::default()).await.is_err());
}
