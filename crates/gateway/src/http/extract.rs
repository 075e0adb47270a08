//! Extractors that turn every request problem into an [`ApiError`], so clients always get problem+json:
//! [`Authed`] (bearer token → [`Principal`], then the per-subject rate limit), [`Json`] (body limit → 413,
//! malformed JSON → 400) and [`Path`]. [`from_value`] deserializes a JSON value and names the bad field.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::ConnectInfo;
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use ferry_core::{FieldError, ValidationError};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::Api;
use crate::auth::{AuthError, Principal};
use crate::error::ApiError;

/// The authenticated caller of a request, already counted against its rate limit.
#[derive(Debug, Clone)]
pub struct Authed(pub Principal);

impl FromRequestParts<Api> for Authed {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, api: &Api) -> Result<Self, ApiError> {
        let verified = match bearer(&parts.headers) {
            // Waits for a key refresh when the token names a key id not seen yet (a rotation at the issuer).
            Ok(token) => api.app.auth.verify_or_refresh(token).await,
            Err(e) => Err(e),
        };
        let principal = match verified {
            Ok(p) => p,
            Err(e) => {
                // Failures cost the address, as failed upgrades do (the same budget): guessing is slowed and
                // an address that keeps failing gets 429 instead of a verification each time.
                let peer = parts.extensions.get::<ConnectInfo<SocketAddr>>();
                if let Some(ConnectInfo(peer)) = peer
                    && !api.app.hub.auth_failure_allowed(peer.ip())
                {
                    api.metrics.count_auth_failure("too_many_failures");
                    return Err(ApiError::RateLimited {
                        retry_after_secs: 1,
                    });
                }
                api.metrics.count_auth_failure("unauthorized");
                return Err(e.into());
            }
        };
        if let Some(conn) = parts.extensions.get::<crate::connection::Handle>() {
            conn.authenticated();
        }
        // Limited after authentication so the key is the verified subject: a forged token cannot spend
        // someone else's budget.
        api.limiter.check(&principal)?;
        Ok(Self(principal))
    }
}

/// The token of an `Authorization: Bearer <token>` header.
pub fn bearer(headers: &HeaderMap) -> Result<&str, AuthError> {
    let value = headers.get(AUTHORIZATION).ok_or(AuthError::Missing)?;
    let value = value
        .to_str()
        .map_err(|_| AuthError::Invalid("the Authorization header is not ASCII".into()))?;
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Ok(token.trim())
        }
        _ => Err(AuthError::Invalid(
            "the Authorization header must be \"Bearer <token>\"".into(),
        )),
    }
}

/// A JSON body. Unlike axum's `Json` it does not insist on a content type (clients authenticate with a bearer
/// token, so there is no form-post CSRF to guard against) and it reports every failure as problem+json.
#[derive(Debug, Clone)]
pub struct Json<T>(pub T);

impl<S: Send + Sync> FromRequest<S> for Json<Value> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        // The limit itself is the router's `DefaultBodyLimit`; buffering is where it bites.
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge("the request body is over the configured limit".into())
            } else {
                ApiError::bad_request(format!("cannot read the request body: {}", r.body_text()))
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(Json)
            .map_err(|e| ValidationError::field("body", format!("malformed JSON: {e}")).into())
    }
}

/// A path parameter, with a problem+json rejection.
#[derive(Debug, Clone)]
pub struct Path<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned + Send> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Self(p.0))
            .map_err(|r| ApiError::bad_request(r.body_text()))
    }
}

/// Deserialize `value` as `T`; on failure the error names the field at fault, prefixed with `prefix`
/// (`jobs[3]`) when given.
///
/// serde_json reports unknown and missing fields by name but not the field of a type error, and the crate that
/// tracks paths is not a dependency. So on a type error each top-level key is dropped in turn: the key whose
/// removal makes the error go away (or turn into "missing field") is the culprit. This runs only on the error
/// path, over a handful of keys.
pub fn from_value<T: DeserializeOwned>(value: Value, prefix: Option<&str>) -> Result<T, ApiError> {
    let err = match T::deserialize(&value) {
        Ok(t) => return Ok(t),
        Err(e) => e.to_string(),
    };
    let field = named(&err, "unknown field `")
        .or_else(|| named(&err, "missing field `"))
        .or_else(|| culprit::<T>(&value));
    let field = match (prefix, field) {
        (Some(p), Some(f)) => format!("{p}.{f}"),
        (Some(p), None) => p.to_owned(),
        (None, Some(f)) => f,
        (None, None) => "body".to_owned(),
    };
    // Validated names report themselves as `kind: …`; do not say the field twice.
    let leaf = field.rsplit('.').next().unwrap_or(&field);
    let message = err
        .strip_prefix(&format!("{leaf}: "))
        .unwrap_or(&err)
        .to_owned();
    Err(ValidationError {
        errors: vec![FieldError { field, message }],
    }
    .into())
}

fn named(err: &str, marker: &str) -> Option<String> {
    let rest = err.strip_prefix(marker)?;
    rest.split_once('`').map(|(name, _)| name.to_owned())
}

fn culprit<T: DeserializeOwned>(value: &Value) -> Option<String> {
    let obj = value.as_object()?;
    obj.keys().find_map(|key| {
        let mut without = obj.clone();
        without.remove(key);
        match T::deserialize(&Value::Object(without)) {
            Ok(_) => Some(key.clone()),
            Err(e) if e.to_string() == format!("missing field `{key}`") => Some(key.clone()),
            Err(_) => None,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_core::NewJob;
    use serde_json::json;

    fn field(e: ApiError) -> String {
        e.problem()["errors"][0]["field"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn names_the_field_of_every_kind_of_error() {
        let e = from_value::<NewJob>(json!({"kind": "k", "colour": 1}), None).unwrap_err();
        assert_eq!(field(e), "colour");
        let e = from_value::<NewJob>(json!({"payload": 1}), None).unwrap_err();
        assert_eq!(field(e), "kind");
        let e = from_value::<NewJob>(json!({"kind": "k", "max_attempts": "x"}), None).unwrap_err();
        assert_eq!(field(e), "max_attempts");
        let e = from_value::<NewJob>(json!({"kind": "a b"}), Some("jobs[2]")).unwrap_err();
        let p = e.problem();
        assert_eq!(p["errors"][0]["field"], "jobs[2].kind");
        assert!(
            !p["errors"][0]["message"]
                .as_str()
                .unwrap()
                .starts_with("kind:")
        );
        let e = from_value::<NewJob>(json!([1]), None).unwrap_err();
        assert_eq!(field(e), "body");
        // Fields the gateway sets are not accepted from the body.
        assert!(from_value::<NewJob>(json!({"kind": "k", "owner": "x"}), None).is_err());
    }

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), Err(AuthError::Missing));
        h.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert!(matches!(bearer(&h), Err(AuthError::Invalid(_))));
        h.insert(AUTHORIZATION, "bearer abc".parse().unwrap());
        assert_eq!(bearer(&h), Ok("abc"));
    }
}
