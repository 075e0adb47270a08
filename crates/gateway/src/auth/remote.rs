//! A JWKS fetched from a URL, kept fresh in the background, read without waiting by token verification.
//!
//! Owns the only network I/O of `auth`: fetching the document (bounded in time and size), turning it into keys
//! with the same rules as a JWKS file (`keys::jwks_keys`), swapping the cached [`KeySet`] only when the new one
//! is entirely valid, and deciding *when* to fetch: periodically (the configured interval, or sooner when the
//! provider's `Cache-Control: max-age` says so, never more often than [`JWKS_MIN_REFRESH`]) and when a token names
//! an unknown `kid` (at most once per [`JWKS_UNKNOWN_KID_COOLDOWN`]). It must not verify tokens or look at claims,
//! and it never drops the last good key set because a fetch failed: an identity provider outage must not lock
//! every user out.
//!
//! One URL serves one issuer (the configured `iss`, checked by validation), so the cache is keyed by `kid` alone
//! within that issuer.

use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use super::AuthError;
use super::keys::{self, KeySet};

/// Refresh period when [`super::AuthConfig::jwks_refresh`] is zero.
pub const DEFAULT_JWKS_REFRESH: Duration = Duration::from_secs(10 * 60);

/// Shortest period between scheduled fetches, whatever `Cache-Control` says (`max-age=0` or `no-cache` would
/// otherwise turn the refresher into a busy loop against the provider). A configured interval below it wins,
/// since the operator asked for it explicitly.
pub const JWKS_MIN_REFRESH: Duration = Duration::from_secs(30);

/// Shortest accepted configured interval; anything faster is a misconfiguration, not a cache.
pub const JWKS_MIN_CONFIGURED_REFRESH: Duration = Duration::from_secs(1);

/// At most one fetch triggered by unknown kids per this period, so a stream of tokens with made-up kids cannot
/// make the gateway hammer the identity provider. Tokens with an unknown kid in between are rejected.
pub const JWKS_UNKNOWN_KID_COOLDOWN: Duration = Duration::from_secs(30);

/// Largest accepted document. Real key sets are a few KiB; the cap bounds what a broken or hostile endpoint can
/// make the gateway buffer.
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// A fetch that takes longer than this is treated as a failure (the last good keys stay in use).
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The cached key set of one JWKS URL, merged with the statically configured keys. `Debug` by hand: it shows
/// the URL redacted.
pub(super) struct RemoteJwks {
    url: reqwest::Url,
    /// The URL as logs and errors show it: a JWKS URL may carry a token (`https://TOKEN@host`, `user:pw@`).
    shown: String,
    client: reqwest::Client,
    /// Secret, PEM and JWKS-file keys: part of every key set, so kid clashes with them are caught per fetch.
    static_keys: KeySet,
    current: RwLock<Arc<KeySet>>,
    refresh_every: Duration,
    /// When the next scheduled fetch is due; every fetch (whoever triggered it) moves it.
    next_due: Mutex<Instant>,
    /// When an unknown kid last triggered a fetch.
    last_kid_refresh: Mutex<Option<Instant>>,
    /// Wakes the refresher for an unknown kid. `Notify` keeps one permit, so a wake-up sent while the refresher
    /// is busy fetching is not lost.
    wake: Notify,
    /// One fetch at a time: the refresher and `Authenticator::refresh` callers must not race their swaps.
    fetching: tokio::sync::Mutex<()>,
}

impl std::fmt::Debug for RemoteJwks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteJwks")
            .field("url", &self.shown)
            .field("refresh_every", &self.refresh_every)
            .field("keys", &self.current().len())
            .finish_non_exhaustive()
    }
}

impl RemoteJwks {
    /// Check the URL and build the HTTP client; nothing is fetched yet.
    pub fn new(url: &str, refresh: Duration, static_keys: KeySet) -> Result<Self, AuthError> {
        let shown = ferry_core::redact::redact_url(url);
        let bad = |why: &str| AuthError::Config(format!("jwks url {shown:?}: {why}"));
        let parsed = reqwest::Url::parse(url).map_err(|_| bad("not a URL"))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad("only http and https URLs are supported"));
        }
        if parsed.host_str().is_none_or(str::is_empty) {
            return Err(bad("the URL has no host"));
        }
        let refresh_every = if refresh.is_zero() {
            DEFAULT_JWKS_REFRESH
        } else {
            refresh
        };
        if refresh_every < JWKS_MIN_CONFIGURED_REFRESH {
            return Err(bad(&format!(
                "refresh interval {refresh_every:?} is below {JWKS_MIN_CONFIGURED_REFRESH:?}"
            )));
        }
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(FETCH_TIMEOUT)
            // Providers put JWKS behind CDNs that redirect; a few hops are normal, a loop is not.
            .redirect(reqwest::redirect::Policy::limited(5))
            .user_agent(concat!("ferry-gateway/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| bad(&format!("cannot build an HTTP client ({e})")))?;
        Ok(Self {
            url: parsed,
            shown,
            client,
            current: RwLock::new(Arc::new(static_keys.clone())),
            static_keys,
            refresh_every,
            next_due: Mutex::new(Instant::now()),
            last_kid_refresh: Mutex::new(None),
            wake: Notify::new(),
            fetching: tokio::sync::Mutex::new(()),
        })
    }

    /// The URL with its credentials redacted, for logs and errors.
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    pub fn is_plain_http(&self) -> bool {
        self.url.scheme() == "http"
    }

    /// The key set to verify with now. Cheap: an `Arc` clone under a read lock held for no longer than that.
    pub fn current(&self) -> Arc<KeySet> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// May an unknown kid trigger a fetch now? Claims the slot if so.
    pub fn claim_kid_refresh(&self) -> bool {
        let mut last = lock(&self.last_kid_refresh);
        let now = Instant::now();
        if last.is_some_and(|t| now.duration_since(t) < JWKS_UNKNOWN_KID_COOLDOWN) {
            return false;
        }
        *last = Some(now);
        true
    }

    /// Ask the refresher task to fetch now (after a successful [`Self::claim_kid_refresh`]).
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Fetch the document and, if every key in it is acceptable, make it the current key set. On failure the
    /// previous key set stays in use and the next attempt is scheduled sooner than a normal refresh.
    pub async fn refresh(&self) -> Result<(), AuthError> {
        let _one_at_a_time = self.fetching.lock().await;
        let fetched = self.fetch().await;
        let now = Instant::now();
        match fetched {
            Ok((set, max_age)) => {
                let count = set.len() - self.static_keys.len();
                *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(set);
                let after = refresh_after(max_age, self.refresh_every);
                *lock(&self.next_due) = now + after;
                tracing::debug!(url = %self.shown, keys = count, next_in = ?after, "jwks loaded");
                Ok(())
            }
            Err(e) => {
                *lock(&self.next_due) = now + retry_after(self.refresh_every);
                Err(e)
            }
        }
    }

    async fn fetch(&self) -> Result<(KeySet, Option<Duration>), AuthError> {
        let unavailable =
            |why: String| AuthError::Unavailable(format!("jwks url {}: {why}", self.shown));
        let mut response = self
            .client
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| unavailable(error_chain(&e.without_url())))?;
        let status = response.status();
        if !status.is_success() {
            return Err(unavailable(format!("answered {status}")));
        }
        let max_age = response
            .headers()
            .get_all(reqwest::header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(parse_max_age);
        if response
            .content_length()
            .is_some_and(|n| n > MAX_JWKS_BYTES as u64)
        {
            return Err(unavailable(format!(
                "document larger than {MAX_JWKS_BYTES} bytes"
            )));
        }
        // Read in chunks so a missing or lying Content-Length cannot push past the cap.
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| unavailable(error_chain(&e.without_url())))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(unavailable(format!(
                    "document larger than {MAX_JWKS_BYTES} bytes"
                )));
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8(body)
            .map_err(|_| AuthError::Config(format!("jwks url {}: not UTF-8", self.shown)))?;
        let in_url = |e: AuthError| match e {
            AuthError::Config(why) => AuthError::Config(format!("jwks url {}: {why}", self.shown)),
            other => other,
        };
        let mut set = self.static_keys.clone();
        for key in keys::jwks_keys(&text).map_err(in_url)? {
            // A kid clashing with a file key or repeated in the document: refuse the whole set.
            set.push(key).map_err(in_url)?;
        }
        Ok((set, max_age))
    }
}

/// The refresher: fetches when the schedule says so or an unknown kid asks, until aborted (the `Authenticator`
/// aborts it when dropped).
pub(super) async fn run(remote: Arc<RemoteJwks>) {
    loop {
        let due = *lock(&remote.next_due);
        tokio::select! {
            () = tokio::time::sleep_until(due) => {
                // Someone else fetched meanwhile and moved the schedule.
                if Instant::now() < *lock(&remote.next_due) {
                    continue;
                }
            }
            () = remote.wake.notified() => {}
        }
        if let Err(e) = remote.refresh().await {
            tracing::warn!(error = %e, "jwks refresh failed; keeping the last good keys");
        }
    }
}

/// When to fetch again after a success: the provider's `max-age` when given, bounded by the configured interval
/// (the longest an operator accepts a revoked key to stay trusted) and by [`JWKS_MIN_REFRESH`] (or the
/// configured interval, if shorter) so the provider is never polled in a tight loop.
pub(super) fn refresh_after(max_age: Option<Duration>, every: Duration) -> Duration {
    let floor = JWKS_MIN_REFRESH.min(every);
    max_age.map_or(every, |m| m.clamp(floor, every))
}

/// When to try again after a failure: sooner than a normal refresh (the keys may be missing a rotation), but no
/// sooner than the floor, so an outage is not met with a stream of retries.
pub(super) fn retry_after(every: Duration) -> Duration {
    JWKS_MIN_REFRESH.min(every)
}

/// `max-age` of a `Cache-Control` value; `no-cache` and `no-store` count as zero (then raised to the floor).
pub(super) fn parse_max_age(value: &str) -> Option<Duration> {
    value.split(',').map(str::trim).find_map(|directive| {
        let lower = directive.to_ascii_lowercase();
        if lower == "no-cache" || lower == "no-store" {
            return Some(Duration::ZERO);
        }
        let secs = lower.strip_prefix("max-age=")?;
        secs.trim_matches('"').parse().ok().map(Duration::from_secs)
    })
}

/// An error with its causes: reqwest's own message ("error sending request") says nothing of *why*.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        // hyper and reqwest often repeat a cause in their own message.
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// The guarded values are plain data that a panicking holder cannot leave half-written, so poisoning is ignored.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
