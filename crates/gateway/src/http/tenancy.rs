//! How tenants are kept apart on one broker. A principal with a tenant sees queues under its own namespace
//! only: the queue `emails` of tenant `acme` is the broker queue `acme:emails`. The tenant is checked against a
//! smaller alphabet than queue names (no `:`), so the first `:` of a broker queue name always ends the tenant and
//! two tenants can never name the same broker queue.
//!
//! A principal without a tenant addresses broker queues directly, but (unless it is an admin) may not use a `:`
//! in a queue name: those names belong to tenants. This module is pure: no I/O, no broker.

use ferry_core::{QueueName, ValidationError};

use crate::auth::Principal;
use crate::error::ApiError;

pub use crate::auth::MAX_TENANT_LEN;

/// The separator between tenant and queue in a broker queue name.
const SEP: char = ':';

/// The principal's tenant, checked: `[A-Za-z0-9._-]{1,64}`. A token carrying anything else cannot be mapped to a
/// namespace safely, so it is refused (403) rather than guessed at.
pub fn tenant(p: &Principal) -> Result<Option<&str>, ApiError> {
    let Some(t) = p.tenant.as_deref() else {
        return Ok(None);
    };
    // Authentication refuses such tokens already; checked again because namespacing depends on it.
    if crate::auth::tenant_ok(t) {
        Ok(Some(t))
    } else {
        Err(ApiError::Forbidden(format!(
            "the token's tenant must be 1 to {MAX_TENANT_LEN} characters of ASCII letters, digits, '.', '_' or '-'"
        )))
    }
}

/// The broker queue for the queue name a client gave in the URL. Errors name the field `queue`.
pub fn broker_queue(p: &Principal, queue: &str) -> Result<QueueName, ApiError> {
    // Validate the client's own name first so the message is about what the client typed.
    QueueName::parse(queue)?;
    match tenant(p)? {
        Some(t) => {
            let full = format!("{t}{SEP}{queue}");
            QueueName::parse(full).map_err(|_| {
                ValidationError::field(
                    "queue",
                    format!(
                        "must be at most {} characters for tenant {t:?}",
                        ferry_core::names::MAX_NAME_LEN - t.len() - 1
                    ),
                )
                .into()
            })
        }
        None if queue.contains(SEP) && !p.is_admin() => Err(ValidationError::field(
            "queue",
            "names containing ':' are reserved for tenant namespaces",
        )
        .into()),
        None => Ok(QueueName::parse(queue)?),
    }
}

/// The name a client sees for a broker queue, or `None` when the queue is outside the principal's namespace.
pub fn client_queue<'a>(p: &Principal, broker: &'a QueueName) -> Option<&'a str> {
    let name = broker.as_str();
    match p.tenant.as_deref() {
        Some(t) => name
            .strip_prefix(t)
            .and_then(|rest| rest.strip_prefix(SEP))
            .filter(|rest| !rest.is_empty()),
        None if p.is_admin() => Some(name),
        None => (!name.contains(SEP)).then_some(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::{Scope, Scopes};

    fn principal(tenant: Option<&str>, admin: bool) -> Principal {
        let mut scopes = Scopes::default().with(Scope::JobsSubmit);
        if admin {
            scopes = scopes.with(Scope::Admin);
        }
        Principal {
            sub: "alice".into(),
            tenant: tenant.map(str::to_owned),
            scopes,
            exp: u64::MAX,
        }
    }

    #[test]
    fn tenant_queues_are_prefixed_and_stripped() {
        let p = principal(Some("acme"), false);
        let q = broker_queue(&p, "emails").unwrap();
        assert_eq!(q.as_str(), "acme:emails");
        assert_eq!(client_queue(&p, &q), Some("emails"));
        // A queue of another tenant, or of nobody, is invisible.
        let other = QueueName::parse("acme2:emails").unwrap();
        assert_eq!(client_queue(&p, &other), None);
        assert_eq!(client_queue(&p, &QueueName::parse("emails").unwrap()), None);
    }

    #[test]
    fn bad_tenants_are_forbidden_and_long_names_name_the_queue() {
        let p = principal(Some("a:b"), false);
        assert_eq!(broker_queue(&p, "q").unwrap_err().status(), 403);
        let p = principal(Some("acme"), false);
        let e = broker_queue(&p, &"x".repeat(126)).unwrap_err();
        assert_eq!(e.problem()["errors"][0]["field"], "queue");
        let e = broker_queue(&p, "with space").unwrap_err();
        assert_eq!(e.problem()["errors"][0]["field"], "queue");
    }

    #[test]
    fn colons_are_reserved_without_a_tenant_except_for_admins() {
        assert!(broker_queue(&principal(None, false), "acme:emails").is_err());
        let admin = principal(None, true);
        let q = broker_queue(&admin, "acme:emails").unwrap();
        assert_eq!(client_queue(&admin, &q), Some("acme:emails"));
        let user = principal(None, false);
        assert_eq!(client_queue(&user, &q), None);
        assert_eq!(broker_queue(&user, "emails").unwrap().as_str(), "emails");
    }
}
