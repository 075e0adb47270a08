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

/// Deserialize `value` as `T`; on failure the error names the field at fault by its full path (`backoff.base_ms`,
/// `jobs[3].kind`), prefixed with `prefix` when given, and says what was wrong in the API's words: serde's own
/// messages name Rust types (`expected struct NewJob`, `expected u64`), which mean nothing to a client.
///
/// Every body the API takes is a JSON object, and `value` must be one: serde would also read a struct from an
/// array of its fields in order, which no client means.
pub fn from_value<T: DeserializeOwned>(value: Value, prefix: Option<&str>) -> Result<T, ApiError> {
    if !value.is_object() {
        let got = match &value {
            Value::Array(_) => "an array".to_owned(),
            Value::String(_) => "a string".to_owned(),
            Value::Number(n) => format!("the number {n}"),
            other => other.to_string(),
        };
        return Err(ValidationError::field(
            prefix.unwrap_or("body"),
            format!("must be a JSON object, got {got}"),
        )
        .into());
    }
    let err = match serde_path_to_error::deserialize::<_, T>(&value) {
        Ok(t) => return Ok(t),
        Err(e) => e,
    };
    let raw = err.inner().to_string();
    let mut path: Vec<String> = prefix.map(str::to_owned).into_iter().collect();
    for segment in err.path() {
        match segment {
            serde_path_to_error::Segment::Seq { index } => match path.last_mut() {
                Some(last) => last.push_str(&format!("[{index}]")),
                None => path.push(format!("[{index}]")),
            },
            serde_path_to_error::Segment::Map { key } => path.push(key.clone()),
            serde_path_to_error::Segment::Enum { .. } | serde_path_to_error::Segment::Unknown => {}
        }
    }
    // serde reports a missing or unknown field at its parent; the field itself is the one to name. (An unknown
    // field is usually on the path already, as the key being read.)
    if let Some(name) = named(&raw, "missing field `").or_else(|| named(&raw, "unknown field `"))
        && path.last() != Some(&name)
    {
        path.push(name);
    }
    let field = if path.is_empty() {
        "body".to_owned()
    } else {
        path.join(".")
    };
    Err(ValidationError {
        errors: vec![FieldError {
            message: api_words(&raw, &field),
            field,
        }],
    }
    .into())
}

fn named(err: &str, marker: &str) -> Option<String> {
    let rest = err.strip_prefix(marker)?;
    rest.split_once('`').map(|(name, _)| name.to_owned())
}

/// serde_json's message for a failed deserialization, rewritten without Rust type names.
fn api_words(raw: &str, field: &str) -> String {
    if raw.starts_with("missing field `") {
        return "is required".into();
    }
    if raw.starts_with("unknown field `") {
        return match raw.split_once(", expected ") {
            Some((_, fields)) => format!("is not a known field (expected {fields})"),
            None => "is not a known field".into(),
        };
    }
    if let Some(rest) = raw.strip_prefix("unknown variant `") {
        return match rest.split_once(", expected ") {
            Some((_, variants)) => format!("must be {variants}"),
            None => "is not one of the allowed values".into(),
        };
    }
    for marker in ["invalid type: ", "invalid value: "] {
        if let Some(rest) = raw.strip_prefix(marker)
            && let Some((got, expected)) = rest.rsplit_once(", expected ")
        {
            let expected = expected_words(expected);
            let got = got_words(got);
            return format!("must be {expected}, got {got}");
        }
    }
    // A message of our own (a validated name says `kind: must be …`): keep it, without the field twice. Anything
    // else serde may say is kept only if it names no type.
    let leaf = field.rsplit('.').next().unwrap_or(field);
    let own = raw.strip_prefix(&format!("{leaf}: ")).unwrap_or(raw);
    if own.contains("struct ") || own.contains("expected ") {
        "is not valid here".into()
    } else {
        own.to_owned()
    }
}

/// What serde expected, in JSON terms.
fn expected_words(expected: &str) -> String {
    let words = match expected {
        "u8" | "u16" | "u32" | "u64" | "u128" | "usize" => "a whole number, 0 or more",
        "i8" | "i16" | "i32" | "i64" | "i128" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a string" | "string" | "a borrowed string" | "char" => "a string",
        "a boolean" | "bool" => "true or false",
        "a sequence" | "sequence" => "an array",
        "unit" => "null",
        e if e.starts_with("struct ") || e.starts_with("a map") || e == "map" => "a JSON object",
        e if e.starts_with("one of ") || e.starts_with('`') => return e.to_owned(),
        _ => "a value of another type",
    };
    words.to_owned()
}

/// What the client sent, in JSON terms (serde says `floating point `1.5``, `map`, `sequence`).
fn got_words(got: &str) -> String {
    let quoted = |s: &str| s.split('`').nth(1).map(str::to_owned);
    if let Some(rest) = got
        .strip_prefix("integer ")
        .or_else(|| got.strip_prefix("floating point "))
    {
        return match quoted(rest) {
            Some(n) => format!("the number {n}"),
            None => "a number".into(),
        };
    }
    if let Some(rest) = got.strip_prefix("boolean ") {
        return quoted(rest).unwrap_or_else(|| "a boolean".into());
    }
    match got {
        "map" => "an object".into(),
        "sequence" => "an array".into(),
        "null" | "unit value" => "null".into(),
        g if g.starts_with("string ") => "a string".into(),
        _ => "a value of another type".into(),
    }
}

/// Turn every integral float (`50.0`) into an integer, outside `payload`: JSON has one number type, and an
/// OpenAPI `integer` is any number with no fraction, so `"max_attempts": 50.0` is valid by the document. serde
/// refuses a float for an integer field, hence this step before deserializing a submitted job. The payload is
/// the client's own data and is kept exactly as sent.
pub fn integral_numbers(value: &mut Value) {
    fn walk(v: &mut Value) {
        match v {
            Value::Number(n) => {
                if let Some(f) = n.as_f64()
                    && n.is_f64()
                    && f.fract() == 0.0
                    && f.abs() < 9_007_199_254_740_992.0
                {
                    // Exact below 2^53, and the sign decides the type.
                    let i = f as i64;
                    *v = if i >= 0 {
                        Value::from(i.unsigned_abs())
                    } else {
                        Value::from(i)
                    };
                }
            }
            Value::Array(a) => a.iter_mut().for_each(walk),
            Value::Object(o) => o.values_mut().for_each(walk),
            _ => {}
        }
    }
    match value {
        Value::Object(o) => {
            for (k, v) in o.iter_mut() {
                if k != "payload" {
                    walk(v);
                }
            }
        }
        other => walk(other),
    }
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

    fn message(e: &ApiError) -> String {
        e.problem()["errors"][0]["message"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    #[test]
    fn nested_fields_are_named_by_their_full_path() {
        let e = from_value::<NewJob>(json!({"kind": "k", "backoff": {"x": 1}}), None).unwrap_err();
        assert_eq!(field(e.clone()), "backoff.x");
        assert!(message(&e).contains("not a known field"), "{}", message(&e));
        let e = from_value::<NewJob>(json!({"kind": "k", "backoff": {"base_ms": 1}}), None)
            .unwrap_err();
        assert_eq!(
            (field(e.clone()), message(&e)),
            ("backoff.max_ms".to_owned(), "is required".to_owned())
        );
        let e = from_value::<NewJob>(
            json!({"kind": "k", "backoff": {"base_ms": "x", "max_ms": 1}}),
            Some("jobs[1]"),
        )
        .unwrap_err();
        assert_eq!(field(e), "jobs[1].backoff.base_ms");
    }

    #[test]
    fn messages_name_json_types_never_rust_ones() {
        #[derive(Debug, serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct Batch {
            jobs: Vec<Value>,
        }
        let cases = [
            from_value::<NewJob>(json!([1]), None).unwrap_err(),
            from_value::<NewJob>(json!("x"), None).unwrap_err(),
            from_value::<NewJob>(json!({"kind": "k", "max_attempts": "x"}), None).unwrap_err(),
            from_value::<NewJob>(json!({"kind": "k", "max_attempts": -1}), None).unwrap_err(),
            from_value::<NewJob>(json!({"kind": "k", "delay_ms": 1.5}), None).unwrap_err(),
            from_value::<NewJob>(json!({"kind": "k", "backoff": 3}), None).unwrap_err(),
            from_value::<NewJob>(json!({"kind": "k", "priority": "urgent"}), None).unwrap_err(),
            from_value::<NewJob>(json!({"kind": 7}), None).unwrap_err(),
            from_value::<Batch>(json!([]), None).unwrap_err(),
            from_value::<Batch>(json!({"jobs": {}}), None).unwrap_err(),
        ];
        for e in &cases {
            let m = message(e);
            for internal in [
                "struct",
                "NewJob",
                "Batch",
                "Backoff",
                "u64",
                "u32",
                "i64",
                "f64",
                "sequence",
                "floating point",
                "map",
            ] {
                assert!(!m.contains(internal), "{m:?} names {internal:?}");
            }
            assert!(m.starts_with("must") || m.starts_with("is"), "{m:?}");
        }
        assert_eq!(message(&cases[0]), "must be a JSON object, got an array");
        assert_eq!(
            message(&cases[4]),
            "must be a whole number, 0 or more, got the number 1.5"
        );
        assert!(
            message(&cases[6]).contains("`high`"),
            "{}",
            message(&cases[6])
        );
    }

    #[test]
    fn integral_floats_are_integers_outside_the_payload() {
        let mut v = json!({"kind": "k", "max_attempts": 50.0, "delay_ms": 0.0,
            "backoff": {"base_ms": 10.0, "max_ms": 20}, "payload": {"n": 1.0}});
        integral_numbers(&mut v);
        let job: NewJob = from_value(v, None).unwrap();
        assert_eq!(job.max_attempts, Some(50));
        assert_eq!(job.backoff.unwrap().base_ms, 10);
        assert_eq!(
            job.payload,
            json!({"n": 1.0}),
            "the payload is kept as sent"
        );
        let mut v = json!({"kind": "k", "max_attempts": 50.5});
        integral_numbers(&mut v);
        assert!(from_value::<NewJob>(v, None).is_err());
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
