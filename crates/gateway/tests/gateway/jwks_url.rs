//! JWKS from a URL against a real HTTP server (axum on an ephemeral port) serving key sets built from keys
//! generated per run: first load, verification, rotation, the unknown-kid rate limit, an identity provider going
//! away, and an unreachable URL at start-up.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferry_broker::{EngineConfig, MemoryBroker};
use ferry_gateway::auth::{AuthConfig, AuthError, Authenticator};
use ferry_gateway::server::GatewayError;
use ferry_gateway::{Gateway, GatewayConfig};
use ferry_testkit::eventually;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// What the fake identity provider serves, and how often it was asked.
#[derive(Default)]
struct Provider {
    jwks: Mutex<Value>,
    cache_control: Mutex<Option<String>>,
    failing: AtomicBool,
    requests: AtomicUsize,
}

struct IdP {
    url: String,
    state: Arc<Provider>,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl IdP {
    async fn start(jwks: Value) -> Self {
        let state = Arc::new(Provider::default());
        *state.jwks.lock().unwrap() = jwks;
        let app = Router::new()
            .route("/jwks.json", get(serve_jwks))
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/jwks.json", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await
                    .unwrap();
            }
        });
        Self {
            url,
            state,
            stop,
            task,
        }
    }

    fn serve(&self, jwks: Value) {
        *self.state.jwks.lock().unwrap() = jwks;
    }

    fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Stop listening, so later fetches get "connection refused".
    async fn shut_down(self) {
        self.stop.cancel();
        self.task.await.unwrap();
    }
}

async fn serve_jwks(State(p): State<Arc<Provider>>) -> Response {
    p.requests.fetch_add(1, Ordering::SeqCst);
    if p.failing.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let body = p.jwks.lock().unwrap().to_string();
    let mut response = ([(header::CONTENT_TYPE, "application/json")], body).into_response();
    if let Some(cc) = p.cache_control.lock().unwrap().clone() {
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, cc.parse().unwrap());
    }
    response
}

// ---- keys and tokens -----------------------------------------------------------------------------------------

fn ec_key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("p256 keygen")
}

fn ed_key() -> rcgen::KeyPair {
    rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 keygen")
}

fn b64url(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ABC[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

fn ec_jwk(kid: &str, kp: &rcgen::KeyPair) -> Value {
    // Uncompressed SEC1 point: 0x04 ‖ x ‖ y.
    let point = kp.public_key_raw();
    json!({ "kty": "EC", "crv": "P-256", "kid": kid, "alg": "ES256", "use": "sig",
            "x": b64url(&point[1..33]), "y": b64url(&point[33..65]) })
}

fn ed_jwk(kid: &str, kp: &rcgen::KeyPair) -> Value {
    json!({ "kty": "OKP", "crv": "Ed25519", "kid": kid, "alg": "EdDSA", "x": b64url(kp.public_key_raw()) })
}

fn jwks(keys: &[Value]) -> Value {
    json!({ "keys": keys })
}

fn claims(sub: &str) -> Value {
    let now = get_current_timestamp();
    json!({ "sub": sub, "exp": now + 600, "iat": now, "scope": "jobs:read" })
}

fn es(kp: &rcgen::KeyPair, kid: &str) -> String {
    let key = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some(kid.into());
    encode(&h, &claims("alice"), &key).unwrap()
}

fn ed(kp: &rcgen::KeyPair, kid: &str) -> String {
    let key = EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap();
    let mut h = Header::new(Algorithm::EdDSA);
    h.kid = Some(kid.into());
    encode(&h, &claims("bob"), &key).unwrap()
}

fn url_config(url: &str) -> AuthConfig {
    AuthConfig {
        jwks_url: Some(url.into()),
        ..AuthConfig::default()
    }
}

fn unknown_kid(r: Result<ferry_gateway::auth::Principal, AuthError>) {
    assert_eq!(r, Err(AuthError::Invalid("unknown key id".into())));
}

// ---- tests ---------------------------------------------------------------------------------------------------

#[tokio::test]
async fn first_load_then_tokens_verify_from_the_cache() {
    let (ec, edk) = (ec_key(), ed_key());
    let idp = IdP::start(jwks(&[ec_jwk("ec-1", &ec), ed_jwk("ed-1", &edk)])).await;

    // `new` does no I/O: the URL's keys are not there yet.
    let cold = Authenticator::new(url_config(&idp.url)).unwrap();
    assert_eq!(idp.requests(), 0);
    unknown_kid(cold.verify(&es(&ec, "ec-1")));

    let auth = Authenticator::start(url_config(&idp.url)).await.unwrap();
    let fetched = idp.requests();
    assert_eq!(auth.verify(&es(&ec, "ec-1")).unwrap().sub, "alice");
    assert_eq!(auth.verify(&ed(&edk, "ed-1")).unwrap().sub, "bob");
    // Pinned per kid: an EdDSA token naming the ES256 key is refused, not tried.
    assert_eq!(
        auth.verify(&ed(&edk, "ec-1")),
        Err(AuthError::Invalid(
            "algorithm does not match the key".into()
        ))
    );
    // Verification reads the cache; it never goes back to the provider for a known kid.
    for _ in 0..20 {
        auth.verify(&es(&ec, "ec-1")).unwrap();
    }
    assert_eq!(idp.requests(), fetched);
}

#[tokio::test]
async fn rotation_is_picked_up_when_a_token_names_the_new_kid() {
    let (old, new) = (ec_key(), ed_key());
    let idp = IdP::start(jwks(&[ec_jwk("old", &old)])).await;
    let auth = Authenticator::start(url_config(&idp.url)).await.unwrap();
    assert_eq!(idp.requests(), 1);

    idp.serve(jwks(&[ed_jwk("new", &new)]));
    let token = ed(&new, "new");
    // `verify` cannot wait: the first sight of the new kid is rejected and wakes the refresher.
    unknown_kid(auth.verify(&token));
    eventually(Duration::from_secs(5), "the rotated key", || async {
        Ok(auth.verify(&token).is_ok().then_some(()))
    })
    .await
    .unwrap();
    assert_eq!(idp.requests(), 2);
    // The old key left the set, so its tokens no longer verify (and, inside the cooldown, fetch nothing).
    unknown_kid(auth.verify(&es(&old, "old")));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(idp.requests(), 2);
}

#[tokio::test]
async fn verify_or_refresh_accepts_the_first_token_of_a_rotated_key() {
    let (old, new) = (ec_key(), ec_key());
    let idp = IdP::start(jwks(&[ec_jwk("k1", &old)])).await;
    let auth = Authenticator::start(url_config(&idp.url)).await.unwrap();

    idp.serve(jwks(&[ec_jwk("k1", &old), ec_jwk("k2", &new)]));
    let p = auth.verify_or_refresh(&es(&new, "k2")).await.unwrap();
    assert_eq!(p.sub, "alice");
    assert_eq!(idp.requests(), 2);
    // Known kids never fetch.
    auth.verify_or_refresh(&es(&old, "k1")).await.unwrap();
    assert_eq!(idp.requests(), 2);
}

#[tokio::test]
async fn unknown_kids_refresh_at_most_once_per_cooldown() {
    let key = ec_key();
    let idp = IdP::start(jwks(&[ec_jwk("real", &key)])).await;
    let auth = Authenticator::start(url_config(&idp.url)).await.unwrap();
    assert_eq!(idp.requests(), 1);

    // A flood of made-up kids, through both entry points.
    for i in 0..50 {
        let token = es(&key, &format!("made-up-{i}"));
        unknown_kid(auth.verify(&token));
        unknown_kid(auth.verify_or_refresh(&token).await);
    }
    // Give the woken refresher time to do whatever it is going to do.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        idp.requests(),
        2,
        "one fetch at start, one for all the unknown kids"
    );
    // The real key is unaffected.
    auth.verify(&es(&key, "real")).unwrap();
}

#[tokio::test]
async fn keys_are_refreshed_periodically() {
    let (a, b) = (ec_key(), ec_key());
    let idp = IdP::start(jwks(&[ec_jwk("a", &a)])).await;
    let auth = Authenticator::start(AuthConfig {
        jwks_refresh: Duration::from_secs(1),
        ..url_config(&idp.url)
    })
    .await
    .unwrap();
    idp.serve(jwks(&[ec_jwk("a", &a), ec_jwk("b", &b)]));
    // No token asks for it: the schedule alone fetches again.
    eventually(Duration::from_secs(5), "a scheduled fetch", || async {
        Ok((idp.requests() >= 2).then_some(()))
    })
    .await
    .unwrap();
    eventually(Duration::from_secs(5), "the new key", || async {
        Ok(auth.verify(&es(&b, "b")).is_ok().then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn cache_control_max_age_below_the_floor_does_not_speed_up_polling() {
    let key = ec_key();
    let idp = IdP::start(jwks(&[ec_jwk("k", &key)])).await;
    *idp.state.cache_control.lock().unwrap() = Some("public, max-age=0".into());
    let _auth = Authenticator::start(url_config(&idp.url)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(idp.requests(), 1, "max-age=0 is raised to the 30 s floor");
}

#[tokio::test]
async fn a_failing_provider_keeps_the_last_good_keys() {
    let key = ed_key();
    let idp = IdP::start(jwks(&[ed_jwk("k", &key)])).await;
    let auth = Authenticator::start(url_config(&idp.url)).await.unwrap();
    let token = ed(&key, "k");
    auth.verify(&token).unwrap();

    // Errors first, then a document that is not a key set, then gone altogether.
    idp.state.failing.store(true, Ordering::SeqCst);
    let err = auth.refresh().await.unwrap_err();
    assert!(
        matches!(&err, AuthError::Unavailable(m) if m.contains("503")),
        "{err}"
    );
    auth.verify(&token).unwrap();

    idp.state.failing.store(false, Ordering::SeqCst);
    idp.serve(json!({ "not": "a jwks" }));
    assert!(matches!(auth.refresh().await, Err(AuthError::Config(_))));
    auth.verify(&token).unwrap();

    let url = idp.url.clone();
    idp.shut_down().await;
    let err = auth.refresh().await.unwrap_err();
    assert!(
        matches!(&err, AuthError::Unavailable(m) if m.contains(&url)),
        "{err}"
    );
    auth.verify(&token).unwrap();
    // An unknown kid while the provider is down: still rejected, old keys still good.
    unknown_kid(auth.verify_or_refresh(&ed(&key, "other")).await);
    auth.verify(&token).unwrap();
}

#[tokio::test]
async fn an_unreachable_url_at_start_is_a_clear_error() {
    // A port that was just free: nothing listens there.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let url = format!("http://127.0.0.1:{port}/jwks.json");
    let err = Authenticator::start(url_config(&url)).await.unwrap_err();
    let AuthError::Unavailable(msg) = &err else {
        panic!("expected Unavailable, got {err:?}");
    };
    assert!(msg.contains(&url), "{msg}");
    assert!(
        err.to_string().starts_with("verification keys unavailable"),
        "{err}"
    );

    // The gateway refuses to start rather than serve with no keys.
    let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
    let config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), url_config(&url));
    match Gateway::build(config, broker).await {
        Err(GatewayError::Auth(AuthError::Unavailable(m))) => assert!(m.contains(&url), "{m}"),
        other => panic!("expected an Unavailable error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_gateway_serves_with_keys_from_the_url() {
    let key = ec_key();
    let idp = IdP::start(jwks(&[ec_jwk("k", &key)])).await;
    let broker = Arc::new(MemoryBroker::new(EngineConfig::default()));
    let config = GatewayConfig::new("127.0.0.1:0".parse().unwrap(), url_config(&idp.url));
    let gateway = Gateway::build(config, broker).await.unwrap();
    assert_eq!(idp.requests(), 1, "build awaits the first load");
    assert_eq!(
        gateway.state().auth.verify(&es(&key, "k")).unwrap().sub,
        "alice"
    );
}

#[tokio::test]
async fn bad_urls_and_kid_clashes_are_config_errors() {
    for bad in ["ftp://127.0.0.1/jwks", "not a url", "file:///etc/jwks.json"] {
        let err = Authenticator::new(url_config(bad)).unwrap_err();
        assert!(matches!(err, AuthError::Config(_)), "{bad}: {err:?}");
    }
    // A kid served by the URL that is also in the JWKS file would make "the key this token names" ambiguous.
    let (a, b) = (ec_key(), ec_key());
    let idp = IdP::start(jwks(&[ec_jwk("same", &a)])).await;
    let err = Authenticator::start(AuthConfig {
        jwks_json: Some(jwks(&[ec_jwk("same", &b)]).to_string()),
        ..url_config(&idp.url)
    })
    .await
    .unwrap_err();
    assert!(
        matches!(&err, AuthError::Config(m) if m.contains("duplicate kid")),
        "{err:?}"
    );
}
