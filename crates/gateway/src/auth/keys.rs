//! Verification keys, each pinned to the algorithms it may verify, and the choice of key for a token.
//!
//! Owns turning configured key material (shared secret, PEM public keys, a JWKS document from a file or fetched by
//! `remote`) into [`VerifyKey`]s, refusing anything weak or ambiguous with [`AuthError::Config`]. It must not look
//! at claims or decide what a token grants; that is `auth::Authenticator`. A key's pinned algorithms come from the
//! key itself (or the JWKS `alg`), never from a token header: that is what stops `alg` confusion.

use std::collections::HashMap;

use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, DecodingKeyKind, Header};

use super::AuthError;

/// Shortest accepted HMAC secret: RFC 7518 §3.2 asks for a key at least as long as the hash (256 bits for HS256).
pub const MIN_HS_SECRET_BYTES: usize = 32;

/// Smallest accepted RSA modulus; shorter keys are factorable by well-funded attackers.
const MIN_RSA_BITS: usize = 2048;

/// The rejection reason for a token naming a kid no configured key has. `auth` tells it apart from other
/// rejections because it is the one that may be cured by fetching the JWKS again.
pub(super) const UNKNOWN_KID: &str = "unknown key id";

const HMAC_ALGS: [Algorithm; 3] = [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512];

/// One key and the algorithms it may verify.
#[derive(Clone)]
pub(super) struct VerifyKey {
    /// The JWKS `kid`, or the one configured for the shared secret or a PEM key (none by default).
    pub kid: Option<String>,
    /// Where the key came from, for start-up errors and `Debug` (never the key bytes).
    pub origin: String,
    pub algs: Vec<Algorithm>,
    pub key: DecodingKey,
}

impl std::fmt::Debug for VerifyKey {
    // `DecodingKey` redacts itself, but listing only origin, kid and algorithms keeps logs short and safe.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyKey")
            .field("origin", &self.origin)
            .field("kid", &self.kid)
            .field("algs", &self.algs)
            .finish()
    }
}

impl VerifyKey {
    pub fn accepts(&self, alg: Algorithm) -> bool {
        self.algs.contains(&alg)
    }
}

/// Every configured key, with an index by `kid`.
#[derive(Debug, Default, Clone)]
pub(super) struct KeySet {
    keys: Vec<VerifyKey>,
    by_kid: HashMap<String, usize>,
}

impl KeySet {
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn push(&mut self, key: VerifyKey) -> Result<(), AuthError> {
        if let Some(kid) = &key.kid {
            // Two keys under one kid would make "the key this token names" ambiguous.
            if self.by_kid.insert(kid.clone(), self.keys.len()).is_some() {
                return Err(AuthError::Config(format!("duplicate kid {kid:?}")));
            }
        }
        self.keys.push(key);
        Ok(())
    }

    /// The keys that may verify a token with this header, in configuration order.
    ///
    /// A token naming a `kid` that a key has gets that key only, so a token cannot steer verification to another
    /// key. A token naming a kid no key has is tried against the keys configured *without* a kid, pinned to the
    /// header's `alg` as always: identity providers set a `kid` on every token, and a secret or PEM key given
    /// without one must still verify them. [`Candidates::unknown_kid`] says so, so that a failure can be reported
    /// as an unknown key id (which a JWKS refresh may cure). A token without a kid gets every key pinned to its
    /// `alg`.
    pub fn candidates(&self, header: &Header) -> Result<Candidates<'_>, AuthError> {
        if let Some(kid) = &header.kid
            && let Some(&i) = self.by_kid.get(kid)
        {
            let key = &self.keys[i];
            if !key.accepts(header.alg) {
                return Err(AuthError::Invalid(
                    "algorithm does not match the key".into(),
                ));
            }
            return Ok(Candidates {
                keys: vec![key],
                unknown_kid: false,
            });
        }
        let unknown_kid = header.kid.is_some();
        let keys: Vec<&VerifyKey> = self
            .keys
            .iter()
            .filter(|k| k.accepts(header.alg) && !(unknown_kid && k.kid.is_some()))
            .collect();
        match (keys.is_empty(), unknown_kid) {
            (true, true) => Err(AuthError::Invalid(UNKNOWN_KID.into())),
            (true, false) => Err(AuthError::Invalid(format!(
                "no key accepts {:?} tokens",
                header.alg
            ))),
            (false, _) => Ok(Candidates { keys, unknown_kid }),
        }
    }
}

/// The keys [`KeySet::candidates`] found for a token.
#[derive(Debug)]
pub(super) struct Candidates<'a> {
    pub keys: Vec<&'a VerifyKey>,
    /// The token named a kid no key has; `keys` are the ones configured without a kid.
    pub unknown_kid: bool,
}

/// The shared secret, pinned to HS256/384/512.
pub(super) fn hs_key(secret: &[u8], kid: Option<&str>) -> Result<VerifyKey, AuthError> {
    check_hs_secret(secret)?;
    let key = DecodingKey::from_secret(secret)
        .map_err(|_| AuthError::Config("hs secret: unusable".into()))?;
    Ok(VerifyKey {
        kid: kid.map(str::to_owned),
        origin: "hs secret".into(),
        algs: HMAC_ALGS.to_vec(),
        key,
    })
}

pub(super) fn check_hs_secret(secret: &[u8]) -> Result<(), AuthError> {
    if secret.len() < MIN_HS_SECRET_BYTES {
        return Err(AuthError::Config(format!(
            "hs secret is {} bytes, at least {MIN_HS_SECRET_BYTES} are required",
            secret.len()
        )));
    }
    Ok(())
}

/// A PEM public key, pinned to the one algorithm its key type implies: RSA → RS256, EC P-256 → ES256,
/// EC P-384 → ES384, Ed25519 → EdDSA.
pub(super) fn pem_key(index: usize, pem: &str, kid: Option<&str>) -> Result<VerifyKey, AuthError> {
    let origin = format!("public key #{}", index + 1);
    let bad = |why: &str| AuthError::Config(format!("{origin}: {why}"));
    let tag = pem
        .lines()
        .find_map(|l| l.trim().strip_prefix("-----BEGIN ")?.strip_suffix("-----"))
        .ok_or_else(|| bad("not a PEM block"))?;
    // Only public keys: a private key here means the verifier holds signing power it does not need, and a
    // certificate would pin trust to whatever its key is without checking the certificate itself.
    let (key, alg) = match tag {
        "RSA PUBLIC KEY" => (
            rsa_from_pem(pem).ok_or_else(|| bad("unreadable RSA public key"))?,
            Algorithm::RS256,
        ),
        "PUBLIC KEY" => {
            if let Some(key) = rsa_from_pem(pem) {
                (key, Algorithm::RS256)
            } else if let Ok(key) = DecodingKey::from_ec_pem(pem.as_bytes()) {
                let alg = ec_alg_for_point(&key)
                    .ok_or_else(|| bad("EC keys must be on P-256 or P-384"))?;
                (key, alg)
            } else if let Ok(key) = DecodingKey::from_ed_pem(pem.as_bytes()) {
                (key, Algorithm::EdDSA)
            } else {
                return Err(bad("not an RSA, EC or Ed25519 public key"));
            }
        }
        t if t.contains("PRIVATE KEY") => {
            return Err(bad("is a private key; configure its public half"));
        }
        _ => return Err(bad("expected a PUBLIC KEY block")),
    };
    let key = VerifyKey {
        kid: kid.map(str::to_owned),
        origin,
        algs: vec![alg],
        key,
    };
    check_material(&key)?;
    Ok(key)
}

/// RSA keys are normalised to (n, e) so the modulus size can be checked here rather than at the first token.
fn rsa_from_pem(pem: &str) -> Option<DecodingKey> {
    let der_key = DecodingKey::from_rsa_pem(pem.as_bytes()).ok()?;
    let jwk = Jwk::from_decoding_key(&der_key, None).ok()?;
    match jwk.algorithm {
        AlgorithmParameters::RSA(p) => DecodingKey::from_rsa_components(&p.n, &p.e).ok(),
        _ => None,
    }
}

/// The curve of an EC point in uncompressed SEC1 form (0x04 ‖ x ‖ y), told by its length.
fn ec_alg_for_point(key: &DecodingKey) -> Option<Algorithm> {
    match key.kind() {
        DecodingKeyKind::SecretOrDer(point) if point.len() == 65 => Some(Algorithm::ES256),
        DecodingKeyKind::SecretOrDer(point) if point.len() == 97 => Some(Algorithm::ES384),
        _ => None,
    }
}

/// Every signing key of a JWKS document, by kid.
///
/// Keys marked `"use": "enc"` or with an encryption `alg` are skipped (identity providers publish them next to
/// signing keys). Symmetric (`oct`) keys are refused: a shared secret belongs in `hs_secret`, and a public
/// document is no place for one. A declared `alg` must fit the key type; without one it is inferred as for PEM.
pub(super) fn jwks_keys(json: &str) -> Result<Vec<VerifyKey>, AuthError> {
    let set: JwkSet = serde_json::from_str(json)
        .map_err(|e| AuthError::Config(format!("jwks: not a JWK set ({e})")))?;
    let mut keys = Vec::new();
    for (i, jwk) in set.keys.iter().enumerate() {
        let origin = match &jwk.common.key_id {
            Some(kid) => format!("jwks key {kid:?}"),
            None => format!("jwks key #{}", i + 1),
        };
        let bad = |why: &str| AuthError::Config(format!("{origin}: {why}"));
        if jwk.common.public_key_use == Some(PublicKeyUse::Encryption)
            || matches!(
                jwk.common.key_algorithm,
                Some(KeyAlgorithm::RSA1_5 | KeyAlgorithm::RSA_OAEP | KeyAlgorithm::RSA_OAEP_256)
            )
        {
            continue;
        }
        let declared = match jwk.common.key_algorithm {
            None => None,
            Some(KeyAlgorithm::UNKNOWN_ALGORITHM) => return Err(bad("unsupported alg")),
            Some(a) => Some(Algorithm::try_from(a).map_err(|_| bad("unsupported alg"))?),
        };
        // What each key type may verify: RSA any RS/PS hash, EC only the hash its curve fixes, Ed25519 EdDSA.
        let (key, allowed): (DecodingKey, Vec<Algorithm>) = match &jwk.algorithm {
            AlgorithmParameters::RSA(p) => (
                DecodingKey::from_rsa_components(&p.n, &p.e).map_err(|_| bad("bad n or e"))?,
                vec![
                    Algorithm::RS256,
                    Algorithm::RS384,
                    Algorithm::RS512,
                    Algorithm::PS256,
                    Algorithm::PS384,
                    Algorithm::PS512,
                ],
            ),
            AlgorithmParameters::EllipticCurve(p) => {
                let alg = match p.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => return Err(bad("EC keys must be on P-256 or P-384")),
                };
                let key =
                    DecodingKey::from_ec_components(&p.x, &p.y).map_err(|_| bad("bad x or y"))?;
                (key, vec![alg])
            }
            AlgorithmParameters::OctetKeyPair(p) => {
                if p.curve != EllipticCurve::Ed25519 {
                    return Err(bad("OKP keys must be Ed25519"));
                }
                let key = DecodingKey::from_ed_components(&p.x).map_err(|_| bad("bad x"))?;
                (key, vec![Algorithm::EdDSA])
            }
            AlgorithmParameters::OctetKey(_) => {
                return Err(bad(
                    "symmetric keys are not accepted in a JWKS; use the hs secret",
                ));
            }
            _ => return Err(bad("unsupported key type")),
        };
        // Without a declared alg the first (most common) one is pinned: RS256 for RSA.
        let alg = match declared {
            Some(a) if !allowed.contains(&a) => return Err(bad("alg does not fit the key type")),
            Some(a) => a,
            None => allowed[0],
        };
        let key = VerifyKey {
            kid: jwk.common.key_id.clone(),
            origin,
            algs: vec![alg],
            key,
        };
        check_material(&key)?;
        keys.push(key);
    }
    if keys.is_empty() {
        return Err(AuthError::Config("jwks: no signing keys".into()));
    }
    Ok(keys)
}

/// Refuse key material the crypto backend would reject at the first token, and RSA moduli below 2048 bits.
fn check_material(key: &VerifyKey) -> Result<(), AuthError> {
    let bad = |why: &str| AuthError::Config(format!("{}: {why}", key.origin));
    if let DecodingKeyKind::RsaModulusExponent { n, .. } = key.key.kind() {
        if modulus_bits(n) < MIN_RSA_BITS {
            return Err(bad("RSA keys must have at least 2048 bits"));
        }
        // The RSA verifier parses (n, e) per signature, so a bad exponent cannot be caught here.
        return Ok(());
    }
    // Building a verifier parses EC points and Ed25519 keys; an empty signature then simply fails to verify.
    for &alg in &key.algs {
        jsonwebtoken::crypto::verify("", b"probe", &key.key, alg)
            .map_err(|_| bad("invalid key material"))?;
    }
    Ok(())
}

fn modulus_bits(n: &[u8]) -> usize {
    let n = match n.iter().position(|&b| b != 0) {
        Some(first) => &n[first..],
        None => return 0,
    };
    (n.len() - 1) * 8 + (8 - n[0].leading_zeros() as usize)
}
