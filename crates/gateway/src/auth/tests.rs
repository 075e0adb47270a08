//! Verification tests with real keys, generated per test run (no key material is checked in).

use std::sync::OnceLock;
use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode, get_current_timestamp};
use rsa::pkcs1::{EncodeRsaPrivateKey, EncodeRsaPublicKey};
use rsa::pkcs8::{EncodePublicKey, LineEnding};
use rsa::traits::PublicKeyParts;
use serde_json::{Value, json};

use super::*;

const SECRET: &[u8] = b"0123456789abcdef0123456789abcdef-test-only";

/// `rsa` 0.10 wants a `rand_core` 0.10 RNG; the workspace's `rand` is 0.9, so bridge the two.
struct BridgeRng;

impl rsa::rand_core::TryRng for BridgeRng {
    type Error = std::convert::Infallible;
    fn try_next_u32(&mut self) -> Result<u32, Self::Error> {
        Ok(rand::random())
    }
    fn try_next_u64(&mut self) -> Result<u64, Self::Error> {
        Ok(rand::random())
    }
    fn try_fill_bytes(&mut self, dst: &mut [u8]) -> Result<(), Self::Error> {
        rand::fill(dst);
        Ok(())
    }
}

// `rand::random` draws from the thread-local ChaCha CSPRNG seeded by the OS.
impl rsa::rand_core::TryCryptoRng for BridgeRng {}

struct RsaKey {
    private_pem: String,
    /// SubjectPublicKeyInfo ("PUBLIC KEY").
    public_pem: String,
    /// PKCS#1 ("RSA PUBLIC KEY").
    public_pkcs1_pem: String,
    n: Vec<u8>,
    e: Vec<u8>,
}

/// One 2048-bit key per test binary: generation is slow in debug builds.
fn rsa_key() -> &'static RsaKey {
    static KEY: OnceLock<RsaKey> = OnceLock::new();
    KEY.get_or_init(|| {
        let private = rsa::PrivateKey::new(&mut BridgeRng, 2048).expect("rsa keygen");
        let public = private.to_public_key();
        RsaKey {
            private_pem: private
                .to_pkcs1_pem(LineEnding::LF)
                .expect("pem")
                .to_string(),
            public_pem: public.to_public_key_pem(LineEnding::LF).expect("pem"),
            public_pkcs1_pem: public.to_pkcs1_pem(LineEnding::LF).expect("pem"),
            n: public.n_bytes().to_vec(),
            e: public.e_bytes().to_vec(),
        }
    })
}

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

fn now() -> u64 {
    get_current_timestamp()
}

fn claims() -> Value {
    json!({ "sub": "alice", "exp": now() + 600, "iat": now(), "scope": "jobs:submit" })
}

fn sign(alg: Algorithm, kid: Option<&str>, key: &EncodingKey, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).expect("sign")
}

fn hs(alg: Algorithm, claims: &Value) -> String {
    sign(
        alg,
        None,
        &EncodingKey::from_secret(SECRET).unwrap(),
        claims,
    )
}

fn rs(kid: Option<&str>, claims: &Value) -> String {
    let key = EncodingKey::from_rsa_pem(rsa_key().private_pem.as_bytes()).unwrap();
    sign(Algorithm::RS256, kid, &key, claims)
}

fn es(kp: &rcgen::KeyPair, kid: Option<&str>, claims: &Value) -> String {
    let key = EncodingKey::from_ec_pem(kp.serialize_pem().as_bytes()).unwrap();
    sign(Algorithm::ES256, kid, &key, claims)
}

fn ed(kp: &rcgen::KeyPair, kid: Option<&str>, claims: &Value) -> String {
    let key = EncodingKey::from_ed_pem(kp.serialize_pem().as_bytes()).unwrap();
    sign(Algorithm::EdDSA, kid, &key, claims)
}

fn hs_auth() -> Authenticator {
    Authenticator::new(AuthConfig {
        hs_secret: Some(SECRET.to_vec()),
        ..AuthConfig::default()
    })
    .unwrap()
}

fn pem_auth(pems: Vec<String>) -> Authenticator {
    Authenticator::new(AuthConfig {
        public_key_pems: pems,
        ..AuthConfig::default()
    })
    .unwrap()
}

fn jwks_auth(jwks: &Value) -> Authenticator {
    Authenticator::new(AuthConfig {
        jwks_json: Some(jwks.to_string()),
        ..AuthConfig::default()
    })
    .unwrap()
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

fn rsa_jwk(kid: &str) -> Value {
    let k = rsa_key();
    json!({ "kty": "RSA", "kid": kid, "alg": "RS256", "n": b64url(&k.n), "e": b64url(&k.e) })
}

fn invalid(r: Result<Principal, AuthError>) -> String {
    match r {
        Err(AuthError::Invalid(reason)) => reason,
        other => panic!("expected Invalid, got {other:?}"),
    }
}

fn config_err(c: AuthConfig) -> String {
    match Authenticator::new(c) {
        Err(AuthError::Config(reason)) => reason,
        other => panic!("expected Config, got {other:?}"),
    }
}

#[test]
fn b64url_matches_rfc4648_vectors() {
    assert_eq!(b64url(b"f"), "Zg");
    assert_eq!(b64url(b"fo"), "Zm8");
    assert_eq!(b64url(b"foo"), "Zm9v");
    assert_eq!(b64url(&[0xfb, 0xff]), "-_8");
}

// ---- HMAC ----------------------------------------------------------------------------------------------------

#[test]
fn minted_token_round_trips() {
    let auth = Authenticator::new(AuthConfig {
        hs_secret: Some(SECRET.to_vec()),
        issuer: Some("ferry".into()),
        audience: Some("api".into()),
        ..AuthConfig::default()
    })
    .unwrap();
    let token = mint(
        SECRET,
        &MintClaims {
            sub: "alice".into(),
            scopes: vec![
                "jobs:submit".into(),
                "jobs:read".into(),
                "unknown:scope".into(),
            ],
            tenant: Some("acme".into()),
            ttl: Duration::from_secs(3600),
            issuer: Some("ferry".into()),
            audience: Some("api".into()),
        },
    )
    .unwrap();
    let p = auth.verify(&token).unwrap();
    assert_eq!(p.sub, "alice");
    assert_eq!(p.tenant.as_deref(), Some("acme"));
    assert_eq!(p.scopes, Scopes::parse("jobs:submit jobs:read"));
    assert!(p.exp >= now() + 3590 && p.exp <= now() + 3600);
    assert_eq!(
        jsonwebtoken::decode_header(&token).unwrap().alg,
        Algorithm::HS256
    );
}

#[test]
fn hs384_and_hs512_verify_with_the_secret() {
    let auth = hs_auth();
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        assert_eq!(
            auth.verify(&hs(alg, &claims())).unwrap().sub,
            "alice",
            "{alg:?}"
        );
    }
}

#[test]
fn short_secret_is_a_config_error() {
    let reason = config_err(AuthConfig {
        hs_secret: Some(b"too-short".to_vec()),
        ..AuthConfig::default()
    });
    assert!(reason.contains("at least 32"), "{reason}");
    let minted = mint(
        b"too-short",
        &MintClaims {
            sub: "a".into(),
            scopes: vec![],
            tenant: None,
            ttl: Duration::from_secs(60),
            issuer: None,
            audience: None,
        },
    );
    assert!(matches!(minted, Err(AuthError::Config(_))));
}

#[test]
fn mint_refuses_what_verify_would_reject() {
    let base = MintClaims {
        sub: "a".into(),
        scopes: vec!["jobs:read".into()],
        tenant: None,
        ttl: Duration::from_secs(60),
        issuer: None,
        audience: None,
    };
    let cases = [
        MintClaims {
            sub: " ".into(),
            ..base.clone()
        },
        MintClaims {
            scopes: vec!["jobs:read admin".into()],
            ..base.clone()
        },
        MintClaims {
            tenant: Some(String::new()),
            ..base.clone()
        },
        MintClaims {
            ttl: Duration::ZERO,
            ..base.clone()
        },
    ];
    for c in cases {
        assert!(
            matches!(mint(SECRET, &c), Err(AuthError::Config(_))),
            "{c:?}"
        );
    }
    // No scopes: the claim is left out and the token grants nothing.
    let token = mint(
        SECRET,
        &MintClaims {
            scopes: vec![],
            ..base
        },
    )
    .unwrap();
    assert_eq!(hs_auth().verify(&token).unwrap().scopes, Scopes::default());
}

#[test]
fn tampered_token_has_a_bad_signature() {
    let token = hs(Algorithm::HS256, &claims());
    let other = hs(
        Algorithm::HS256,
        &json!({ "sub": "mallory", "exp": now() + 600 }),
    );
    // Alice's header and signature around Mallory's payload.
    let parts: Vec<&str> = token.split('.').collect();
    let forged = format!(
        "{}.{}.{}",
        parts[0],
        other.split('.').nth(1).unwrap(),
        parts[2]
    );
    assert_eq!(invalid(hs_auth().verify(&forged)), "bad signature");
}

#[test]
fn missing_and_garbage_tokens() {
    let auth = hs_auth();
    assert_eq!(auth.verify(""), Err(AuthError::Missing));
    assert_eq!(auth.verify("  "), Err(AuthError::Missing));
    invalid(auth.verify("not-a-jwt"));
    invalid(auth.verify("a.b.c"));
    assert_eq!(
        invalid(auth.verify(&"a".repeat(MAX_TOKEN_BYTES + 1))),
        "token too large"
    );
}

// ---- public keys from PEM ------------------------------------------------------------------------------------

#[test]
fn rs256_pem_in_both_encodings() {
    for pem in [&rsa_key().public_pem, &rsa_key().public_pkcs1_pem] {
        let auth = pem_auth(vec![pem.clone()]);
        assert_eq!(auth.verify(&rs(None, &claims())).unwrap().sub, "alice");
    }
}

#[test]
fn es256_pem() {
    let kp = ec_key();
    let auth = pem_auth(vec![kp.public_key_pem()]);
    assert_eq!(auth.verify(&es(&kp, None, &claims())).unwrap().sub, "alice");
    // Another P-256 key's signature does not verify.
    assert_eq!(
        invalid(auth.verify(&es(&ec_key(), None, &claims()))),
        "bad signature"
    );
}

#[test]
fn ed25519_pem() {
    let kp = ed_key();
    let auth = pem_auth(vec![kp.public_key_pem()]);
    assert_eq!(auth.verify(&ed(&kp, None, &claims())).unwrap().sub, "alice");
}

#[test]
fn keys_of_one_algorithm_are_all_tried() {
    // Key rotation: two ES256 keys, a token from either verifies; the RSA and Ed keys are never tried for it.
    let (old, new) = (ec_key(), ec_key());
    let auth = pem_auth(vec![
        rsa_key().public_pem.clone(),
        old.public_key_pem(),
        ed_key().public_key_pem(),
        new.public_key_pem(),
    ]);
    assert!(auth.verify(&es(&old, None, &claims())).is_ok());
    assert!(auth.verify(&es(&new, None, &claims())).is_ok());
}

#[test]
fn private_or_garbage_pem_is_a_config_error() {
    let reason = config_err(AuthConfig {
        public_key_pems: vec![ec_key().serialize_pem()],
        ..AuthConfig::default()
    });
    assert!(reason.contains("private key"), "{reason}");
    config_err(AuthConfig {
        public_key_pems: vec!["hello".into()],
        ..AuthConfig::default()
    });
    let reason = config_err(AuthConfig::default());
    assert!(reason.contains("no verification keys"), "{reason}");
}

// ---- algorithm confusion -------------------------------------------------------------------------------------

#[test]
fn alg_none_is_rejected() {
    let auth = hs_auth();
    let body = b64url(claims().to_string().as_bytes());
    for alg in ["none", "None", "NONE"] {
        let head = b64url(json!({ "alg": alg, "typ": "JWT" }).to_string().as_bytes());
        invalid(auth.verify(&format!("{head}.{body}.")));
        // Even with a real HS256 signature attached.
        let sig = hs(Algorithm::HS256, &claims())
            .rsplit('.')
            .next()
            .unwrap()
            .to_owned();
        invalid(auth.verify(&format!("{head}.{body}.{sig}")));
    }
}

#[test]
fn hs_token_against_public_keys_only_is_rejected() {
    let auth = pem_auth(vec![
        rsa_key().public_pem.clone(),
        ec_key().public_key_pem(),
    ]);
    assert_eq!(
        invalid(auth.verify(&hs(Algorithm::HS256, &claims()))),
        "no key accepts HS256 tokens"
    );
    // The classic confusion: HMAC "signed" with the public key text the server holds.
    for secret in [&rsa_key().public_pem, &rsa_key().public_pkcs1_pem] {
        let forged = sign(
            Algorithm::HS256,
            None,
            &EncodingKey::from_secret(secret.as_bytes()).unwrap(),
            &claims(),
        );
        invalid(auth.verify(&forged));
    }
}

#[test]
fn header_alg_must_match_the_pinned_alg() {
    // An RSA key is pinned to RS256: the same key signing RS512 or PS256 is refused.
    let auth = pem_auth(vec![rsa_key().public_pem.clone()]);
    let key = EncodingKey::from_rsa_pem(rsa_key().private_pem.as_bytes()).unwrap();
    for alg in [Algorithm::RS512, Algorithm::PS256] {
        assert_eq!(
            invalid(auth.verify(&sign(alg, None, &key, &claims()))),
            format!("no key accepts {alg:?} tokens")
        );
    }
    // A token claiming ES256 is never checked against the RSA key.
    assert_eq!(
        invalid(auth.verify(&es(&ec_key(), None, &claims()))),
        "no key accepts ES256 tokens"
    );
}

// ---- JWKS ----------------------------------------------------------------------------------------------------

#[test]
fn jwks_selects_by_kid() {
    let (e1, e2, d1) = (ec_key(), ec_key(), ed_key());
    let auth = jwks_auth(&json!({ "keys": [
        rsa_jwk("r1"), ec_jwk("e1", &e1), ec_jwk("e2", &e2), ed_jwk("d1", &d1),
        // Encryption keys sit next to signing keys in real documents and are skipped.
        { "kty": "RSA", "kid": "enc", "use": "enc", "alg": "RSA-OAEP", "n": "AQAB", "e": "AQAB" },
    ]}));
    assert!(auth.verify(&rs(Some("r1"), &claims())).is_ok());
    assert!(auth.verify(&es(&e1, Some("e1"), &claims())).is_ok());
    assert!(auth.verify(&es(&e2, Some("e2"), &claims())).is_ok());
    assert!(auth.verify(&ed(&d1, Some("d1"), &claims())).is_ok());
    // Without a kid, the keys of the header's algorithm are tried.
    assert!(auth.verify(&es(&e2, None, &claims())).is_ok());
    // A kid names one key only: e2's signature under kid e1 fails even though e2 is configured.
    assert_eq!(
        invalid(auth.verify(&es(&e2, Some("e1"), &claims()))),
        "bad signature"
    );
    assert_eq!(
        invalid(auth.verify(&es(&e1, Some("nope"), &claims()))),
        "unknown key id"
    );
    assert_eq!(
        invalid(auth.verify(&rs(Some("e1"), &claims()))),
        "algorithm does not match the key"
    );
    // The shared secret has no kid: an HS token naming a JWKS kid is refused.
    let auth = Authenticator::new(AuthConfig {
        hs_secret: Some(SECRET.to_vec()),
        jwks_json: Some(json!({ "keys": [ec_jwk("e1", &e1)] }).to_string()),
        ..AuthConfig::default()
    })
    .unwrap();
    let key = EncodingKey::from_secret(SECRET).unwrap();
    invalid(auth.verify(&sign(Algorithm::HS256, Some("e1"), &key, &claims())));
    assert!(auth.verify(&hs(Algorithm::HS256, &claims())).is_ok());
}

/// Identity providers set a `kid` on every token; a secret or PEM key configured without one must verify them,
/// still pinned to its algorithm (issue 11, finding 9).
#[test]
fn keys_without_a_kid_accept_tokens_naming_any_kid() {
    let key = EncodingKey::from_secret(SECRET).unwrap();
    let auth = hs_auth();
    assert!(
        auth.verify(&sign(Algorithm::HS256, Some("idp-2026"), &key, &claims()))
            .is_ok()
    );
    let other = EncodingKey::from_secret(b"another-secret-another-secret-another!").unwrap();
    assert_eq!(
        invalid(auth.verify(&sign(Algorithm::HS256, Some("idp-2026"), &other, &claims()))),
        "unknown key id",
        "no key signed it: the kid is reported unknown, so a JWKS URL would be fetched again"
    );
    let rsa = EncodingKey::from_rsa_pem(rsa_key().private_pem.as_bytes()).unwrap();
    let auth = pem_auth(vec![rsa_key().public_pem.clone()]);
    assert!(
        auth.verify(&sign(Algorithm::RS256, Some("k1"), &rsa, &claims()))
            .is_ok()
    );
    // Pinned all the same: the RSA key never verifies an ES256 token, whatever kid it names.
    assert_eq!(
        invalid(auth.verify(&es(&ec_key(), Some("k1"), &claims()))),
        "unknown key id"
    );
    // Next to a JWKS: a kid the JWKS has selects that key only; any other kid falls back to the secret.
    let e1 = ec_key();
    let auth = Authenticator::new(AuthConfig {
        hs_secret: Some(SECRET.to_vec()),
        jwks_json: Some(json!({ "keys": [ec_jwk("e1", &e1)] }).to_string()),
        ..AuthConfig::default()
    })
    .unwrap();
    assert!(
        auth.verify(&sign(Algorithm::HS256, Some("other"), &key, &claims()))
            .is_ok()
    );
    assert_eq!(
        invalid(auth.verify(&sign(Algorithm::HS256, Some("e1"), &key, &claims()))),
        "algorithm does not match the key"
    );
    assert!(auth.verify(&es(&e1, Some("e1"), &claims())).is_ok());
}

#[test]
fn a_configured_kid_pins_its_key() {
    let key = EncodingKey::from_secret(SECRET).unwrap();
    let rsa = EncodingKey::from_rsa_pem(rsa_key().private_pem.as_bytes()).unwrap();
    let auth = Authenticator::new(AuthConfig {
        hs_secret: Some(SECRET.to_vec()),
        hs_secret_kid: Some("hs1".into()),
        public_key_pems: vec![rsa_key().public_pem.clone()],
        public_key_kids: vec![Some("rsa1".into())],
        ..AuthConfig::default()
    })
    .unwrap();
    assert!(
        auth.verify(&sign(Algorithm::HS256, Some("hs1"), &key, &claims()))
            .is_ok()
    );
    assert!(
        auth.verify(&sign(Algorithm::RS256, Some("rsa1"), &rsa, &claims()))
            .is_ok()
    );
    assert!(
        auth.verify(&hs(Algorithm::HS256, &claims())).is_ok(),
        "no kid: by alg"
    );
    // Every key has a kid, so another kid matches none.
    assert_eq!(
        invalid(auth.verify(&sign(Algorithm::HS256, Some("hs2"), &key, &claims()))),
        "unknown key id"
    );
    assert_eq!(
        invalid(auth.verify(&sign(Algorithm::HS256, Some("rsa1"), &key, &claims()))),
        "algorithm does not match the key"
    );
    // A kid names one key: two keys under one kid are a configuration error.
    let e = config_err(AuthConfig {
        hs_secret: Some(SECRET.to_vec()),
        hs_secret_kid: Some("k".into()),
        public_key_pems: vec![rsa_key().public_pem.clone()],
        public_key_kids: vec![Some("k".into())],
        ..AuthConfig::default()
    });
    assert!(e.contains("duplicate kid"), "{e}");
}

#[test]
fn jwks_alg_is_inferred_when_absent() {
    let kp = ec_key();
    let mut jwk = ec_jwk("e1", &kp);
    jwk.as_object_mut().unwrap().remove("alg");
    let auth = jwks_auth(&json!({ "keys": [jwk] }));
    assert!(auth.verify(&es(&kp, Some("e1"), &claims())).is_ok());
}

#[test]
fn bad_jwks_is_a_config_error() {
    let kp = ec_key();
    let jwks = |keys: Value| AuthConfig {
        jwks_json: Some(json!({ "keys": keys }).to_string()),
        ..AuthConfig::default()
    };
    let mut wrong_alg = ec_jwk("e1", &kp);
    wrong_alg["alg"] = json!("RS256");
    assert!(config_err(jwks(json!([wrong_alg]))).contains("alg does not fit"));
    let mut es384_on_p256 = ec_jwk("e1", &kp);
    es384_on_p256["alg"] = json!("ES384");
    config_err(jwks(json!([es384_on_p256])));
    assert!(
        config_err(jwks(json!([ec_jwk("k", &kp), ec_jwk("k", &ec_key())])))
            .contains("duplicate kid")
    );
    assert!(
        config_err(jwks(json!([{ "kty": "oct", "kid": "s", "k": "c2VjcmV0" }])))
            .contains("symmetric")
    );
    let mut off_curve = ec_jwk("e1", &kp);
    off_curve["y"] = off_curve["x"].clone();
    assert!(config_err(jwks(json!([off_curve]))).contains("invalid key material"));
    let small_rsa = json!({ "kty": "RSA", "kid": "r", "n": b64url(&[0xc5; 128]), "e": "AQAB" });
    assert!(config_err(jwks(json!([small_rsa]))).contains("2048"));
    assert!(config_err(jwks(json!([]))).contains("no signing keys"));
    config_err(AuthConfig {
        jwks_json: Some("{".into()),
        ..AuthConfig::default()
    });
}

// ---- time, issuer, audience ----------------------------------------------------------------------------------

#[test]
fn expired_is_distinct_and_leeway_applies() {
    let auth = hs_auth(); // zero leeway in the config: the 30 s default
    let mut c = claims();
    c["exp"] = json!(now() - 120);
    assert_eq!(
        auth.verify(&hs(Algorithm::HS256, &c)),
        Err(AuthError::Expired)
    );
    c["exp"] = json!(now() - 5);
    assert!(
        auth.verify(&hs(Algorithm::HS256, &c)).is_ok(),
        "within the default leeway"
    );

    let strict = Authenticator::new(AuthConfig {
        hs_secret: Some(SECRET.to_vec()),
        leeway: Duration::from_secs(1),
        ..AuthConfig::default()
    })
    .unwrap();
    assert_eq!(
        strict.verify(&hs(Algorithm::HS256, &c)),
        Err(AuthError::Expired)
    );
}

/// A token that passed is not verified again while it is valid; it is once it has expired, or the keys changed,
/// and tokens that fail are never kept.
#[test]
fn verified_tokens_are_kept_until_they_expire_or_the_keys_change() {
    let auth = hs_auth();
    let token = hs(Algorithm::HS256, &claims());
    let first = auth.verify(&token).unwrap();
    assert_eq!(auth.verified.len(), 1);
    assert_eq!(auth.verify(&token).unwrap(), first);
    let keys = auth.current_keys();
    let leeway = auth.leeway_secs;
    assert_eq!(
        auth.verified.get(&token, &keys, now(), leeway),
        Some(first.clone())
    );
    // Past `exp` by more than the leeway: gone, so the next request is verified in full (and refused as expired).
    assert_eq!(
        auth.verified
            .get(&token, &keys, first.exp + leeway + 1, leeway),
        None
    );
    assert_eq!(auth.verified.len(), 0);
    auth.verify(&token).unwrap();
    assert_eq!(auth.verified.len(), 1);

    // Other keys (a JWKS refresh): the map starts over.
    let other = Arc::new(keys::KeySet::default());
    assert_eq!(auth.verified.get(&token, &other, now(), leeway), None);
    assert_eq!(auth.verified.len(), 0);
    auth.verify(&token).unwrap();
    assert_eq!(auth.verified.len(), 1);

    // Failures are not kept: a tampered signature, an expired token.
    let mut tampered = token.clone();
    tampered.pop();
    tampered.push(if token.ends_with('A') { 'B' } else { 'A' });
    assert!(auth.verify(&tampered).is_err());
    let mut c = claims();
    c["exp"] = json!(now() - 120);
    assert_eq!(
        auth.verify(&hs(Algorithm::HS256, &c)),
        Err(AuthError::Expired)
    );
    assert_eq!(auth.verified.len(), 1);
}

/// The map is bounded: a full one is emptied before the next token goes in.
#[test]
fn verified_tokens_are_bounded() {
    let auth = hs_auth();
    let keys = auth.current_keys();
    let p = auth.verify(&hs(Algorithm::HS256, &claims())).unwrap();
    for i in 0..verified::MAX_VERIFIED + 5 {
        auth.verified.put(&format!("token-{i}"), &keys, &p);
        assert!(auth.verified.len() <= verified::MAX_VERIFIED);
    }
    // The verified token and 9,999 others filled it; the last 6 came after it was emptied.
    assert_eq!(auth.verified.len(), 6);
}

#[test]
fn expired_is_only_reported_for_a_valid_signature() {
    let mut c = claims();
    c["exp"] = json!(now() - 120);
    let forged = sign(
        Algorithm::HS256,
        None,
        &EncodingKey::from_secret(&[7; 32]).unwrap(),
        &c,
    );
    assert_eq!(invalid(hs_auth().verify(&forged)), "bad signature");
}

#[test]
fn exp_is_required() {
    let c = json!({ "sub": "alice", "scope": "admin" });
    assert_eq!(
        invalid(hs_auth().verify(&hs(Algorithm::HS256, &c))),
        "missing exp claim"
    );
    let c = json!({ "sub": "alice", "exp": "tomorrow" });
    invalid(hs_auth().verify(&hs(Algorithm::HS256, &c)));
}

#[test]
fn nbf_and_iat_in_the_future_are_rejected() {
    let auth = hs_auth();
    let mut c = claims();
    c["nbf"] = json!(now() + 120);
    assert_eq!(
        invalid(auth.verify(&hs(Algorithm::HS256, &c))),
        "token not yet valid"
    );
    c["nbf"] = json!(now() + 5);
    assert!(
        auth.verify(&hs(Algorithm::HS256, &c)).is_ok(),
        "within leeway"
    );
    let mut c = claims();
    c["iat"] = json!(now() + 120);
    assert_eq!(
        invalid(auth.verify(&hs(Algorithm::HS256, &c))),
        "token issued in the future"
    );
}

#[test]
fn issuer_and_audience_are_checked_when_configured() {
    let auth = Authenticator::new(AuthConfig {
        hs_secret: Some(SECRET.to_vec()),
        issuer: Some("https://id.example".into()),
        audience: Some("ferry".into()),
        ..AuthConfig::default()
    })
    .unwrap();
    let with = |iss: Value, aud: Value| {
        let mut c = claims();
        c["iss"] = iss;
        c["aud"] = aud;
        auth.verify(&hs(Algorithm::HS256, &c))
    };
    assert!(with(json!("https://id.example"), json!("ferry")).is_ok());
    assert!(with(json!("https://id.example"), json!(["other", "ferry"])).is_ok());
    assert_eq!(
        invalid(with(json!("https://evil.example"), json!("ferry"))),
        "wrong issuer"
    );
    assert_eq!(
        invalid(with(json!("https://id.example"), json!("other"))),
        "wrong audience"
    );
    // Each is required once configured (checked one at a time: the library's check order is unspecified).
    let mut c = claims();
    c["aud"] = json!("ferry");
    assert_eq!(
        invalid(auth.verify(&hs(Algorithm::HS256, &c))),
        "missing iss claim"
    );
    let mut c = claims();
    c["iss"] = json!("https://id.example");
    assert_eq!(
        invalid(auth.verify(&hs(Algorithm::HS256, &c))),
        "missing aud claim"
    );

    // Unconfigured, neither is required nor checked.
    let mut c = claims();
    c["iss"] = json!("anyone");
    c["aud"] = json!("anything");
    assert!(hs_auth().verify(&hs(Algorithm::HS256, &c)).is_ok());
}

#[test]
fn leeway_above_the_maximum_is_a_config_error() {
    config_err(AuthConfig {
        hs_secret: Some(SECRET.to_vec()),
        leeway: MAX_LEEWAY + Duration::from_secs(1),
        ..AuthConfig::default()
    });
}

// ---- claims → principal --------------------------------------------------------------------------------------

#[test]
fn sub_is_required_and_non_empty() {
    let auth = hs_auth();
    let c = json!({ "exp": now() + 60 });
    assert_eq!(
        invalid(auth.verify(&hs(Algorithm::HS256, &c))),
        "missing sub claim"
    );
    let c = json!({ "sub": "", "exp": now() + 60 });
    assert_eq!(
        invalid(auth.verify(&hs(Algorithm::HS256, &c))),
        "missing sub claim"
    );
}

#[test]
fn scopes_from_scope_and_scp() {
    let auth = hs_auth();
    let scopes = |extra: Value| {
        let mut c = json!({ "sub": "alice", "exp": now() + 60 });
        c.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        auth.verify(&hs(Algorithm::HS256, &c)).unwrap().scopes
    };
    let read_submit = Scopes::default()
        .with(Scope::JobsRead)
        .with(Scope::JobsSubmit);
    assert_eq!(
        scopes(json!({ "scope": "jobs:read  jobs:submit bogus" })),
        read_submit
    );
    assert_eq!(
        scopes(json!({ "scp": ["jobs:read", "jobs:submit"] })),
        read_submit
    );
    assert_eq!(
        scopes(json!({ "scp": "jobs:read jobs:submit" })),
        read_submit
    );
    assert_eq!(
        scopes(json!({ "scope": "jobs:read", "scp": ["jobs:submit"] })),
        read_submit
    );
    assert_eq!(scopes(json!({})), Scopes::default());
}

#[test]
fn tenant_claim() {
    let auth = hs_auth();
    let mut c = claims();
    assert_eq!(auth.verify(&hs(Algorithm::HS256, &c)).unwrap().tenant, None);
    c["tenant"] = json!("acme");
    assert_eq!(
        auth.verify(&hs(Algorithm::HS256, &c))
            .unwrap()
            .tenant
            .as_deref(),
        Some("acme")
    );
    // A genuine token whose tenant names no usable namespace is forbidden (403), as docs/api.md says, not
    // unauthorized.
    for bad in [
        json!(""),
        json!(" "),
        json!("a:b"),
        json!("x".repeat(65)),
        json!(42),
    ] {
        c["tenant"] = bad.clone();
        let e = auth.verify(&hs(Algorithm::HS256, &c)).unwrap_err();
        assert!(matches!(e, AuthError::Forbidden(_)), "{bad}: {e:?}");
        assert_eq!(ApiError::from(e).status().as_u16(), 403, "{bad}");
    }
    c["tenant"] = json!(null);
    assert_eq!(auth.verify(&hs(Algorithm::HS256, &c)).unwrap().tenant, None);
}

#[test]
fn reasons_never_echo_the_token() {
    let auth = hs_auth();
    let token = hs(
        Algorithm::HS256,
        &json!({ "sub": "secret-subject", "exp": 1 }),
    );
    let bad = format!("{token}x");
    let err = auth.verify(&bad).unwrap_err().to_string();
    for part in bad.split('.') {
        assert!(!err.contains(part), "{err}");
    }
    assert!(!err.contains("secret-subject"));
}

#[test]
fn debug_output_hides_the_secret() {
    let config = AuthConfig {
        hs_secret: Some(SECRET.to_vec()),
        ..AuthConfig::default()
    };
    let text = format!(
        "{config:?} {:?}",
        Authenticator::new(config.clone()).unwrap()
    );
    assert!(!text.contains("0123456789abcdef"), "{text}");
}

// ---- Principal -----------------------------------------------------------------------------------------------

fn principal(scopes: &str, tenant: Option<&str>) -> Principal {
    Principal {
        sub: "alice".into(),
        tenant: tenant.map(str::to_owned),
        scopes: Scopes::parse(scopes),
        exp: now() + 60,
    }
}

#[test]
fn require_checks_scopes_and_admin_holds_all() {
    let p = principal("jobs:read", None);
    assert!(p.require(Scope::JobsRead).is_ok());
    assert!(
        matches!(p.require(Scope::JobsSubmit), Err(ApiError::Forbidden(m)) if m.contains("jobs:submit"))
    );
    let admin = principal("admin", None);
    assert!(Scope::ALL.into_iter().all(|s| admin.require(s).is_ok()));
}

#[test]
fn owns_respects_owner_tenant_and_admin() {
    let alice = principal("jobs:read", Some("acme"));
    assert!(alice.owns(Some("alice"), Some("acme")));
    assert!(!alice.owns(Some("bob"), Some("acme")));
    assert!(!alice.owns(Some("alice"), Some("globex")), "other tenant");
    assert!(!alice.owns(Some("alice"), None), "untenanted job");
    assert!(!alice.owns(None, Some("acme")));

    let tenant_admin = principal("admin", Some("acme"));
    assert!(tenant_admin.owns(Some("bob"), Some("acme")));
    assert!(!tenant_admin.owns(Some("bob"), Some("globex")));

    let global_admin = principal("admin", None);
    assert!(global_admin.owns(Some("bob"), Some("globex")));
    assert!(global_admin.owns(None, None));
}

// ---- JWKS URL schedule (the fetching itself is tested against a real server in tests/gateway/jwks_url.rs) --------

#[test]
fn cache_control_max_age_is_parsed() {
    use remote::parse_max_age;
    assert_eq!(
        parse_max_age("public, max-age=3600, must-revalidate"),
        Some(Duration::from_secs(3600))
    );
    assert_eq!(
        parse_max_age("Max-Age=\"60\""),
        Some(Duration::from_secs(60))
    );
    assert_eq!(parse_max_age("no-cache"), Some(Duration::ZERO));
    assert_eq!(parse_max_age("no-store, max-age=60"), Some(Duration::ZERO));
    assert_eq!(parse_max_age("public"), None);
    assert_eq!(parse_max_age("max-age=soon"), None);
}

#[test]
fn refresh_interval_honours_max_age_within_bounds() {
    use remote::{refresh_after, retry_after};
    let ten_min = DEFAULT_JWKS_REFRESH;
    assert_eq!(refresh_after(None, ten_min), ten_min);
    // Shorter than the configured interval: honoured, down to the floor.
    assert_eq!(
        refresh_after(Some(Duration::from_secs(120)), ten_min),
        Duration::from_secs(120)
    );
    assert_eq!(
        refresh_after(Some(Duration::ZERO), ten_min),
        JWKS_MIN_REFRESH
    );
    // Longer: capped by the configured interval, which bounds how long a revoked key stays trusted.
    assert_eq!(
        refresh_after(Some(Duration::from_secs(86_400)), ten_min),
        ten_min
    );
    // A configured interval below the floor is the operator's explicit choice and wins.
    let fast = Duration::from_secs(5);
    assert_eq!(refresh_after(Some(Duration::ZERO), fast), fast);
    assert_eq!(retry_after(ten_min), JWKS_MIN_REFRESH);
    assert_eq!(retry_after(fast), fast);
}

#[test]
fn jwks_url_config_is_checked_without_io() {
    let url = |u: &str| AuthConfig {
        jwks_url: Some(u.into()),
        ..AuthConfig::default()
    };
    // A URL alone is a key source.
    Authenticator::new(url("https://id.example/.well-known/jwks.json")).unwrap();
    assert!(config_err(url("ftp://id.example/jwks")).contains("only http and https"));
    assert!(config_err(url("jwks.json")).contains("not a URL"));
    assert!(
        config_err(AuthConfig {
            jwks_refresh: Duration::from_millis(10),
            ..url("http://127.0.0.1/jwks")
        })
        .contains("refresh interval")
    );
    let debug = format!("{:?}", url("https://id.example/jwks"));
    assert!(debug.contains("id.example"), "{debug}");
}

#[tokio::test]
async fn jwks_url_credentials_never_show_in_errors_or_debug() {
    let url = |u: &str| AuthConfig {
        jwks_url: Some(u.into()),
        ..AuthConfig::default()
    };
    let config = config_err(url("ftp://reader:hunter2@id.example/jwks"));
    assert!(!config.contains("hunter2"), "{config}");
    assert!(config.contains("reader:<redacted>@id.example"), "{config}");
    // Nothing listens on port 1: the fetch fails and its message names the URL, redacted.
    let auth = Authenticator::new(url("http://s3cr3t-token@127.0.0.1:1/jwks")).unwrap();
    let err = auth.refresh().await.unwrap_err().to_string();
    assert!(!err.contains("s3cr3t-token"), "{err}");
    assert!(err.contains("<redacted>@127.0.0.1:1"), "{err}");
    let debug = format!("{auth:?} {:?}", url("http://s3cr3t-token@127.0.0.1:1/jwks"));
    assert!(!debug.contains("s3cr3t-token"), "{debug}");
}
