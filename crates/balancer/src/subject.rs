//! The subject of a token, read WITHOUT verifying it: only to place the client. A forged token gains nothing
//! here (the gateway verifies every token and refuses a bad one); at worst it lands on another gateway.

use base64::Engine;
use base64::engine::general_purpose::{URL_SAFE, URL_SAFE_NO_PAD};
use ferry_broker::placement::partition_of;
use serde::Deserialize;

/// A token's `sub` within its `tenant`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subject {
    pub tenant: Option<String>,
    pub sub: String,
}

impl Subject {
    /// Its partition: where the gateways hold it (`ferry_broker::placement`).
    pub fn partition(&self) -> u16 {
        partition_of(self.tenant.as_deref(), &self.sub)
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<serde_json::Value>,
    #[serde(default)]
    tenant: Option<serde_json::Value>,
}

/// The subject of a JWT (`header.payload.signature`), from its payload alone; `None` for anything that is not a
/// JWT with a non-empty string `sub`. A `tenant` that is not a string counts as none (the gateway refuses such a
/// token anyway).
pub fn subject_of(token: &str) -> Option<Subject> {
    let mut parts = token.split('.');
    let (_header, payload, _sig) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || payload.len() > 16 * 1024 {
        return None;
    }
    let bytes = URL_SAFE_NO_PAD
        .decode(payload)
        .or_else(|_| URL_SAFE.decode(payload))
        .ok()?;
    let claims: Claims = serde_json::from_slice(&bytes).ok()?;
    let sub = match claims.sub? {
        serde_json::Value::String(s) if !s.trim().is_empty() => s,
        _ => return None,
    };
    let tenant = match claims.tenant {
        Some(serde_json::Value::String(t)) if !t.is_empty() => Some(t),
        _ => None,
    };
    Some(Subject { tenant, sub })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(payload: &str) -> String {
        format!(
            "eyJhbGciOiJIUzI1NiJ9.{}.c2ln",
            URL_SAFE_NO_PAD.encode(payload)
        )
    }

    #[test]
    fn subjects_come_from_the_payload() {
        let s = subject_of(&jwt(r#"{"sub":"alice","tenant":"acme","exp":1}"#)).unwrap();
        assert_eq!(
            s,
            Subject {
                tenant: Some("acme".into()),
                sub: "alice".into()
            }
        );
        assert_eq!(s.partition(), partition_of(Some("acme"), "alice"));
        let s = subject_of(&jwt(r#"{"sub":"bob","tenant":7}"#)).unwrap();
        assert_eq!(s.tenant, None);
        for bad in [
            jwt(r#"{"sub":""}"#),
            jwt(r#"{"sub":5}"#),
            jwt(r#"{"scope":"x"}"#),
            jwt("not json"),
            "a.b".into(),
            "a.!!!.c".into(),
            format!("{}.extra", jwt(r#"{"sub":"x"}"#)),
        ] {
            assert_eq!(subject_of(&bad), None, "{bad}");
        }
    }
}
