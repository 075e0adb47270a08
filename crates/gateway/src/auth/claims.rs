//! The JWT claims ferry reads and writes.
//!
//! Owns the wire shape of claims (`sub`, `scope`/`scp`, `tenant`, the registered time claims) and turning verified
//! claims into a [`Principal`]. It must not verify signatures or pick keys: it only ever sees claims whose token
//! has already been verified.

use serde::{Deserialize, Serialize};

use super::{AuthError, Principal, Scopes};

/// Longest accepted tenant; keeps room for the queue name inside the 128-character broker queue name.
pub const MAX_TENANT_LEN: usize = 64;

const BAD_TENANT: &str =
    "the token's tenant must be 1 to 64 characters of ASCII letters, digits, '.', '_' or '-'";

/// Whether `t` can be a tenant: `[A-Za-z0-9._-]{1,64}`. No `:`, so the first `:` of a broker queue name always ends
/// the tenant (see `http::tenancy`).
pub fn tenant_ok(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= MAX_TENANT_LEN
        && t.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The claims of an incoming token. Registered time claims are optional here so that a missing `exp` is reported
/// by validation ("missing exp claim") instead of as a generic parse failure.
#[derive(Debug, Deserialize)]
pub(super) struct TokenClaims {
    #[serde(default)]
    pub sub: Option<String>,
    #[serde(default)]
    pub exp: Option<u64>,
    #[serde(default)]
    pub iat: Option<u64>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub scp: Option<ScpClaim>,
    /// Any JSON, so that a tenant of the wrong type is refused as an unusable tenant (403) like a malformed one,
    /// not as a malformed token (401): the token is genuine, it just names no namespace ferry can use.
    #[serde(default)]
    pub tenant: Option<serde_json::Value>,
}

/// `scp` is an array in Azure AD / Okta tokens and a space-separated string in others; both are accepted.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum ScpClaim {
    One(String),
    Many(Vec<String>),
}

impl TokenClaims {
    /// The principal these (verified, time-checked) claims describe.
    ///
    /// Scopes are the union of `scope` and `scp`; unknown scope names are ignored so that issuers can share
    /// tokens between services with different scope vocabularies.
    pub fn into_principal(self) -> Result<Principal, AuthError> {
        let sub = self
            .sub
            .filter(|s| !s.trim().is_empty())
            .ok_or_else(|| invalid("missing sub claim"))?;
        // Validation requires exp, so this only guards against that requirement being dropped by mistake.
        let exp = self.exp.ok_or_else(|| invalid("missing exp claim"))?;
        // Checked here, after the signature, so every route and the WebSocket refuse such a token alike, with 403
        // as documented: an empty tenant would name a namespace shared by every token that sets one by mistake,
        // and one with a `:` could reach into another tenant's queues.
        let tenant = match self.tenant {
            None | Some(serde_json::Value::Null) => None,
            Some(serde_json::Value::String(t)) if tenant_ok(&t) => Some(t),
            Some(_) => return Err(AuthError::Forbidden(BAD_TENANT.into())),
        };
        let mut scopes = Scopes::parse(self.scope.as_deref().unwrap_or(""));
        match self.scp {
            Some(ScpClaim::One(s)) => scopes = union(scopes, Scopes::parse(&s)),
            Some(ScpClaim::Many(list)) => {
                for s in list {
                    scopes = union(scopes, Scopes::parse(&s));
                }
            }
            None => {}
        }
        Ok(Principal {
            sub,
            tenant,
            scopes,
            exp,
        })
    }
}

fn union(a: Scopes, b: Scopes) -> Scopes {
    Scopes(a.0 | b.0)
}

fn invalid(reason: &str) -> AuthError {
    AuthError::Invalid(reason.into())
}

/// The claims `mint` signs.
#[derive(Debug, Serialize)]
pub(super) struct MintedClaims<'a> {
    pub sub: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant: Option<&'a str>,
    pub iat: u64,
    pub exp: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<&'a str>,
}
