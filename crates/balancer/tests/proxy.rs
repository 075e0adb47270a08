//! The balancer on loopback against real Redis (membership entries written in the documented format) and real
//! upstream servers: small WebSocket/HTTP servers that say which node they are.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ferry_balancer::{Balancer, BalancerConfig, TlsFiles};
use ferry_broker::placement::{NodeInfo, Placement, partition_of};
use ferry_telemetry::prometheus::Registry;
use ferry_testkit::{RedisServer, TestCerts};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_util::sync::CancellationToken;

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// An unsigned token: the balancer reads it without verifying.
fn token(tenant: Option<&str>, sub: &str) -> String {
    let mut claims = serde_json::json!({"sub": sub, "exp": 4_000_000_000u64});
    if let Some(t) = tenant {
        claims["tenant"] = t.into();
    }
    format!(
        "{}.{}.c2ln",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

/// A real upstream: answers a WebSocket upgrade with 101, sends its name, then echoes; answers anything else
/// with 200 and its name.
struct Upstream {
    name: String,
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Upstream {
    async fn start(name: &str) -> Self {
        Self::start_tls(name, None).await
    }

    async fn start_tls(name: &str, tls: Option<tokio_rustls::TlsAcceptor>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let (n, a, s) = (name.to_owned(), accepted.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, _) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
                };
                a.fetch_add(1, Ordering::SeqCst);
                let (n, tls, s) = (n.clone(), tls.clone(), s.clone());
                tokio::spawn(async move {
                    let served = async {
                        match tls {
                            Some(tls) => {
                                if let Ok(io) = tls.accept(tcp).await {
                                    serve_upstream(io, &n).await
                                }
                            }
                            None => serve_upstream(tcp, &n).await,
                        }
                    };
                    tokio::select! { _ = served => {}, _ = s.cancelled() => {} }
                });
            }
        });
        Self {
            name: name.to_owned(),
            addr,
            accepted,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

async fn serve_upstream<S>(mut io: S, name: &str)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (len, key) = loop {
        let n = match io.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut req = httparse::Request::new(&mut headers);
        if let Ok(httparse::Status::Complete(len)) = req.parse(&buf) {
            let key = req
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case("sec-websocket-key"))
                .map(|h| derive_accept_key(h.value));
            break (len, key);
        }
    };
    assert_eq!(len, buf.len(), "nothing after the head in these tests");
    match key {
        Some(accept) => {
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            if io.write_all(head.as_bytes()).await.is_err() {
                return;
            }
            let mut ws =
                tokio_tungstenite::WebSocketStream::from_raw_socket(io, Role::Server, None).await;
            if ws.send(Message::text(name)).await.is_err() {
                return;
            }
            while let Some(Ok(m)) = ws.next().await {
                if m.is_text() && ws.send(m).await.is_err() {
                    return;
                }
            }
        }
        None => {
            let text = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{name}",
                name.len()
            );
            let _ = io.write_all(text.as_bytes()).await;
            let _ = io.shutdown().await;
        }
    }
}

fn node(id: &str, url: &str, connections: u64) -> NodeInfo {
    NodeInfo {
        connections,
        started_at_ms: now_ms(),
        ..NodeInfo::new(id, url)
    }
}

/// Write a membership entry as the gateways do: ZADD ferry:gw <expiry ms> id, HSET ferry:gw:info id <json>.
fn register(redis: &RedisServer, n: &NodeInfo, expires_at_ms: u64) {
    redis
        .cli(&["ZADD", "ferry:gw", &expires_at_ms.to_string(), &n.id])
        .unwrap();
    redis
        .cli(&[
            "HSET",
            "ferry:gw:info",
            &n.id,
            &serde_json::to_string(n).unwrap(),
        ])
        .unwrap();
}

fn live(redis: &RedisServer, n: &NodeInfo) {
    register(redis, n, now_ms() + 600_000);
}

struct Running {
    addr: SocketAddr,
    admin: SocketAddr,
    shared: Arc<ferry_balancer::Shared>,
    stop: CancellationToken,
    done: tokio::task::JoinHandle<()>,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn balancer(redis: &RedisServer, tweak: impl FnOnce(&mut BalancerConfig)) -> Running {
    let mut cfg = BalancerConfig::new("127.0.0.1:0".parse().unwrap(), vec![redis.url()]);
    cfg.admin_listen = Some("127.0.0.1:0".parse().unwrap());
    cfg.drain = Duration::from_secs(1);
    tweak(&mut cfg);
    let b = Balancer::build(cfg, Arc::new(Registry::new()))
        .await
        .expect("balancer builds");
    let (addr, admin, shared) = (b.local_addr(), b.admin_addr().unwrap(), b.shared());
    let stop = CancellationToken::new();
    let done = tokio::spawn(b.run(stop.clone()));
    Running {
        addr,
        admin,
        shared,
        stop,
        done,
    }
}

/// Open a WebSocket through the balancer at `addr`, the token in the query or the header; the first frame
/// names the node.
async fn ws_via(
    addr: SocketAddr,
    token: Option<&str>,
    in_header: bool,
) -> (tokio_tungstenite::WebSocketStream<TcpStream>, String) {
    let url = match (token, in_header) {
        (Some(t), false) => format!("ws://{addr}/v1/ws?token={t}"),
        _ => format!("ws://{addr}/v1/ws"),
    };
    let mut req = url.into_client_request().unwrap();
    if let (Some(t), true) = (token, in_header) {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (mut ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::client_async(req, tcp),
    )
    .await
    .expect("upgrade in time")
    .expect("upgrade");
    let first = tokio::time::timeout(Duration::from_secs(10), ws.next())
        .await
        .expect("a first frame in time")
        .expect("a first frame")
        .unwrap();
    let name = first.into_text().unwrap().to_string();
    (ws, name)
}

/// One raw request through the balancer; the whole answer.
async fn raw(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut tcp = TcpStream::connect(addr).await.unwrap();
    tcp.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn http_get(addr: SocketAddr, path: &str) -> String {
    let text = raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await;
    text.split("\r\n\r\n").nth(1).unwrap_or("").to_owned()
}

async fn metrics(admin: SocketAddr) -> String {
    http_get(admin, "/metrics").await
}

/// The value of one sample line of `text`, 0 when absent.
fn sample(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

async fn three(redis: &RedisServer, connections: u64) -> (Vec<Upstream>, Vec<NodeInfo>) {
    let mut ups = Vec::new();
    let mut nodes = Vec::new();
    for i in 0..3 {
        let u = Upstream::start(&format!("g{i}")).await;
        let n = node(&u.name, &u.url(), connections);
        live(redis, &n);
        nodes.push(n);
        ups.push(u);
    }
    (ups, nodes)
}

#[tokio::test]
async fn upgrades_go_to_the_owner_of_their_partition() {
    let redis = RedisServer::start().unwrap();
    // Room everywhere (the bound is far above what 40 clients add): every client goes to its owner.
    let (_ups, nodes) = three(&redis, 1_000).await;
    let b = balancer(&redis, |_| {}).await;
    let placement = Placement::new(nodes, 0.1);
    let mut seen = HashMap::new();
    for i in 0..40 {
        let (tenant, sub) = if i % 2 == 0 {
            (Some("acme"), format!("user-{i}"))
        } else {
            (None, format!("user-{i}"))
        };
        let owner = placement
            .owner(partition_of(tenant, &sub))
            .unwrap()
            .id
            .clone();
        let (mut ws, got) = ws_via(b.addr, Some(&token(tenant, &sub)), i % 3 == 0).await;
        assert_eq!(got, owner, "{tenant:?}/{sub}");
        *seen.entry(got).or_insert(0) += 1;
        if i == 0 {
            // The tunnel carries frames both ways.
            ws.send(Message::text("ping through")).await.unwrap();
            let echo = ws.next().await.unwrap().unwrap();
            assert_eq!(echo.into_text().unwrap().as_str(), "ping through");
        }
    }
    assert_eq!(seen.len(), 3, "40 subjects reach every node: {seen:?}");
    let m = metrics(b.admin).await;
    assert_eq!(
        sample(&m, r#"ferry_balancer_picks_total{reason="owner"}"#),
        40.0,
        "{m}"
    );
}

#[tokio::test]
async fn subjects_spread_within_the_bound() {
    let redis = RedisServer::start().unwrap();
    let (_ups, nodes) = three(&redis, 0).await;
    let b = balancer(&redis, |_| {}).await;
    // 3,000 distinct subjects through the balancer's own placement and load counting (no sockets).
    let mut counts: HashMap<String, u64> = HashMap::new();
    for i in 0..3_000 {
        let plan = b
            .shared
            .router
            .plan(Some(partition_of(None, &format!("s-{i}"))), true)
            .unwrap();
        let id = plan.snapshot.placement.nodes()[plan.order[0]].id.clone();
        *counts.entry(id).or_default() += 1;
    }
    let max = *counts.values().max().unwrap() as f64;
    eprintln!(
        "3,000 subjects by placement: {counts:?}, max/mean {:.3}",
        max / 1_000.0
    );
    assert!(max / 1_000.0 <= 1.15, "max/mean over 1.15: {counts:?}");
    assert_eq!(counts.values().sum::<u64>(), 3_000);

    // A few hundred real WebSockets through a fresh balancer (its counts start at zero).
    drop(b);
    let b = balancer(&redis, |_| {}).await;
    let mut open = Vec::new();
    let mut per: HashMap<String, u64> = HashMap::new();
    for i in 0..300 {
        let (ws, got) = ws_via(b.addr, Some(&token(Some("t"), &format!("r-{i}"))), false).await;
        *per.entry(got).or_default() += 1;
        open.push(ws);
    }
    let max = *per.values().max().unwrap() as f64;
    eprintln!("300 WebSockets: {per:?}, max/mean {:.3}", max / 100.0);
    assert_eq!(per.len(), 3, "{per:?}");
    assert!(max / 100.0 <= 1.15, "max/mean over 1.15: {per:?}");
    let m = metrics(b.admin).await;
    let open_total: f64 = nodes
        .iter()
        .map(|n| {
            sample(
                &m,
                &format!(r#"ferry_balancer_connections{{upstream="{}"}}"#, n.url),
            )
        })
        .sum();
    assert_eq!(open_total, 300.0, "{m}");
    let owner = sample(&m, r#"ferry_balancer_picks_total{reason="owner"}"#);
    let fallback = sample(&m, r#"ferry_balancer_picks_total{reason="fallback"}"#);
    assert_eq!(owner + fallback, 300.0, "{m}");
    eprintln!("300 WebSockets: owner {owner}, fallback {fallback}");
    assert!(owner >= 200.0, "most clients reach their owner: {m}");
    assert!(
        sample(
            &m,
            r#"ferry_balancer_bytes_total{direction="upstream_to_client"}"#
        ) > 0.0
    );
}

#[tokio::test]
async fn draining_unready_and_expired_gateways_get_nothing() {
    let redis = RedisServer::start().unwrap();
    let ok = Upstream::start("ok").await;
    let draining = Upstream::start("draining").await;
    let unready = Upstream::start("unready").await;
    let expired = Upstream::start("expired").await;
    live(&redis, &node("ok", &ok.url(), 500));
    live(
        &redis,
        &NodeInfo {
            draining: true,
            ..node("draining", &draining.url(), 0)
        },
    );
    live(
        &redis,
        &NodeInfo {
            ready: false,
            ..node("unready", &unready.url(), 0)
        },
    );
    register(
        &redis,
        &node("expired", &expired.url(), 0),
        now_ms() - 1_000,
    );
    // Listed but without an info entry, and an entry that is not NodeInfo: ignored.
    redis
        .cli(&[
            "ZADD",
            "ferry:gw",
            &(now_ms() + 600_000).to_string(),
            "ghost",
        ])
        .unwrap();
    redis
        .cli(&[
            "ZADD",
            "ferry:gw",
            &(now_ms() + 600_000).to_string(),
            "junk",
        ])
        .unwrap();
    redis
        .cli(&["HSET", "ferry:gw:info", "junk", "{not json"])
        .unwrap();
    // A live entry whose URL is not http(s)://host[:port]: left out.
    live(&redis, &node("bad-url", "unix:/run/gw.sock", 0));
    let b = balancer(&redis, |_| {}).await;
    let known: Vec<String> = b
        .shared
        .router
        .snapshot()
        .placement
        .nodes()
        .iter()
        .map(|n| n.id.clone())
        .collect();
    assert_eq!(
        known.len(),
        3,
        "expired, ghost and junk are not members: {known:?}"
    );
    for i in 0..30 {
        let (_ws, got) = ws_via(b.addr, Some(&token(None, &format!("d-{i}"))), true).await;
        assert_eq!(got, "ok");
    }
    for _ in 0..5 {
        assert_eq!(http_get(b.addr, "/v1/jobs").await, "ok");
    }
    for u in [&draining, &unready, &expired] {
        assert_eq!(
            u.accepted.load(Ordering::SeqCst),
            0,
            "{} got a connection",
            u.name
        );
    }
    let m = metrics(b.admin).await;
    assert_eq!(
        sample(&m, r#"ferry_balancer_gateways{state="ready"}"#),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"ferry_balancer_gateways{state="draining"}"#),
        1.0
    );
    assert_eq!(
        sample(&m, r#"ferry_balancer_gateways{state="unready"}"#),
        1.0
    );
}

#[tokio::test]
async fn a_gateway_that_refuses_connections_is_skipped() {
    let redis = RedisServer::start().unwrap();
    let dead_addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let b1 = Upstream::start("b1").await;
    let b2 = Upstream::start("b2").await;
    let nodes = vec![
        node("dead", &format!("http://{dead_addr}"), 1_000),
        node("b1", &b1.url(), 1_000),
        node("b2", &b2.url(), 1_000),
    ];
    for n in &nodes {
        live(&redis, n);
    }
    let b = balancer(&redis, |_| {}).await;
    let placement = Placement::new(nodes, 0.1);
    // Subjects the dead node owns: each goes to the next node of its partition's order.
    let mut owned_by_dead = 0;
    for i in 0..200 {
        let sub = format!("k-{i}");
        let ranked = placement.ranked(partition_of(None, &sub));
        if placement.nodes()[ranked[0]].id != "dead" {
            continue;
        }
        owned_by_dead += 1;
        let (_ws, got) = ws_via(b.addr, Some(&token(None, &sub)), false).await;
        assert_eq!(got, placement.nodes()[ranked[1]].id, "{sub}");
        if owned_by_dead == 8 {
            break;
        }
    }
    assert_eq!(owned_by_dead, 8);
    let m = metrics(b.admin).await;
    let url = format!("http://{dead_addr}");
    // One refused connect, then the node is tried last for a while: no second attempt.
    assert_eq!(
        sample(
            &m,
            &format!(r#"ferry_balancer_upstream_connect_errors_total{{upstream="{url}"}}"#)
        ),
        1.0,
        "{m}"
    );
    assert_eq!(
        sample(&m, r#"ferry_balancer_picks_total{reason="retry"}"#),
        1.0
    );
    assert_eq!(
        sample(&m, r#"ferry_balancer_picks_total{reason="fallback"}"#),
        7.0
    );
}

#[tokio::test]
async fn plain_http_and_tokenless_upgrades_go_to_the_least_loaded() {
    let redis = RedisServer::start().unwrap();
    let mut ups = Vec::new();
    for (name, load) in [("busy", 50), ("idle", 10), ("mid", 30)] {
        let u = Upstream::start(name).await;
        live(&redis, &node(name, &u.url(), load));
        ups.push(u);
    }
    let b = balancer(&redis, |_| {}).await;
    for path in ["/v1/jobs", "/healthz", "/v1/ws?token=not-a-jwt"] {
        assert_eq!(http_get(b.addr, path).await, "idle", "{path}");
    }
    let (_ws, got) = ws_via(b.addr, None, false).await;
    assert_eq!(got, "idle");
    let (_ws, got) = ws_via(b.addr, Some("garbled.token.x"), true).await;
    assert_eq!(got, "idle");
    let m = metrics(b.admin).await;
    assert_eq!(
        sample(&m, r#"ferry_balancer_picks_total{reason="least_loaded"}"#),
        5.0,
        "{m}"
    );
}

fn tls_server(certs: &TestCerts) -> tokio_rustls::TlsAcceptor {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs_der: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(certs.cert_file())
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(certs.key_file()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs_der, key)
    .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

fn tls_client(certs: &TestCerts) -> tokio_rustls::TlsConnector {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(certs.ca_file()).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

#[tokio::test]
async fn tls_is_terminated_and_https_gateways_are_reached() {
    let redis = RedisServer::start().unwrap();
    let certs = TestCerts::generate().unwrap();
    // One plain gateway and one that speaks only TLS (advertised as https://localhost:PORT).
    let plain = Upstream::start("plain").await;
    let secure = Upstream::start_tls("secure", Some(tls_server(&certs))).await;
    live(&redis, &node("plain", &plain.url(), 10));
    live(
        &redis,
        &node(
            "secure",
            &format!("https://localhost:{}", secure.addr.port()),
            0,
        ),
    );
    let b = balancer(&redis, |c| {
        c.tls = Some(TlsFiles {
            cert_pem: certs.cert_file().to_owned(),
            key_pem: certs.key_file().to_owned(),
        });
        c.upstream_ca = Some(certs.ca_file().to_owned());
    })
    .await;
    let connector = tls_client(&certs);
    // WSS through the balancer: the least loaded is the TLS gateway (tokenless).
    let tcp = TcpStream::connect(b.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name.clone(), tcp).await.unwrap();
    let req = format!("wss://localhost:{}/v1/ws", b.addr.port())
        .into_client_request()
        .unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(req, tls).await.unwrap();
    let first = ws.next().await.unwrap().unwrap();
    assert_eq!(first.into_text().unwrap().as_str(), "secure");
    ws.send(Message::text("over tls twice")).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "over tls twice");
    // Plain text on the TLS port is not HTTP: the handshake fails, nothing reaches a gateway.
    let before = plain.accepted.load(Ordering::SeqCst) + secure.accepted.load(Ordering::SeqCst);
    let answer = raw(b.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(!answer.starts_with("HTTP/1.1 200"), "{answer}");
    let after = plain.accepted.load(Ordering::SeqCst) + secure.accepted.load(Ordering::SeqCst);
    assert_eq!(before, after);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let m = metrics(b.admin).await;
    assert_eq!(
        sample(
            &m,
            r#"ferry_balancer_rejected_total{reason="tls_handshake"}"#
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn bad_slow_and_oversized_heads_are_answered_by_the_balancer() {
    let redis = RedisServer::start().unwrap();
    let (ups, _) = three(&redis, 0).await;
    let b = balancer(&redis, |c| c.header_timeout = Duration::from_millis(400)).await;
    let answer = raw(b.addr, b"\x00\x01 garbage\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    assert!(answer.contains("application/problem+json"), "{answer}");
    assert!(answer.contains("urn:ferry:problem:bad-request"), "{answer}");

    let started = std::time::Instant::now();
    let mut tcp = TcpStream::connect(b.addr).await.unwrap();
    tcp.write_all(b"GET /v1/ws HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut out))
        .await
        .expect("closed by the header timeout")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(350) && took < Duration::from_secs(3),
        "{took:?}"
    );

    let mut huge = b"GET / HTTP/1.1\r\nX-Pad: ".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 40 * 1024));
    let answer = raw(b.addr, &huge).await;
    assert!(answer.starts_with("HTTP/1.1 431 "), "{answer}");
    let total: usize = ups.iter().map(|u| u.accepted.load(Ordering::SeqCst)).sum();
    assert_eq!(total, 0, "no head reached a gateway");
    let m = metrics(b.admin).await;
    for r in ["bad_head", "header_timeout", "head_too_large"] {
        assert_eq!(
            sample(
                &m,
                &format!(r#"ferry_balancer_rejected_total{{reason="{r}"}}"#)
            ),
            1.0,
            "{r}: {m}"
        );
    }
}

#[tokio::test]
async fn no_gateway_is_a_503_and_unready() {
    let redis = RedisServer::start().unwrap();
    let b = balancer(&redis, |_| {}).await;
    let answer = raw(b.addr, b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 503 "), "{answer}");
    assert!(answer.contains("Retry-After: 1"), "{answer}");
    assert!(answer.contains("urn:ferry:problem:unavailable"), "{answer}");
    let ready = raw(
        b.admin,
        b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    // A gateway joins: picked up by the next read (every 500 ms).
    let u = Upstream::start("late").await;
    live(&redis, &node("late", &u.url(), 0));
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    assert_eq!(http_get(b.addr, "/v1/jobs").await, "late");
    let ready = raw(
        b.admin,
        b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ready.starts_with("HTTP/1.1 200"), "{ready}");
    // It leaves: its connection series goes too, once it holds no tunnel.
    let series = format!(r#"ferry_balancer_connections{{upstream="{}"}}"#, u.url());
    assert!(metrics(b.admin).await.contains(&series));
    redis.cli(&["ZREM", "ferry:gw", "late"]).unwrap();
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let m = metrics(b.admin).await;
    assert!(!m.contains(&series), "{m}");
    assert_eq!(sample(&m, r#"ferry_balancer_gateways{state="ready"}"#), 0.0);
}

#[tokio::test]
async fn idle_tunnels_are_closed() {
    let redis = RedisServer::start().unwrap();
    let (_ups, _) = three(&redis, 0).await;
    let b = balancer(&redis, |c| c.idle_timeout = Duration::from_millis(500)).await;
    let (mut ws, _) = ws_via(b.addr, Some(&token(None, "idle")), false).await;
    // Activity keeps it open past the timeout...
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        ws.send(Message::text("still here")).await.unwrap();
        assert!(ws.next().await.unwrap().is_ok());
    }
    // ...silence closes it.
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("closed in time");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    let m = metrics(b.admin).await;
    assert_eq!(
        sample(
            &m,
            r#"ferry_balancer_tunnels_closed_total{reason="idle_timeout"}"#
        ),
        1.0,
        "{m}"
    );
}

#[tokio::test]
async fn shutdown_drains_then_closes() {
    let redis = RedisServer::start().unwrap();
    let (_ups, _) = three(&redis, 0).await;
    let mut b = balancer(&redis, |c| c.drain = Duration::from_millis(1_500)).await;
    let (mut ws, _) = ws_via(b.addr, Some(&token(None, "drain")), false).await;
    b.stop.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Not accepting, not ready; the open tunnel still works.
    assert!(TcpStream::connect(b.addr).await.is_err(), "listener closed");
    let ready = raw(
        b.admin,
        b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(ready.starts_with("HTTP/1.1 503"), "{ready}");
    assert!(ready.contains(r#""status":"draining""#), "{ready}");
    ws.send(Message::text("during drain")).await.unwrap();
    let echo = ws.next().await.unwrap().unwrap();
    assert_eq!(echo.into_text().unwrap().as_str(), "during drain");
    // At the end of the drain the tunnel is closed and run() returns.
    let end = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .expect("closed at the end of the drain");
    assert!(!matches!(end, Some(Ok(Message::Text(_)))), "{end:?}");
    tokio::time::timeout(Duration::from_secs(5), &mut b.done)
        .await
        .expect("run returns")
        .unwrap();
}
