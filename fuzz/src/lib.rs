//! The fuzz targets' shared harness: one real gateway per fuzz process, on the memory engine, listening on a
//! loopback port, with limits raised so the fuzzer is not rate-limited into testing only 429s. The targets drive
//! it over real sockets (HTTP bodies, WebSocket frames) or call the verifier directly (JWT headers).
//!
//! What the targets hold the gateway to: no panic, no 5xx for bad input, and every refusal in the API's own
//! shape (problem+json over HTTP, an error frame or a documented close code over WebSocket).

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use ferry_broker::{EngineConfig, MemoryBroker};
use ferry_gateway::auth::{AuthConfig, MintClaims, mint};
use ferry_gateway::{Gateway, GatewayConfig};
use tokio_util::sync::CancellationToken;

/// The HS256 secret of the fuzzed gateway.
pub const SECRET: &[u8] = b"fuzz-secret-0123456789abcdef-0123456789";

pub struct Harness {
    pub rt: tokio::runtime::Runtime,
    pub addr: SocketAddr,
    pub base: String,
    /// An admin token, valid for a day.
    pub token: String,
    pub http: reqwest::Client,
    pub auth: ferry_gateway::auth::Authenticator,
}

/// The gateway of this fuzz process, started on first use.
pub fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let auth = AuthConfig {
            hs_secret: Some(SECRET.to_vec()),
            ..AuthConfig::default()
        };
        let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), auth.clone());
        let l = &mut config.limits;
        l.http_rate_per_sec = 1_000_000;
        l.http_burst = 1_000_000;
        l.ws_rate_per_sec = 1_000_000;
        l.ws_burst = 1_000_000;
        let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
        let addr = rt.block_on(async {
            let gateway = Gateway::build(config, broker)
                .await
                .expect("gateway builds");
            let addr = gateway.local_addr();
            tokio::spawn(gateway.run(CancellationToken::new()));
            addr
        });
        let token = mint(
            SECRET,
            &MintClaims::new("fuzzer", "admin", Duration::from_secs(86_400)),
        )
        .expect("token");
        let verifier = ferry_gateway::auth::Authenticator::new(auth).expect("authenticator");
        Harness {
            rt,
            addr,
            base: format!("http://{addr}"),
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
            auth: verifier,
        }
    })
}

/// Panics unless an error answer is problem+json with the fields the API promises.
pub fn assert_problem(status: u16, content_type: &str, body: &[u8]) {
    assert!(
        content_type.starts_with("application/problem+json"),
        "{status} answered with content type {content_type:?}: {}",
        String::from_utf8_lossy(body)
    );
    let v: serde_json::Value = serde_json::from_slice(body).expect("problem body is JSON");
    assert_eq!(v["status"].as_u64(), Some(u64::from(status)), "{v}");
    assert!(
        v["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:ferry:problem:")),
        "{v}"
    );
    let detail = v["detail"].as_str().unwrap_or_default();
    for internal in ["struct ", "enum ", "invalid type: map", "ferry_"] {
        assert!(!detail.contains(internal), "a problem names internals: {v}");
    }
}
