//! JWT verification and scopes. (Public API fixed; implementation in progress.)

use std::time::Duration;

use crate::error::ApiError;

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
    /// Bad key material or settings, found at start-up.
    #[error("invalid auth configuration: {0}")]
    Config(String),
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        ApiError::Unauthorized(e.to_string())
    }
}

/// Key material and checks.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    /// Shared secret for HS256/384/512.
    pub hs_secret: Option<Vec<u8>>,
    /// PEM public keys (RSA, EC P-256, Ed25519), each pinned to its algorithm.
    pub public_key_pems: Vec<String>,
    /// A JWKS document (JSON text) loaded from a file.
    pub jwks_json: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway: Duration,
}

/// Verifies tokens.
#[derive(Debug)]
pub struct Authenticator {
    _config: AuthConfig,
}

impl Authenticator {
    pub fn new(config: AuthConfig) -> Result<Self, AuthError> {
        Ok(Self { _config: config })
    }

    pub fn verify(&self, _token: &str) -> Result<Principal, AuthError> {
        Err(AuthError::Invalid("not implemented".into()))
    }
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

/// Sign an HS256 token.
pub fn mint(_secret: &[u8], _claims: &MintClaims) -> Result<String, AuthError> {
    Err(AuthError::Config("not implemented".into()))
}
