//! The HTTP webhook executor: a job of a configured kind is POSTed as JSON to a URL, and the answer decides the
//! outcome. 2xx → success (the JSON body is the result; an empty body is `null`, a non-JSON body is kept as a
//! string rather than failing work that was done); 408, 429 and 5xx, timeouts and connection errors → retry,
//! honouring `Retry-After` in seconds; any other 4xx → permanent failure.

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use ferry_core::Kind;
use reqwest::header::{HeaderMap, HeaderName, HeaderValue, RETRY_AFTER};
use reqwest::{StatusCode, Url};
use serde_json::{Value, json};

use crate::{Handler, JobContext, JobError, WorkerError};

/// Longest `Retry-After` honoured; a larger value is clamped rather than parking a job for months.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// How much of an error response body goes into the job's error message.
const ERROR_BODY_CHARS: usize = 200;

/// Where and how to call a webhook.
#[derive(Clone, PartialEq, Eq)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL the job is POSTed to.
    pub url: String,
    /// Per-request time limit (default 30 s). The job's own timeout applies too; the shorter wins.
    pub timeout: Duration,
    /// Extra request headers, e.g. an `Authorization` shared with the receiver.
    pub headers: Vec<(String, String)>,
}

impl WebhookConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            timeout: Duration::from_secs(30),
            headers: Vec::new(),
        }
    }
}

// Header values are often secrets: never print them.
impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookConfig")
            .field("url", &self.url)
            .field("timeout", &self.timeout)
            .field(
                "headers",
                &self.headers.iter().map(|(k, _)| k).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// The handler behind a webhook kind.
pub struct WebhookHandler {
    url: Url,
    timeout: Duration,
    headers: HeaderMap,
    client: reqwest::Client,
}

impl fmt::Debug for WebhookHandler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhookHandler")
            .field("url", &self.url.as_str())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl WebhookHandler {
    /// Validate `config` (URL scheme, header names and values, a non-zero timeout).
    pub fn new(
        kind: &Kind,
        config: WebhookConfig,
        client: reqwest::Client,
    ) -> Result<Self, WorkerError> {
        let bad = |message: String| WorkerError::Webhook {
            kind: kind.to_string(),
            message,
        };
        let url = Url::parse(&config.url).map_err(|e| bad(format!("invalid url: {e}")))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(bad(format!(
                "invalid url: scheme must be http or https, got {:?}",
                url.scheme()
            )));
        }
        if config.timeout.is_zero() {
            return Err(bad("timeout must be greater than zero".into()));
        }
        let mut headers = HeaderMap::new();
        for (name, value) in &config.headers {
            let n = HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| bad(format!("invalid header name {name:?}")))?;
            let mut v = HeaderValue::from_str(value.trim())
                .map_err(|_| bad(format!("invalid value for header {name:?}")))?;
            v.set_sensitive(true);
            headers.append(n, v);
        }
        Ok(Self {
            url,
            timeout: config.timeout,
            headers,
            client,
        })
    }
}

#[async_trait]
impl Handler for WebhookHandler {
    async fn run(&self, ctx: JobContext) -> Result<Value, JobError> {
        let job = ctx.job();
        let body = json!({
            "id": job.id,
            "queue": job.queue,
            "kind": job.spec.kind,
            "attempt": job.attempt,
            "payload": job.spec.payload,
        });
        let response = self
            .client
            .post(self.url.clone())
            .headers(self.headers.clone())
            .timeout(self.timeout)
            .json(&body)
            .send()
            .await;
        let response = match response {
            Ok(r) => r,
            Err(e) if e.is_timeout() => {
                return Err(JobError::retry(format!(
                    "webhook timed out after {} ms",
                    self.timeout.as_millis()
                )));
            }
            Err(e) => return Err(JobError::retry(format!("webhook request failed: {e}"))),
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let text = match response.text().await {
            Ok(t) => t,
            Err(e) if e.is_timeout() => {
                return Err(JobError::retry(format!(
                    "webhook timed out after {} ms",
                    self.timeout.as_millis()
                )));
            }
            Err(e) => {
                return Err(JobError::retry(format!(
                    "webhook response body unreadable: {e}"
                )));
            }
        };
        outcome(status, retry_after, text)
    }
}

/// Decide a job's outcome from a webhook's answer (pure, so it is tested without a server).
fn outcome(
    status: StatusCode,
    retry_after: Option<Duration>,
    text: String,
) -> Result<Value, JobError> {
    if status.is_success() {
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        // The receiver did the work; rerunning it because the body is not JSON would be worse than keeping the
        // body as a string.
        return Ok(serde_json::from_str(&text).unwrap_or(Value::String(text)));
    }
    let snippet: String = text.chars().take(ERROR_BODY_CHARS).collect();
    let message = if snippet.trim().is_empty() {
        format!("webhook returned {status}")
    } else {
        format!("webhook returned {status}: {}", snippet.trim())
    };
    let retryable = status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT;
    if retryable {
        Err(JobError::Retry {
            message,
            retry_after,
        })
    } else {
        // Any other status (4xx, or an unfollowed 3xx) will not change by asking again.
        Err(JobError::permanent(message))
    }
}

/// `Retry-After` in delay-seconds form (the HTTP-date form is ignored: the job's backoff applies instead).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let secs: u64 = headers
        .get(RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(secs).min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_decide_outcomes() {
        assert_eq!(
            outcome(StatusCode::OK, None, r#"{"a":1}"#.into()),
            Ok(json!({"a": 1}))
        );
        assert_eq!(
            outcome(StatusCode::NO_CONTENT, None, String::new()),
            Ok(Value::Null)
        );
        assert_eq!(
            outcome(StatusCode::OK, None, "done".into()),
            Ok(json!("done"))
        );
        assert!(matches!(
            outcome(StatusCode::NOT_FOUND, None, "nope".into()),
            Err(JobError::Permanent { message }) if message == "webhook returned 404 Not Found: nope"
        ));
        assert!(matches!(
            outcome(StatusCode::BAD_GATEWAY, None, String::new()),
            Err(JobError::Retry {
                retry_after: None,
                ..
            })
        ));
        let d = Some(Duration::from_secs(7));
        assert!(matches!(
            outcome(StatusCode::TOO_MANY_REQUESTS, d, String::new()),
            Err(JobError::Retry { retry_after, .. }) if retry_after == d
        ));
    }

    #[test]
    fn retry_after_seconds_only() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("3"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(3)));
        h.insert(
            RETRY_AFTER,
            HeaderValue::from_static("Wed, 21 Oct 2015 07:28:00 GMT"),
        );
        assert_eq!(retry_after(&h), None);
        h.insert(RETRY_AFTER, HeaderValue::from_static("99999999"));
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
    }

    #[test]
    fn config_is_validated_and_secrets_hidden() {
        let kind = Kind::parse("hook").unwrap();
        let client = reqwest::Client::new();
        let mut c = WebhookConfig::new("ftp://x");
        assert!(WebhookHandler::new(&kind, c.clone(), client.clone()).is_err());
        c.url = "http://127.0.0.1:1/x".into();
        c.headers = vec![("Authorization".into(), "Bearer s3cret".into())];
        assert!(WebhookHandler::new(&kind, c.clone(), client.clone()).is_ok());
        assert!(!format!("{c:?}").contains("s3cret"));
        c.headers = vec![("bad name".into(), "v".into())];
        assert!(WebhookHandler::new(&kind, c, client).is_err());
    }
}
