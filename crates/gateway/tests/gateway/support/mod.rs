//! What the resilience and query tests share: a real gateway on 127.0.0.1:0 driven over real HTTP (reqwest) and
//! WebSocket (tokio-tungstenite), real HS256 tokens, and a broker wrapper with switches (the event-log backlog it
//! reports, a stalled channel feed, stalled submissions).

use std::sync::Arc;
use std::time::Duration;

use ferry_broker::{Broker, EngineConfig, MemoryBroker};
use ferry_gateway::auth::{AuthConfig, MintClaims, mint};
use ferry_gateway::{Gateway, GatewayConfig};
use ferry_testkit::faulty::FaultyBroker;
use futures::{SinkExt, StreamExt};
use reqwest::{Method, StatusCode};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const SECRET: &[u8] = b"test-secret-test-secret-test-secret!";
pub const USER: &str = "jobs:submit jobs:read jobs:cancel subscribe";
pub const ADMIN: &str = "admin jobs:submit jobs:read jobs:cancel";

pub struct TestApp {
    pub base: String,
    pub addr: std::net::SocketAddr,
    pub client: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
}

impl Reply {
    /// A response's status, headers and JSON body (`Null` when the body is not JSON).
    pub async fn read(res: reqwest::Response) -> Self {
        let (status, headers) = (res.status(), res.headers().clone());
        let body = res.json().await.unwrap_or(Value::Null);
        Reply {
            status,
            headers,
            body,
        }
    }

    /// The `field` of the first entry of a problem's `errors`.
    pub fn field(&self) -> &str {
        self.body["errors"][0]["field"].as_str().unwrap_or("")
    }

    /// `Retry-After` in whole seconds.
    pub fn retry_after(&self) -> Option<u64> {
        self.headers.get("retry-after")?.to_str().ok()?.parse().ok()
    }
}

/// Asserts a problem+json answer with this status and problem type slug.
pub fn is_problem(r: &Reply, status: u16, slug: &str) {
    assert_eq!(r.status.as_u16(), status, "{:?}", r.body);
    assert_eq!(
        r.headers["content-type"], "application/problem+json",
        "{:?}",
        r.body
    );
    assert_eq!(r.body["status"], status);
    assert_eq!(
        r.body["type"],
        format!("urn:ferry:problem:{slug}"),
        "{:?}",
        r.body
    );
}

impl TestApp {
    pub async fn start(broker: Arc<dyn Broker>, tweak: impl FnOnce(&mut GatewayConfig)) -> Self {
        let auth = AuthConfig {
            hs_secret: Some(SECRET.to_vec()),
            ..AuthConfig::default()
        };
        let mut config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), auth);
        tweak(&mut config);
        let gateway = Gateway::build(config, broker)
            .await
            .expect("gateway builds");
        let addr = gateway.local_addr();
        let shutdown = CancellationToken::new();
        tokio::spawn(gateway.run(shutdown.clone()));
        let app = Self {
            base: format!("http://{addr}"),
            addr,
            // Bounded, so a gateway that hangs fails the test instead of blocking it.
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(20))
                .build()
                .unwrap(),
            shutdown,
        };
        app.settle().await;
        app
    }

    /// Give the node up to 5 s to become ready (its subscriptions start in the background), so tests begin
    /// from a settled node; one that never gets there is left to the test's own assertions.
    async fn settle(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while tokio::time::Instant::now() < deadline {
            if self.anon("/readyz").await.status == 200 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn send(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> Reply {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(b);
        }
        let res = req.send().await.expect("request answered");
        let (status, headers) = (res.status(), res.headers().clone());
        let text = res.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
        Reply {
            status,
            headers,
            body,
        }
    }

    /// A node on a fresh memory engine, and the engine.
    pub async fn memory() -> (Self, Arc<MemoryBroker>) {
        let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
        (Self::start(broker.clone(), |_| {}).await, broker)
    }

    /// POST a body as is (malformed JSON, oversized bodies).
    pub async fn raw_post(&self, path: &str, token: &str, body: impl Into<reqwest::Body>) -> Reply {
        let res = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        Reply::read(res).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Reply {
        self.send(Method::GET, path, Some(token), None).await
    }

    pub async fn post(&self, path: &str, token: &str, body: Value) -> Reply {
        self.send(Method::POST, path, Some(token), Some(&body))
            .await
    }

    pub async fn delete(&self, path: &str, token: &str) -> Reply {
        self.send(Method::DELETE, path, Some(token), None).await
    }

    pub async fn anon(&self, path: &str) -> Reply {
        self.send(Method::GET, path, None, None).await
    }

    pub async fn metrics(&self) -> String {
        match self.anon("/metrics").await.body {
            Value::String(s) => s,
            other => panic!("metrics are text: {other:?}"),
        }
    }

    pub async fn ws(&self, token: &str) -> Ws {
        let url = format!("ws://{}/v1/ws?token={token}", self.addr);
        let (ws, _) = tokio_tungstenite::connect_async(url)
            .await
            .expect("upgrade");
        ws
    }
}

pub fn token(sub: &str, scopes: &str, tenant: Option<&str>) -> String {
    mint(
        SECRET,
        &MintClaims::new(sub, scopes, Duration::from_secs(3600)).in_tenant(tenant),
    )
    .expect("token minted")
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Send a frame and wait for the reply with the same `id` (pushed events skipped).
pub async fn ws_call(ws: &mut Ws, frame: Value) -> Value {
    let id = frame["id"].clone();
    ws.send(Message::text(frame.to_string()))
        .await
        .expect("send");
    loop {
        let m = tokio::time::timeout(Duration::from_secs(15), ws.next())
            .await
            .expect("a reply in time")
            .expect("stream open")
            .expect("frame ok");
        if let Message::Text(t) = m {
            let v: Value = serde_json::from_str(t.as_str()).expect("JSON");
            if v["id"] == id {
                return v;
            }
        }
    }
}

/// A real broker behind switches (`ferry_testkit::faulty::FaultyBroker`), reporting no recorder backlog unless a
/// test sets one: these gateways run without a recorder, so the engine's own backlog would only grow.
pub fn switched(inner: Arc<dyn Broker>) -> Arc<FaultyBroker> {
    let broker = FaultyBroker::new(inner);
    broker.set_backlog(Some(0));
    broker
}

/// Publishes of the pub/sub canary so far.
pub fn canary_publishes(broker: &FaultyBroker) -> usize {
    broker
        .published()
        .iter()
        .filter(|c| c.starts_with("ferry.canary."))
        .count()
}
