//! The refusals Redis answers a client with, named with their cause and their fix instead of the driver's
//! wording (`broken pipe`, `Connection reset by peer (os error 104)`, `"NOAUTH": Authentication required.`).
//!
//! * protected mode (`-DENIED Redis is running in protected mode…`): Redis has no password and the client is not
//!   on its loopback interface. Redis writes the error the moment it accepts the connection and closes it, so
//!   the client usually sees only a reset or a broken pipe; [`diagnose`] then opens one plain connection of its
//!   own and reads what the server says first.
//! * `NOAUTH` (a password is required and none was given), `WRONGPASS` / `invalid password` (the one given is
//!   wrong);
//! * `MISCONF` (Redis refuses writes because it cannot persist to disk), `OOM` (used memory above `maxmemory`).
//!
//! Only the message changes: what kind of error it is (unavailable, retried) is decided by the caller.

use std::time::Duration;

use redis::{Client, ConnectionAddr};
use tokio::io::AsyncReadExt as _;

/// What the refusal in `error` (the text of a Redis error) means and how to fix it, about the server `server`
/// (its URL without credentials) when known; `None` when `error` is not one of the refusals.
pub(super) fn explain(server: Option<&str>, error: &str) -> Option<String> {
    let why = if error.contains("DENIED") && error.contains("protected mode") {
        "refused the connection: protected mode (it has no password and this client is not on its loopback \
         interface); give Redis a password (requirepass, or an ACL user) and put it in the --redis URL \
         (redis://:PASSWORD@HOST:PORT), or bind it to the addresses it should serve and set protected-mode no"
    } else if error.contains("NOAUTH") {
        "requires a password (NOAUTH) and none was given: put it in the --redis URL (redis://:PASSWORD@HOST:PORT, \
         or redis://USER:PASSWORD@HOST:PORT for an ACL user)"
    } else if error.contains("WRONGPASS")
        || error.contains("invalid password")
        || error.contains("AuthenticationFailed")
    {
        "refused the password (WRONGPASS: wrong user or password, or the user is disabled): check the user and \
         password in the --redis URL against requirepass or the ACL user"
    } else if error.contains("MISCONF") {
        "refuses writes (MISCONF): it cannot persist to disk (a failed RDB snapshot or AOF write: disk full, \
         permissions); fix the disk and see the Redis log, or change its save / appendonly settings"
    } else if error.contains("OOM") && error.contains("maxmemory") {
        "refuses writes (OOM): its used memory is above maxmemory; raise maxmemory or free memory (shorter \
         --finished-retention-ms, a smaller --event-log-max, drained dead letters), and keep maxmemory-policy \
         noeviction, since an evicted key is a lost job"
    } else {
        return None;
    };
    Some(match server {
        Some(server) => format!("redis at {server} {why}"),
        None => format!("redis {why}"),
    })
}

/// [`explain`] for an error met while connecting to (or pinging) `client`: when the error is only a dropped
/// connection, reads what a plain-TCP server says first on a fresh connection, which is how a protected-mode
/// refusal shows. `None` when the cause is not a refusal (the caller keeps the driver's message).
pub(super) async fn diagnose(client: &Client, server: &str, error: &str) -> Option<String> {
    if let Some(m) = explain(Some(server), error) {
        return Some(m);
    }
    let dropped = [
        "reset",
        "broken pipe",
        "closed",
        "Connection aborted",
        "EOF",
    ]
    .iter()
    .any(|s| error.to_ascii_lowercase().contains(&s.to_ascii_lowercase()));
    let ConnectionAddr::Tcp(host, port) = client.get_connection_info().addr() else {
        // TLS (the refusal is inside the session) or a unix socket (always local): nothing to read here.
        return None;
    };
    if !dropped {
        return None;
    }
    let first = first_words(host, *port).await?;
    explain(Some(server), &first)
}

/// The first bytes a server sends on a new connection before the client says anything, within a short bound:
/// Redis sends nothing unless it refuses the client.
async fn first_words(host: &str, port: u16) -> Option<String> {
    let read = async {
        let mut s = tokio::net::TcpStream::connect((host, port)).await.ok()?;
        let mut buf = vec![0u8; 512];
        let n = s.read(&mut buf).await.ok()?;
        Some(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    tokio::time::timeout(Duration::from_secs(1), read)
        .await
        .ok()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The replies exactly as Redis 7 sends them (and as the driver words the ones it rewrites).
    #[test]
    fn every_refusal_is_named_with_its_fix() {
        let cases = [
            (
                "DENIED Redis is running in protected mode because protected mode is enabled and no password is \
                 set for the default user. In this mode connections are only accepted from the loopback interface.",
                "protected mode",
                "requirepass",
            ),
            (
                "\"NOAUTH\": Authentication required.",
                "requires a password",
                "redis://:PASSWORD@",
            ),
            (
                "WRONGPASS invalid username-password pair or user is disabled.",
                "refused the password",
                "--redis URL",
            ),
            (
                "Password authentication failed - AuthenticationFailed",
                "refused the password",
                "--redis URL",
            ),
            (
                "ERR invalid password",
                "refused the password",
                "--redis URL",
            ),
            (
                "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist to disk. \
                 Commands that may modify the data set are disabled, because this instance is configured to report \
                 errors during writes if RDB snapshotting fails (stop-writes-on-bgsave-error option).",
                "cannot persist to disk",
                "save",
            ),
            (
                "MISCONF Errors writing to the AOF file: No space left on device",
                "cannot persist to disk",
                "disk",
            ),
            (
                "OOM command not allowed when used memory > 'maxmemory'.",
                "above maxmemory",
                "noeviction",
            ),
        ];
        for (error, cause, fix) in cases {
            let m =
                explain(Some("redis://10.0.0.1:6379"), error).unwrap_or_else(|| panic!("{error}"));
            assert!(m.starts_with("redis at redis://10.0.0.1:6379 "), "{m}");
            assert!(m.contains(cause) && m.contains(fix), "{error}: {m}");
        }
        for other in [
            "broken pipe",
            "Connection reset by peer (os error 104)",
            "ERR unknown command",
        ] {
            assert_eq!(explain(Some("redis://h:1"), other), None, "{other}");
        }
        let m = explain(
            None,
            "OOM command not allowed when used memory > 'maxmemory'.",
        )
        .unwrap();
        assert!(m.starts_with("redis refuses writes (OOM)"), "{m}");
    }
}
