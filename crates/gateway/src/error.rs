//! The one table from gateway errors to what clients see: HTTP status and problem type (RFC 9457
//! `application/problem+json`), and the WebSocket error `code` used in `{"ok": false, "error": {...}}` frames.
//! Clients never see internals: a broker or internal failure is reported without its cause.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ferry_broker::BrokerError;
use ferry_core::{FieldError, ValidationError};
use ferry_store::StoreError;

/// Every error a client can receive.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApiError {
    /// Malformed JSON or an invalid field; `errors` names each bad field.
    #[error("{detail}")]
    BadRequest {
        detail: String,
        errors: Vec<FieldError>,
    },
    /// Missing, expired or invalid token.
    #[error("{0}")]
    Unauthorized(String),
    /// Valid token without the scope (or tenant) the operation needs.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    /// The route exists but not with this method; `allow` lists the methods it has (the `Allow` header).
    #[error("this route does not accept this method; the Allow header lists the ones it does")]
    MethodNotAllowed { allow: String },
    /// The operation conflicts with the resource's state (cancel of a finished job).
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    /// The request line is longer than the gateway reads (a token belongs in `Authorization`, not the URL).
    #[error("the request URI is too long (a token belongs in the Authorization header)")]
    UriTooLong,
    /// `GET /v1/ws` without a WebSocket upgrade.
    #[error("{0}")]
    UpgradeRequired(String),
    #[error("rate limit exceeded")]
    RateLimited { retry_after_secs: u64 },
    /// The request body did not arrive within the body timeout.
    #[error("{0}")]
    RequestTimeout(String),
    /// The client's address (or the node) holds too many connections that have not authenticated yet.
    #[error("{detail}")]
    TooManyConnections {
        detail: String,
        retry_after_secs: u64,
    },
    /// The request's headers are over what the gateway reads.
    #[error("the request headers are too large")]
    HeadersTooLarge,
    /// A dependency (Redis) is unavailable or shedding load; retry later.
    #[error("{detail}")]
    Unavailable {
        detail: String,
        retry_after_secs: u64,
    },
    /// The gateway is shedding new submissions: the event log is too far ahead of the durable record.
    #[error("{detail}")]
    Overloaded {
        detail: String,
        retry_after_secs: u64,
    },
    /// A query route on a gateway started without a database.
    #[error("this gateway has no database; start it with --database-url")]
    NoStore,
    #[error("internal error")]
    Internal,
}

impl ApiError {
    pub fn bad_request(detail: impl Into<String>) -> Self {
        Self::BadRequest {
            detail: detail.into(),
            errors: Vec::new(),
        }
    }

    /// The row of the table: HTTP status, problem type slug, title, WebSocket error code.
    pub fn row(&self) -> (StatusCode, &'static str, &'static str, &'static str) {
        match self {
            Self::BadRequest { .. } => (
                StatusCode::BAD_REQUEST,
                "bad-request",
                "Bad request",
                "bad_request",
            ),
            Self::Unauthorized(_) => (
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "Unauthorized",
                "unauthorized",
            ),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden", "Forbidden", "forbidden"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not-found", "Not found", "not_found"),
            Self::MethodNotAllowed { .. } => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "bad_request",
            ),
            Self::Conflict(_) => (StatusCode::CONFLICT, "conflict", "Conflict", "conflict"),
            Self::PayloadTooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload-too-large",
                "Payload too large",
                "too_large",
            ),
            Self::UriTooLong => (
                StatusCode::URI_TOO_LONG,
                "uri-too-long",
                "URI too long",
                "bad_request",
            ),
            Self::UpgradeRequired(_) => (
                StatusCode::UPGRADE_REQUIRED,
                "upgrade-required",
                "Upgrade required",
                "bad_request",
            ),
            Self::HeadersTooLarge => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "headers-too-large",
                "Request header fields too large",
                "bad_request",
            ),
            Self::RateLimited { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate-limited",
                "Too many requests",
                "rate_limited",
            ),
            Self::RequestTimeout(_) => (
                StatusCode::REQUEST_TIMEOUT,
                "request-timeout",
                "Request timeout",
                "bad_request",
            ),
            Self::TooManyConnections { .. } => (
                StatusCode::TOO_MANY_REQUESTS,
                "too-many-connections",
                "Too many connections",
                "rate_limited",
            ),
            Self::Unavailable { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "Service unavailable",
                "unavailable",
            ),
            Self::Overloaded { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "Overloaded",
                "overloaded",
            ),
            Self::NoStore => (
                StatusCode::SERVICE_UNAVAILABLE,
                "no-store",
                "No database",
                "unavailable",
            ),
            Self::Internal => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "Internal error",
                "internal",
            ),
        }
    }

    pub fn status(&self) -> StatusCode {
        self.row().0
    }

    /// The WebSocket error code (`bad_request`, `unauthorized`, `forbidden`, `not_found`, `too_large`,
    /// `rate_limited`, `unavailable`, `overloaded`, `conflict`, `internal`).
    pub fn ws_code(&self) -> &'static str {
        self.row().3
    }

    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            Self::RateLimited { retry_after_secs }
            | Self::TooManyConnections {
                retry_after_secs, ..
            }
            | Self::Unavailable {
                retry_after_secs, ..
            }
            | Self::Overloaded {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            _ => None,
        }
    }

    /// The problem+json body.
    pub fn problem(&self) -> serde_json::Value {
        let (status, slug, title, _) = self.row();
        let mut body = serde_json::json!({
            "type": format!("urn:ferry:problem:{slug}"),
            "title": title,
            "status": status.as_u16(),
            "detail": self.to_string(),
        });
        if let Self::BadRequest { errors, .. } = self
            && !errors.is_empty()
        {
            body["errors"] = serde_json::to_value(errors).unwrap_or_default();
        }
        body
    }

    /// The `error` object of a WebSocket reply frame.
    pub fn ws_error(&self) -> serde_json::Value {
        let mut e = serde_json::json!({"code": self.ws_code(), "message": self.to_string()});
        if let Self::BadRequest { errors, .. } = self
            && !errors.is_empty()
        {
            e["errors"] = serde_json::to_value(errors).unwrap_or_default();
        }
        e
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut res = (self.status(), axum::Json(self.problem())).into_response();
        res.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(secs) = self.retry_after_secs() {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        match &self {
            Self::Unauthorized(_) => {
                res.headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // Empty when the router fills `Allow` in itself, after this response is made.
            Self::MethodNotAllowed { allow } if !allow.is_empty() => {
                if let Ok(v) = HeaderValue::from_str(allow) {
                    res.headers_mut().insert(header::ALLOW, v);
                }
            }
            Self::UpgradeRequired(_) => {
                res.headers_mut()
                    .insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                res.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            }
            _ => {}
        }
        res
    }
}

impl ApiError {
    /// One example of every row of the table, for tests that check each status a client can get.
    pub fn examples() -> Vec<ApiError> {
        vec![
            Self::bad_request("x"),
            Self::Unauthorized("x".into()),
            Self::Forbidden("x".into()),
            Self::NotFound("x".into()),
            Self::MethodNotAllowed {
                allow: "GET".into(),
            },
            Self::Conflict("x".into()),
            Self::PayloadTooLarge("x".into()),
            Self::UriTooLong,
            Self::UpgradeRequired("x".into()),
            Self::RateLimited {
                retry_after_secs: 1,
            },
            Self::HeadersTooLarge,
            Self::RequestTimeout("x".into()),
            Self::TooManyConnections {
                detail: "x".into(),
                retry_after_secs: 1,
            },
            Self::Unavailable {
                detail: "x".into(),
                retry_after_secs: 1,
            },
            Self::Overloaded {
                detail: "x".into(),
                retry_after_secs: 1,
            },
            Self::NoStore,
            Self::Internal,
        ]
    }

    /// The problem for an error response something other than a handler produced (axum's 405, a rejection
    /// answered in plain text), so that every error a client sees is problem+json. Statuses outside the table
    /// keep their status with the generic problem of their class.
    pub fn for_status(status: StatusCode, headers: &axum::http::HeaderMap) -> Response {
        let e = match status {
            StatusCode::METHOD_NOT_ALLOWED => Self::MethodNotAllowed {
                allow: headers
                    .get(header::ALLOW)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned(),
            },
            StatusCode::NOT_FOUND => Self::NotFound("no such route".into()),
            StatusCode::UNAUTHORIZED => Self::Unauthorized("missing bearer token".into()),
            StatusCode::FORBIDDEN => Self::Forbidden("forbidden".into()),
            StatusCode::PAYLOAD_TOO_LARGE => {
                Self::PayloadTooLarge("the request body is over the configured limit".into())
            }
            StatusCode::URI_TOO_LONG => Self::UriTooLong,
            StatusCode::UPGRADE_REQUIRED => {
                Self::UpgradeRequired("this route needs a WebSocket upgrade".into())
            }
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => Self::HeadersTooLarge,
            StatusCode::REQUEST_TIMEOUT => {
                Self::RequestTimeout("the request did not arrive in time".into())
            }
            StatusCode::TOO_MANY_REQUESTS => Self::RateLimited {
                retry_after_secs: 1,
            },
            s if s.is_server_error() => Self::Internal,
            _ => Self::bad_request(format!(
                "the request was refused: {}",
                status.canonical_reason().unwrap_or("client error")
            )),
        };
        if e.status() == status {
            return e.into_response();
        }
        // A 4xx outside the table is still that 4xx: keep the status, in the body too.
        let mut body = e.problem();
        body["status"] = status.as_u16().into();
        body["title"] = status.canonical_reason().unwrap_or("Error").into();
        let mut res = e.into_response();
        *res.status_mut() = status;
        *res.body_mut() = axum::body::Body::from(body.to_string());
        res.headers_mut().remove(header::CONTENT_LENGTH);
        res
    }
}

impl From<ValidationError> for ApiError {
    fn from(e: ValidationError) -> Self {
        Self::BadRequest {
            detail: e.to_string(),
            errors: e.errors,
        }
    }
}

impl From<BrokerError> for ApiError {
    fn from(e: BrokerError) -> Self {
        match e {
            BrokerError::Invalid(v) => v.into(),
            BrokerError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "broker unavailable");
                Self::Unavailable {
                    detail: "the job store is unavailable, retry later".into(),
                    retry_after_secs: 1,
                }
            }
            BrokerError::Internal(detail) => {
                tracing::error!(error = %detail, "broker internal error");
                Self::Internal
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(detail) => {
                tracing::warn!(error = %detail, "store unavailable");
                Self::Unavailable {
                    detail: "the job database is unavailable, retry later".into(),
                    retry_after_secs: 1,
                }
            }
            StoreError::Internal(detail) => {
                tracing::error!(error = %detail, "store internal error");
                Self::Internal
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problem_bodies_name_bad_fields_and_hide_internals() {
        let e: ApiError = ValidationError::field("kind", "must not be empty").into();
        let p = e.problem();
        assert_eq!(p["status"], 400);
        assert_eq!(p["errors"][0]["field"], "kind");
        assert_eq!(e.ws_code(), "bad_request");
        let e: ApiError = BrokerError::Internal("lua stack trace".into()).into();
        assert!(!e.problem().to_string().contains("lua"));
        let e: ApiError = BrokerError::Unavailable("conn refused".into()).into();
        assert_eq!((e.status().as_u16(), e.retry_after_secs()), (503, Some(1)));
        let e: ApiError = StoreError::Unavailable("connection refused".into()).into();
        assert_eq!((e.status().as_u16(), e.retry_after_secs()), (503, Some(1)));
        assert!(!e.problem().to_string().contains("refused"));
    }

    #[test]
    fn every_row_is_a_problem_with_its_own_type() {
        let mut slugs = std::collections::HashSet::new();
        for e in ApiError::examples() {
            let (status, slug, title, _) = e.row();
            assert!(slugs.insert(slug), "{slug} twice");
            let res = e.clone().into_response();
            assert_eq!(res.status(), status);
            assert_eq!(
                res.headers()[header::CONTENT_TYPE],
                "application/problem+json"
            );
            let p = e.problem();
            assert_eq!(p["type"], format!("urn:ferry:problem:{slug}"));
            assert_eq!(
                (p["status"].as_u64(), p["title"].as_str()),
                (Some(u64::from(status.as_u16())), Some(title))
            );
            let res = ApiError::for_status(status, &axum::http::HeaderMap::new());
            assert_eq!(res.status(), status);
        }
        let mut h = axum::http::HeaderMap::new();
        h.insert(header::ALLOW, HeaderValue::from_static("GET,HEAD"));
        let res = ApiError::for_status(StatusCode::METHOD_NOT_ALLOWED, &h);
        assert_eq!(res.headers()[header::ALLOW], "GET,HEAD");
        let res = ApiError::for_status(StatusCode::UNSUPPORTED_MEDIA_TYPE, &h);
        assert_eq!(res.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
        assert_eq!(
            res.headers()[header::CONTENT_TYPE],
            "application/problem+json"
        );
    }

    #[test]
    fn overload_and_missing_store_are_503_problems() {
        let e = ApiError::Overloaded {
            detail: "backlog".into(),
            retry_after_secs: 2,
        };
        assert_eq!(e.problem()["type"], "urn:ferry:problem:overloaded");
        assert_eq!((e.status().as_u16(), e.retry_after_secs()), (503, Some(2)));
        assert_eq!(e.ws_code(), "overloaded");
        let e = ApiError::NoStore;
        assert_eq!(e.problem()["type"], "urn:ferry:problem:no-store");
        assert_eq!((e.status().as_u16(), e.retry_after_secs()), (503, None));
        assert!(e.to_string().contains("--database-url"));
    }
}
