//! Tokens already verified, by their text, for as long as they stay valid.
//!
//! A client sends the same token with every request: verifying it again each time (the header and claims
//! decoded and parsed, an HMAC or signature checked) was a measurable share of a single submit's CPU. Only tokens
//! that passed every check are kept, so invalid tokens cannot fill the map, and a hit is re-checked against the
//! one claim that changes with time (`exp`, with the same leeway as a full verification: `nbf` and `iat` that
//! passed once stay passed). The map belongs to one key set: when the keys change (a JWKS refresh), it starts
//! empty, so a token signed by a key that was withdrawn is verified again and rejected.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::Principal;
use super::keys::KeySet;

/// Most tokens kept; a full map is emptied and refilled (no worse than verifying every request).
pub(super) const MAX_VERIFIED: usize = 10_000;

#[derive(Default)]
pub(super) struct Verified {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// The key set the entries were verified with.
    keys: Option<Arc<KeySet>>,
    tokens: HashMap<Box<str>, Principal>,
}

impl std::fmt::Debug for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the tokens.
        f.debug_struct("Verified").finish_non_exhaustive()
    }
}

impl Verified {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // Entries are inserted whole: a panic elsewhere leaves nothing half-written.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The principal of `token` when it was verified with `keys` and has not expired by `now` (seconds) with
    /// `leeway_secs` of leeway.
    pub(super) fn get(
        &self,
        token: &str,
        keys: &Arc<KeySet>,
        now: u64,
        leeway_secs: u64,
    ) -> Option<Principal> {
        let mut inner = self.lock();
        if !inner.keys.as_ref().is_some_and(|k| Arc::ptr_eq(k, keys)) {
            inner.keys = Some(keys.clone());
            inner.tokens.clear();
            return None;
        }
        let principal = inner.tokens.get(token)?;
        // The library's rule: expired once `exp` is more than the leeway in the past.
        if principal.exp.saturating_add(leeway_secs) < now {
            inner.tokens.remove(token);
            return None;
        }
        Some(principal.clone())
    }

    /// Keep `token`, which `keys` just verified as `principal`.
    pub(super) fn put(&self, token: &str, keys: &Arc<KeySet>, principal: &Principal) {
        let mut inner = self.lock();
        if !inner.keys.as_ref().is_some_and(|k| Arc::ptr_eq(k, keys)) {
            // Verified with keys that are no longer (or not yet) the map's: not kept.
            return;
        }
        if inner.tokens.len() >= MAX_VERIFIED {
            inner.tokens.clear();
        }
        inner.tokens.insert(token.into(), principal.clone());
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.lock().tokens.len()
    }
}
