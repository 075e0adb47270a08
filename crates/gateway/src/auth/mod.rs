//! JWT verification, scopes and minting: bearer token in, [`Principal`] out.
//!
//! Owns the checks a token must pass (signature by a key pinned to the header's `alg`, `exp` required,
//! `nbf`/`iat` with a small leeway, `iss`/`aud` when configured, a non-empty `sub`) and the mapping of failures to
//! [`AuthError`]: `Expired` on its own (the WebSocket layer closes with 4001 on it), everything else `Invalid`
//! with a short reason. It must not log or echo tokens or key material, or decide what a scope permits beyond
//! [`Principal::require`] and [`Principal::owns`]. Verification itself never does I/O or waits: keys from a JWKS
//! URL are fetched by a background refresher and read from a cache.
//!
//! * `keys`: key material → keys pinned to algorithms; which key may verify a given token.
//! * `claims`: the claims read from and written to tokens.
//! * `remote`: the JWKS-URL cache and its refresh schedule (periodic, and on unknown `kid`, rate-limited).
//! * `verified`: tokens that passed, kept until they expire or the keys change, so a client's next request with
//!   the same token is not verified again.

mod claims;
mod keys;
mod remote;
#[cfg(test)]
mod tests;
mod verified;

use std::sync::Arc;
use std::time::Duration;

use ferry_core::redact::{REDACTED, redact_url};
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, EncodingKey, Header, Validation};

use crate::error::ApiError;
use claims::{MintedClaims, TokenClaims};
use keys::{KeySet, VerifyKey};
use remote::RemoteJwks;
use verified::Verified;

pub use claims::{MAX_TENANT_LEN, tenant_ok};
pub use keys::MIN_HS_SECRET_BYTES;
pub use remote::{
    DEFAULT_JWKS_REFRESH, JWKS_MIN_CONFIGURED_REFRESH, JWKS_MIN_REFRESH, JWKS_UNKNOWN_KID_COOLDOWN,
};

/// Clock skew tolerated on `exp`, `nbf` and `iat` when [`AuthConfig::leeway`] is zero (its `Default`): a zero
/// leeway would reject tokens from an issuer whose clock is a second ahead, so zero means "use the default".
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(30);

/// Largest accepted leeway. The issue asks for a *small* leeway; more than this keeps expired tokens alive.
pub const MAX_LEEWAY: Duration = Duration::from_secs(300);

/// Longest accepted token. Real tokens are well under 2 KiB; the cap bounds the work a hostile header can cause.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    JobsSubmit,
    JobsRead,
    JobsCancel,
    QueuesRead,
    QueuesAdmin,
    Publish,
    Subscribe,
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 8] = [
        Scope::JobsSubmit,
        Scope::JobsRead,
        Scope::JobsCancel,
        Scope::QueuesRead,
        Scope::QueuesAdmin,
        Scope::Publish,
        Scope::Subscribe,
        Scope::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::JobsSubmit => "jobs:submit",
            Scope::JobsRead => "jobs:read",
            Scope::JobsCancel => "jobs:cancel",
            Scope::QueuesRead => "queues:read",
            Scope::QueuesAdmin => "queues:admin",
            Scope::Publish => "publish",
            Scope::Subscribe => "subscribe",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|x| x.as_str() == s)
    }
}

/// A set of scopes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u16);

impl Scopes {
    pub fn with(mut self, s: Scope) -> Self {
        self.0 |= 1 << s as u16;
        self
    }

    /// `admin` holds every scope.
    pub fn has(self, s: Scope) -> bool {
        self.0 & (1 << s as u16) != 0 || self.0 & (1 << Scope::Admin as u16) != 0
    }

    /// Parse a space-separated `scope` claim; unknown scopes are ignored.
    pub fn parse(s: &str) -> Self {
        s.split_whitespace()
            .filter_map(Scope::parse)
            .fold(Self::default(), Self::with)
    }
}

/// The authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub sub: String,
    pub tenant: Option<String>,
    pub scopes: Scopes,
    /// Expiry, seconds since the epoch.
    pub exp: u64,
}

impl Principal {
    pub fn is_admin(&self) -> bool {
        self.scopes.has(Scope::Admin)
    }

    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.scopes.has(scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this operation needs the scope {:?}",
                scope.as_str()
            )))
        }
    }

    /// May this caller see a job owned by `owner` in `tenant`? Admins see everything in their tenant (or all,
    /// without a tenant); others only their own jobs.
    pub fn owns(&self, owner: Option<&str>, tenant: Option<&str>) -> bool {
        if tenant != self.tenant.as_deref() && !(self.is_admin() && self.tenant.is_none()) {
            return false;
        }
        self.is_admin() || owner == Some(self.sub.as_str())
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("missing bearer token")]
    Missing,
    #[error("token expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
    /// A genuine token that cannot be served: its tenant names no usable namespace (403, not 401).
    #[error("{0}")]
    Forbidden(String),
    /// Bad key material or settings, found at start-up (or in a fetched JWKS).
    #[error("invalid auth configuration: {0}")]
    Config(String),
    /// The JWKS URL could not be fetched (unreachable, timed out, not a 2xx answer).
    #[error("verification keys unavailable: {0}")]
    Unavailable(String),
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        match e {
            AuthError::Forbidden(why) => ApiError::Forbidden(why),
            e => ApiError::Unauthorized(e.to_string()),
        }
    }
}

/// Key material and checks.
///
/// `Debug` is implemented by hand so the shared secret and the JWKS URL's credentials never reach a log.
#[derive(Clone, Default)]
pub struct AuthConfig {
    /// Shared secret for HS256/384/512.
    pub hs_secret: Option<Vec<u8>>,
    /// The `kid` of the shared secret. Without one the secret verifies tokens naming any kid no other key has.
    pub hs_secret_kid: Option<String>,
    /// PEM public keys (RSA, EC P-256, Ed25519), each pinned to its algorithm.
    pub public_key_pems: Vec<String>,
    /// The `kid` of each of `public_key_pems`, by position; a key without one (`None`, or past the end) verifies
    /// tokens naming any kid no other key has.
    pub public_key_kids: Vec<Option<String>>,
    /// A JWKS document (JSON text) loaded from a file.
    pub jwks_json: Option<String>,
    /// An http(s) URL serving a JWKS, fetched by [`Authenticator::start`] and kept fresh in the background.
    pub jwks_url: Option<String>,
    /// How often the JWKS URL is fetched again; zero means [`DEFAULT_JWKS_REFRESH`]. A `Cache-Control: max-age`
    /// shorter than this is honoured, down to [`JWKS_MIN_REFRESH`].
    pub jwks_refresh: Duration,
    /// Required `iss`, when set.
    pub issuer: Option<String>,
    /// Required `aud` (one of the token's audiences), when set; unset, any `aud` is accepted.
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`, `nbf` and `iat`; zero means [`DEFAULT_LEEWAY`], at most [`MAX_LEEWAY`].
    pub leeway: Duration,
}

impl std::fmt::Debug for AuthConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthConfig")
            .field("hs_secret", &self.hs_secret.as_ref().map(|_| REDACTED))
            .field("hs_secret_kid", &self.hs_secret_kid)
            .field("public_key_pems", &self.public_key_pems.len())
            .field("public_key_kids", &self.public_key_kids)
            .field("jwks_json", &self.jwks_json.is_some())
            .field("jwks_url", &self.jwks_url.as_deref().map(redact_url))
            .field("jwks_refresh", &self.jwks_refresh)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway", &self.leeway)
            .finish()
    }
}

/// Verifies tokens. Built once at start-up; all configured key material is parsed and checked by
/// [`Authenticator::new`], and a JWKS URL is first fetched by [`Authenticator::start`].
#[derive(Debug)]
pub struct Authenticator {
    /// The secret, PEM and JWKS-file keys; with a JWKS URL, the cache in `remote` holds these plus the fetched ones.
    keys: Arc<KeySet>,
    remote: Option<Arc<RemoteJwks>>,
    /// The background refresher started by [`Authenticator::start`]; aborted on drop so it does not outlive us.
    refresher: Option<tokio::task::AbortHandle>,
    /// Checks shared by every key; each verification narrows `algorithms` to the key's pinned ones.
    validation: Validation,
    leeway_secs: u64,
    verified: Verified,
}

impl Authenticator {
    /// Parse and check every key, without I/O. Fails with [`AuthError::Config`] on a secret shorter than
    /// [`MIN_HS_SECRET_BYTES`], unreadable or private PEM keys, a bad JWKS, a JWKS URL that is not http(s), no
    /// key source at all, or a leeway above [`MAX_LEEWAY`].
    ///
    /// A JWKS URL is only checked here: until [`Authenticator::start`] (or [`Authenticator::refresh`]) has
    /// fetched it, its keys are missing. Use `start` to serve.
    pub fn new(config: AuthConfig) -> Result<Self, AuthError> {
        let mut keys = KeySet::default();
        if let Some(secret) = &config.hs_secret {
            keys.push(keys::hs_key(secret, config.hs_secret_kid.as_deref())?)?;
        }
        for (i, pem) in config.public_key_pems.iter().enumerate() {
            let kid = config.public_key_kids.get(i).and_then(Option::as_deref);
            keys.push(keys::pem_key(i, pem, kid)?)?;
        }
        if let Some(json) = &config.jwks_json {
            for key in keys::jwks_keys(json)? {
                keys.push(key)?;
            }
        }
        if keys.is_empty() && config.jwks_url.is_none() {
            return Err(AuthError::Config(
                "no verification keys: set an hs secret, public keys, a jwks or a jwks url".into(),
            ));
        }
        let remote = config
            .jwks_url
            .as_deref()
            .map(|url| RemoteJwks::new(url, config.jwks_refresh, keys.clone()).map(Arc::new))
            .transpose()?;
        if config.leeway > MAX_LEEWAY {
            return Err(AuthError::Config(format!(
                "leeway {:?} is above the maximum {MAX_LEEWAY:?}",
                config.leeway
            )));
        }
        let leeway = if config.leeway.is_zero() {
            DEFAULT_LEEWAY
        } else {
            config.leeway
        };
        // Round a sub-second leeway up: the claims are whole seconds.
        let leeway_secs = leeway.as_secs() + u64::from(leeway.subsec_nanos() > 0);

        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = leeway_secs;
        validation.validate_exp = true;
        validation.validate_nbf = true;
        let mut required = vec!["exp", "sub"];
        if let Some(iss) = &config.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        match &config.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            // The library rejects any token carrying `aud` when none is expected; with no audience configured
            // ferry has no opinion on it.
            None => validation.validate_aud = false,
        }
        validation.set_required_spec_claims(&required);
        Ok(Self {
            keys: Arc::new(keys),
            remote,
            refresher: None,
            validation,
            leeway_secs,
            verified: Verified::default(),
        })
    }

    /// [`Authenticator::new`], then the first fetch of the JWKS URL (if any) and its background refresher.
    ///
    /// Fails with [`AuthError::Unavailable`] when the URL cannot be fetched and [`AuthError::Config`] when the
    /// document is not an acceptable key set: serving with keys missing would reject every token. Must run in a
    /// Tokio runtime; the refresher stops when the `Authenticator` is dropped.
    pub async fn start(config: AuthConfig) -> Result<Self, AuthError> {
        let mut auth = Self::new(config)?;
        if let Some(remote) = auth.remote.clone() {
            remote.refresh().await?;
            if remote.is_plain_http() {
                tracing::warn!(
                    url = remote.shown_url(),
                    "jwks url is plain http: anyone on the path can substitute signing keys"
                );
            }
            auth.refresher = Some(tokio::spawn(remote::run(remote)).abort_handle());
        }
        Ok(auth)
    }

    /// Fetch the JWKS URL now (a no-op without one). On failure the last good keys stay in use.
    pub async fn refresh(&self) -> Result<(), AuthError> {
        match &self.remote {
            Some(remote) => remote.refresh().await,
            None => Ok(()),
        }
    }

    /// The keys to verify with: the fixed set, or the JWKS-URL cache (which includes the fixed set).
    fn current_keys(&self) -> Arc<KeySet> {
        match &self.remote {
            Some(remote) => remote.current(),
            None => self.keys.clone(),
        }
    }

    /// Verify a bearer token (without the `Bearer ` prefix) and return who it speaks for.
    ///
    /// Never waits: with a JWKS URL, a token naming an unknown `kid` is rejected ("unknown key id") and wakes the
    /// background refresher (at most once per [`JWKS_UNKNOWN_KID_COOLDOWN`]), so the same token verifies once the
    /// rotated key set has been fetched. [`Authenticator::verify_or_refresh`] waits for that fetch instead.
    pub fn verify(&self, token: &str) -> Result<Principal, AuthError> {
        let result = self.verify_cached(token);
        if let (Err(e), Some(remote)) = (&result, &self.remote)
            && is_unknown_kid(e)
            && remote.claim_kid_refresh()
        {
            remote.wake();
        }
        result
    }

    /// [`Authenticator::verify`], but a token naming an unknown `kid` fetches the JWKS URL first (if the
    /// once-per-[`JWKS_UNKNOWN_KID_COOLDOWN`] budget allows) and is verified against the fresh keys, so the first
    /// token signed by a rotated key is accepted. Inside the cooldown it is rejected like `verify` does.
    pub async fn verify_or_refresh(&self, token: &str) -> Result<Principal, AuthError> {
        let result = self.verify_cached(token);
        match (&result, &self.remote) {
            (Err(e), Some(remote)) if is_unknown_kid(e) && remote.claim_kid_refresh() => {
                if let Err(e) = remote.refresh().await {
                    tracing::warn!(error = %e, "jwks refresh failed; keeping the last good keys");
                }
                self.verify_cached(token)
            }
            _ => result,
        }
    }

    fn verify_cached(&self, token: &str) -> Result<Principal, AuthError> {
        let token = token.trim();
        if token.is_empty() {
            return Err(AuthError::Missing);
        }
        if token.len() > MAX_TOKEN_BYTES {
            return Err(AuthError::Invalid("token too large".into()));
        }
        let keys = self.current_keys();
        let now = jsonwebtoken::get_current_timestamp();
        if let Some(principal) = self.verified.get(token, &keys, now, self.leeway_secs) {
            return Ok(principal);
        }
        // `alg: none` and unknown algorithms fail here: the header type has no variant for them.
        let header = jsonwebtoken::decode_header(token)
            .map_err(|_| AuthError::Invalid("malformed header or unsupported algorithm".into()))?;
        let candidates = keys.candidates(&header)?;
        for key in &candidates.keys {
            match self.verify_with(token, key) {
                // Several keys of one algorithm (a rotation): a signature mismatch means "try the next".
                Err(e) if matches!(e.kind(), ErrorKind::InvalidSignature) => continue,
                Err(e) => return Err(map_error(&e)),
                Ok(claims) => {
                    let principal = self.check_iat(claims)?.into_principal()?;
                    self.verified.put(token, &keys, &principal);
                    return Ok(principal);
                }
            }
        }
        // No kid-less key signed a token naming an unknown kid: it is most likely from a key the JWKS URL has
        // rotated in, and saying so lets `verify` fetch it.
        let reason = if candidates.unknown_kid {
            keys::UNKNOWN_KID
        } else {
            "bad signature"
        };
        Err(AuthError::Invalid(reason.into()))
    }

    fn verify_with(
        &self,
        token: &str,
        key: &VerifyKey,
    ) -> jsonwebtoken::errors::Result<TokenClaims> {
        let mut validation = self.validation.clone();
        // Pinning: only the key's own algorithms, whatever the header says.
        validation.algorithms.clone_from(&key.algs);
        jsonwebtoken::decode::<TokenClaims>(token, &key.key, &validation).map(|data| data.claims)
    }

    /// The library does not look at `iat`; a token issued in the future (beyond the leeway) comes from a
    /// broken or hostile issuer clock and would outlive its intended lifetime.
    fn check_iat(&self, claims: TokenClaims) -> Result<TokenClaims, AuthError> {
        let now = jsonwebtoken::get_current_timestamp();
        match claims.iat {
            Some(iat) if iat > now.saturating_add(self.leeway_secs) => {
                Err(AuthError::Invalid("token issued in the future".into()))
            }
            _ => Ok(claims),
        }
    }
}

impl Drop for Authenticator {
    fn drop(&mut self) {
        if let Some(task) = &self.refresher {
            task.abort();
        }
    }
}

/// The one rejection a fresh JWKS may cure.
fn is_unknown_kid(e: &AuthError) -> bool {
    matches!(e, AuthError::Invalid(reason) if reason == keys::UNKNOWN_KID)
}

/// A short reason for a failed verification. Only fixed text and claim names (from a fixed set) are used, never
/// anything taken from the token.
fn map_error(e: &jsonwebtoken::errors::Error) -> AuthError {
    let reason = match e.kind() {
        ErrorKind::ExpiredSignature => return AuthError::Expired,
        ErrorKind::ImmatureSignature => "token not yet valid".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidAlgorithm => "algorithm does not match the key".into(),
        ErrorKind::MissingRequiredClaim(c) => format!("missing {c} claim"),
        ErrorKind::InvalidClaimFormat(c) => format!("malformed {c} claim"),
        ErrorKind::Json(_) => "malformed claims".into(),
        ErrorKind::InvalidToken | ErrorKind::Base64(_) | ErrorKind::Utf8(_) => {
            "malformed token".into()
        }
        _ => "token rejected".into(),
    };
    AuthError::Invalid(reason)
}

/// Claims of a token minted by `ferry token` / `ferry dev`.
#[derive(Debug, Clone)]
pub struct MintClaims {
    pub sub: String,
    pub scopes: Vec<String>,
    pub tenant: Option<String>,
    pub ttl: Duration,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

impl MintClaims {
    /// Claims for `sub` with `scopes` (space-separated, as a token's `scope` claim), valid for `ttl`; no tenant,
    /// issuer or audience.
    pub fn new(sub: impl Into<String>, scopes: &str, ttl: Duration) -> Self {
        Self {
            sub: sub.into(),
            scopes: scopes.split_whitespace().map(str::to_owned).collect(),
            tenant: None,
            ttl,
            issuer: None,
            audience: None,
        }
    }

    /// The same claims within `tenant` (none: without one).
    pub fn in_tenant(self, tenant: Option<&str>) -> Self {
        Self {
            tenant: tenant.map(str::to_owned),
            ..self
        }
    }
}

/// Sign an HS256 token with `sub`, `scope` (space-separated, omitted when empty), `tenant` (if any), `iat`,
/// `exp = now + ttl` and `iss`/`aud` if given.
///
/// Refuses (with [`AuthError::Config`]) what [`Authenticator::verify`] would reject anyway: a secret shorter than
/// [`MIN_HS_SECRET_BYTES`], an empty `sub`, a tenant that is not `[A-Za-z0-9._-]{1,64}`, a zero `ttl`, and scopes that are empty or contain
/// whitespace (they would split into other scopes).
pub fn mint(secret: &[u8], claims: &MintClaims) -> Result<String, AuthError> {
    keys::check_hs_secret(secret)?;
    let bad = |why: &str| AuthError::Config(format!("mint: {why}"));
    if claims.sub.trim().is_empty() {
        return Err(bad("sub must not be empty"));
    }
    if claims.tenant.as_deref().is_some_and(|t| !tenant_ok(t)) {
        return Err(bad(&format!(
            "tenant must be 1 to {MAX_TENANT_LEN} characters of ASCII letters, digits, '.', '_' or '-'"
        )));
    }
    if claims
        .scopes
        .iter()
        .any(|s| s.is_empty() || s.contains(char::is_whitespace))
    {
        return Err(bad("a scope is empty or contains whitespace"));
    }
    // Whole seconds, rounded up so a sub-second ttl still yields a token that is valid for a moment.
    let ttl_secs = claims.ttl.as_secs() + u64::from(claims.ttl.subsec_nanos() > 0);
    if ttl_secs == 0 {
        return Err(bad("ttl must be longer than zero"));
    }
    let now = jsonwebtoken::get_current_timestamp();
    let body = MintedClaims {
        sub: &claims.sub,
        scope: (!claims.scopes.is_empty()).then(|| claims.scopes.join(" ")),
        tenant: claims.tenant.as_deref(),
        iat: now,
        exp: now.saturating_add(ttl_secs),
        iss: claims.issuer.as_deref(),
        aud: claims.audience.as_deref(),
    };
    let key = EncodingKey::from_secret(secret).map_err(|_| bad("unusable secret"))?;
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &body, &key)
        .map_err(|_| bad("signing failed"))
}
