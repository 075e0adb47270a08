//! The gateway serves HTTPS with a certificate generated for the test (rcgen), verified by a real rustls client
//! that trusts only that certificate; bad certificate files are refused at build time, naming the flag.

use std::sync::Arc;
use std::time::Duration;

use ferry_broker::{EngineConfig, MemoryBroker};
use ferry_gateway::auth::AuthConfig;
use ferry_gateway::config::TlsConfig;
use ferry_gateway::{Gateway, GatewayConfig};
use tokio_util::sync::CancellationToken;

fn auth() -> AuthConfig {
    AuthConfig {
        hs_secret: Some(b"0123456789abcdef0123456789abcdef-tls".to_vec()),
        leeway: Duration::from_secs(5),
        ..AuthConfig::default()
    }
}

#[tokio::test]
async fn https_with_a_generated_certificate() {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();

    let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), auth());
    config.tls = Some(TlsConfig {
        cert_pem: cert_path,
        key_pem: key_path,
    });
    config.connections.header_timeout = Duration::from_millis(500);
    let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
    let gateway = Gateway::build(config, broker).await.unwrap();
    let port = gateway.local_addr().port();
    let shutdown = CancellationToken::new();
    let served = tokio::spawn(gateway.run(shutdown.clone()));

    let client = reqwest::Client::builder()
        .use_rustls_tls()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert.cert.pem().as_bytes()).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .build()
        .unwrap();
    let res = client
        .get(format!("https://localhost:{port}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(res.status(), 200);

    // A client that does not trust the certificate fails the handshake.
    let untrusting = reqwest::Client::builder()
        .use_rustls_tls()
        .resolve("localhost", ([127, 0, 0, 1], port).into())
        .build()
        .unwrap();
    assert!(
        untrusting
            .get(format!("https://localhost:{port}/healthz"))
            .send()
            .await
            .is_err()
    );
    // Plain HTTP on the TLS port gets no HTTP answer.
    assert!(
        reqwest::get(format!("http://127.0.0.1:{port}/healthz"))
            .await
            .map(|r| r.status() != 200)
            .unwrap_or(true)
    );

    // A socket that never completes its handshake is closed after the header timeout, whether silent or
    // stalled inside its ClientHello.
    for first in [&b""[..], &[0x16, 0x03, 0x01, 0x02, 0x00, 0x01][..]] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(first).await.unwrap();
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(10), async {
            while let Ok(n) = s.read(&mut buf).await
                && n > 0
            {}
        })
        .await;
        assert!(closed.is_ok(), "still open after 10 s ({first:?} sent)");
    }

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), served)
        .await
        .expect("the gateway stops")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn bad_certificate_files_are_refused_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate").unwrap();
    let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), auth());
    config.tls = Some(TlsConfig {
        cert_pem: empty.clone(),
        key_pem: empty,
    });
    let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
    let err = Gateway::build(config, broker)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("--tls-cert"), "{err}");
}
