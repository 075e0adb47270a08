//! The attack suite: what an attacker tried against the release binary (issue 11), replayed over real sockets
//! against a real gateway, so it stays closed. Forged and stale tokens on HTTP routes and on the WebSocket
//! upgrade, a token the size of a header flood, and tenant and subject isolation of jobs. Each must be refused
//! with the documented problem, never served, never a 5xx.
//!
//! The other attacks of the issue have their suites next to the code they exercise: stalled connections and
//! per-address budgets (`connections.rs`, `fd_exhaustion.rs`), large pushes and ping floods (`ws.rs`), error
//! bodies for every status (`errors.rs`), idempotency keys per subject (`http.rs`), the verifier's own cases
//! with real RSA, EC and Ed25519 keys (`src/auth/tests.rs`), and fuzzing of bodies, frames and headers (`fuzz/`).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_broker::{Broker, EngineConfig, MemoryBroker};
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::support::{SECRET, TestApp, USER, is_problem, token};

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims() -> Value {
    json!({ "sub": "mallory", "exp": now() + 600, "scope": "admin" })
}

fn signed(header: Header, secret: &[u8], claims: &Value) -> String {
    let key = EncodingKey::from_secret(secret).expect("a key");
    encode(&header, claims, &key).expect("signs")
}

/// `{"alg":"none","typ":"JWT"}`, base64url, as the classic forgery sends it.
const ALG_NONE: &str = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";

/// Forged or unusable tokens for a gateway that trusts only `SECRET` (HS256): name → token.
fn forgeries() -> Vec<(&'static str, String)> {
    let good = signed(Header::new(Algorithm::HS256), SECRET, &claims());
    let body = good.split('.').nth(1).unwrap().to_owned();
    let with = |f: fn(&mut Header)| {
        let mut h = Header::new(Algorithm::HS256);
        f(&mut h);
        h
    };
    vec![
        ("alg none, no signature", format!("{ALG_NONE}.{body}.")),
        ("alg none, signature kept", {
            let sig = good.split('.').nth(2).unwrap();
            format!("{ALG_NONE}.{body}.{sig}")
        }),
        (
            "signed with another secret",
            signed(
                Header::new(Algorithm::HS256),
                b"attacker-secret-0123456789abcdef-0123456789abcdef",
                &claims(),
            ),
        ),
        (
            "kid naming a file",
            signed(
                with(|h| h.kid = Some("../../../../../../dev/null".into())),
                b"attacker-secret-0123456789abcdef-0123456789abcdef",
                &claims(),
            ),
        ),
        (
            "jku pointing at the attacker's key set",
            signed(
                with(|h| h.jku = Some("http://127.0.0.1:9/jwks.json".into())),
                b"attacker-secret-0123456789abcdef-0123456789abcdef",
                &claims(),
            ),
        ),
        (
            "x5u pointing at the attacker's certificate",
            signed(
                with(|h| h.x5u = Some("http://127.0.0.1:9/cert.pem".into())),
                b"attacker-secret-0123456789abcdef-0123456789abcdef",
                &claims(),
            ),
        ),
        (
            "expired an hour ago",
            signed(
                Header::new(Algorithm::HS256),
                SECRET,
                &json!({ "sub": "mallory", "exp": now() - 3600, "scope": "admin" }),
            ),
        ),
        (
            "not valid for another hour",
            signed(
                Header::new(Algorithm::HS256),
                SECRET,
                &json!({ "sub": "mallory", "exp": now() + 7200, "nbf": now() + 3600, "scope": "admin" }),
            ),
        ),
        (
            "no subject",
            signed(
                Header::new(Algorithm::HS256),
                SECRET,
                &json!({ "exp": now() + 600, "scope": "admin" }),
            ),
        ),
        (
            "no expiry",
            signed(
                Header::new(Algorithm::HS256),
                SECRET,
                &json!({ "sub": "mallory", "scope": "admin" }),
            ),
        ),
        ("garbage", "not.a.token".into()),
    ]
}

/// A fresh node whose failed-authentication budget is out of the way: each case below fails once per forgery,
/// and the budget (tested in connections.rs) would turn later 401s into 429s.
async fn node() -> TestApp {
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new(EngineConfig::default()));
    TestApp::start(broker, |c| {
        c.limits.unauth_upgrades_per_sec_per_ip = 100_000
    })
    .await
}

#[tokio::test]
async fn forged_tokens_are_refused_on_every_kind_of_route() {
    let app = node().await;
    for (what, t) in forgeries() {
        for path in [
            "/v1/queues",
            "/v1/jobs/0190c5d2-0000-7000-8000-000000000000",
        ] {
            let r = app.get(path, &t).await;
            assert_eq!(
                r.status,
                StatusCode::UNAUTHORIZED,
                "{what} on {path}: {r:?}"
            );
            is_problem(&r, 401, "unauthorized");
        }
        let r = app
            .post("/v1/queues/q/jobs", &t, json!({ "kind": "k" }))
            .await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{what} on submit: {r:?}"
        );
        // The WebSocket upgrade: refused before the handshake, with the same problem.
        let r = app.anon(&format!("/v1/ws?token={t}")).await;
        assert_eq!(
            r.status,
            StatusCode::UNAUTHORIZED,
            "{what} on the upgrade: {r:?}"
        );
        is_problem(&r, 401, "unauthorized");
    }
    // Nothing forged reached the engine.
    let admin = token("root", "admin", None);
    let q = app.get("/v1/queues", &admin).await;
    assert_eq!(q.body["queues"].as_array().map(Vec::len), Some(0), "{q:?}");
}

#[tokio::test]
async fn a_hmac_token_keyed_with_the_public_key_is_refused() {
    // The gateway trusts one ES256 public key; the attacker signs HS256 with that public key's PEM as the
    // secret, hoping the verifier uses whatever key it has with whatever algorithm the header names.
    let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let pem = kp.public_key_pem();
    let broker: Arc<dyn Broker> = Arc::new(MemoryBroker::new(EngineConfig::default()));
    let app = TestApp::start(broker, |c| {
        c.auth.hs_secret = None;
        c.auth.public_key_pems = vec![pem.clone()];
        c.limits.unauth_upgrades_per_sec_per_ip = 100_000;
    })
    .await;
    let forged = signed(Header::new(Algorithm::HS256), pem.as_bytes(), &claims());
    let r = app.get("/v1/queues", &forged).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{r:?}");
    is_problem(&r, 401, "unauthorized");
    // The same claims, properly signed with the private key, are served.
    let key = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    let good = encode(&Header::new(Algorithm::ES256), &claims(), &key).unwrap();
    assert_eq!(app.get("/v1/queues", &good).await.status, StatusCode::OK);
}

#[tokio::test]
async fn a_token_of_a_megabyte_is_refused_as_a_problem() {
    let app = node().await;
    let huge = format!("{}.{}.x", "a".repeat(512 * 1024), "b".repeat(512 * 1024));
    let r = app.get("/v1/queues", &huge).await;
    assert!(
        r.status.is_client_error(),
        "a 1 MiB token is a client error, not {}: {r:?}",
        r.status
    );
    assert!(
        r.body["type"]
            .as_str()
            .is_some_and(|t| t.starts_with("urn:ferry:problem:")),
        "{r:?}"
    );
    // The node still serves.
    let admin = token("root", "admin", None);
    assert_eq!(app.get("/v1/queues", &admin).await.status, StatusCode::OK);
}

#[tokio::test]
async fn jobs_never_cross_tenants_or_subjects() {
    let app = node().await;
    let alice = token("alice", USER, Some("acme"));
    let r = app
        .post("/v1/queues/mail/jobs", &alice, json!({ "kind": "send" }))
        .await;
    assert_eq!(r.status, StatusCode::ACCEPTED, "{r:?}");
    let id = r.body["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/jobs/{id}");
    let others = [
        ("bob of the same tenant", token("bob", USER, Some("acme"))),
        (
            "alice of another tenant",
            token("alice", USER, Some("globex")),
        ),
        (
            "an admin of another tenant",
            token("root", "admin", Some("globex")),
        ),
        ("alice without a tenant", token("alice", USER, None)),
    ];
    for (who, t) in &others {
        let r = app.get(&path, t).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{who} reads alice's job: {r:?}"
        );
        is_problem(&r, 404, "not-found");
        let r = app.delete(&path, t).await;
        assert_eq!(
            r.status,
            StatusCode::NOT_FOUND,
            "{who} cancels alice's job: {r:?}"
        );
        let r = app.get("/v1/queues/mail", t).await;
        assert_ne!(r.body["depth"], 1, "{who} sees alice's queue: {r:?}");
    }
    // Alice and her tenant's admin still see it, untouched by the attempts.
    let r = app.get(&path, &alice).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.body["state"], "queued", "{r:?}");
    let admin = token("root", "admin", Some("acme"));
    assert_eq!(app.get(&path, &admin).await.status, StatusCode::OK);
}
