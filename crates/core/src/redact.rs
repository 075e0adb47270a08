//! One rule for the credentials of connection strings (Redis and PostgreSQL URLs, the JWKS URL, libpq
//! `key=value` strings), wherever ferry shows them: in a URL printed back ([`redact_url`]) and in any message
//! that may quote them, such as a driver's error ([`Redactor`]). A hidden secret is always [`REDACTED`].
//!
//! The rule:
//! * The password of `scheme://user:password@host…` is replaced; the user stays, since it tells which account
//!   was used and is no secret by itself (`redis://:pw@h` → `redis://:<redacted>@h`).
//! * A user without a password (`scheme://name@host`) is replaced whole: ferry cannot tell a name from a token,
//!   and a token there is a real convention (`https://TOKEN@host`, which HTTP clients send as basic auth).
//! * The userinfo is everything after `://` up to the last `@` before the first `?` or `#`, so a raw `@` or `/`
//!   inside a password is still hidden. (A path holding an `@` is then hidden too: more than needed, never less.)
//!   A raw `?` or `#` in a password is not supported: no driver reads one either, it must be percent-encoded.
//! * In a `key=value` connection string, the value of every `password` key is replaced, quotes included.
//! * In a message, the password is replaced wherever it appears, as written and as decoded (percent-decoded in a
//!   URL, unquoted in a `key=value` string), since drivers quote either; a URL quoted whole is shown redacted.
//!   A lone user is not searched for in messages by itself: a role name such as `ferry` would blank out every
//!   word that spells it, and the drivers never send it as a secret.

use std::fmt;
use std::ops::Range;

/// What stands in for a hidden secret, everywhere ferry shows one.
pub const REDACTED: &str = "<redacted>";

/// `url` with its credentials replaced by [`REDACTED`] (see the module's rule). Anything that is not a URL or a
/// `key=value` connection string with a password comes back unchanged.
pub fn redact_url(url: &str) -> String {
    let spans = secret_spans(url);
    let mut out = String::with_capacity(url.len());
    let mut at = 0;
    for span in spans {
        out.push_str(&url[at..span.start]);
        out.push_str(REDACTED);
        at = span.end;
    }
    out.push_str(&url[at..]);
    out
}

/// Scrubs secrets out of messages: the credentials of the connection strings it was given (see the module's
/// rule), and any other secret given by [`secret`](Self::secret), such as the password a driver parsed.
#[derive(Clone, Default)]
pub struct Redactor {
    /// (text to find, what replaces it), longest first so that a secret inside a longer one never leaves the rest
    /// of the longer one behind.
    rules: Vec<(String, String)>,
}

impl fmt::Debug for Redactor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The rules are the secrets themselves.
        f.debug_struct("Redactor")
            .field("rules", &self.rules.len())
            .finish()
    }
}

impl Redactor {
    pub fn new() -> Self {
        Self::default()
    }

    /// A redactor for the credentials of one connection string.
    pub fn for_url(url: &str) -> Self {
        Self::new().url(url)
    }

    /// Also scrub the credentials of `url`: the URL quoted whole becomes [`redact_url`]'s form, and its password,
    /// as written and decoded, becomes [`REDACTED`].
    pub fn url(mut self, url: &str) -> Self {
        let shown = redact_url(url);
        if shown != url {
            self.rule(url, &shown);
        }
        for secret in secrets(url) {
            self.rule(&secret, REDACTED);
        }
        self
    }

    /// Also scrub `secret` (nothing when it is empty).
    pub fn secret(mut self, secret: &str) -> Self {
        self.rule(secret, REDACTED);
        self
    }

    fn rule(&mut self, find: &str, replace: &str) {
        if find.is_empty() || self.rules.iter().any(|(f, _)| f == find) {
            return;
        }
        self.rules.push((find.to_owned(), replace.to_owned()));
        self.rules.sort_by_key(|r| std::cmp::Reverse(r.0.len()));
    }

    /// `text` with every secret replaced. One pass from left to right: a replacement is never searched again, so a
    /// password that happens to occur inside the marker (or inside a redacted URL) cannot mangle it.
    pub fn apply(&self, text: &str) -> String {
        if !self.rules.iter().any(|(f, _)| text.contains(f.as_str())) {
            return text.to_owned();
        }
        let mut out = String::with_capacity(text.len());
        let mut rest = text;
        'scan: while let Some(c) = rest.chars().next() {
            for (find, replace) in &self.rules {
                if let Some(after) = rest.strip_prefix(find.as_str()) {
                    out.push_str(replace);
                    rest = after;
                    continue 'scan;
                }
            }
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
        out
    }
}

/// Where the authority of `s` starts, when `s` is a URL: a scheme and `://` (after any blank space, which a
/// value read from a file may keep and a driver may trim).
fn url_start(s: &str) -> Option<usize> {
    let i = s.find("://")?;
    let scheme = s[..i].trim_start();
    let valid = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
    valid.then_some(i + 3)
}

/// Byte ranges of `s` to hide, in order and apart.
fn secret_spans(s: &str) -> Vec<Range<usize>> {
    match url_start(s) {
        Some(start) => url_span(s, start).into_iter().collect(),
        None if s.contains('=') => keyword_spans(s).into_iter().map(|(span, _)| span).collect(),
        None => Vec::new(),
    }
}

/// The secret of a URL whose authority starts at `start`: the password, or a lone user.
fn url_span(url: &str, start: usize) -> Option<Range<usize>> {
    let rest = &url[start..];
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    let at = rest[..end].rfind('@')?;
    let info = &rest[..at];
    match info.find(':') {
        // An empty password hides nothing.
        Some(colon) if colon + 1 < at => Some(start + colon + 1..start + at),
        Some(_) => None,
        None if info.is_empty() => None,
        None => Some(start..start + at),
    }
}

/// The secrets of `s` to look for in messages: each password as written and as decoded.
fn secrets(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    match url_start(s) {
        Some(start) => {
            // A password's span starts after its user and `:`; a lone user's at the authority, and it is only
            // hidden where the URL is shown (see the module's rule).
            if let Some(span) = url_span(s, start).filter(|span| span.start > start) {
                out.push(s[span.clone()].to_owned());
                out.push(percent_decode(&s[span]));
            }
        }
        None => {
            for (span, value) in keyword_spans(s) {
                out.push(s[span].to_owned());
                out.push(value);
            }
        }
    }
    out
}

/// `%XX` sequences decoded (anything else, including a malformed `%`, as is); invalid UTF-8 is replaced, as a
/// driver printing the value would.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| char::from(c).to_digit(16);
        if b[i] == b'%'
            && let (Some(h), Some(l)) = (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            )
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The `password` values of a libpq `key=value` string: where each is written (quotes included) and its value
/// (unquoted, `\` escapes resolved). Parsing stops at the first word that is not `key=value`, as libpq would
/// refuse the string there.
fn keyword_spans(s: &str) -> Vec<(Range<usize>, String)> {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let skip_ws = |mut i: usize| {
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        i
    };
    loop {
        i = skip_ws(i);
        if i >= b.len() {
            break;
        }
        let key_start = i;
        while i < b.len() && !b[i].is_ascii_whitespace() && b[i] != b'=' {
            i += 1;
        }
        let key = &s[key_start..i];
        i = skip_ws(i);
        if b.get(i) != Some(&b'=') {
            break;
        }
        i = skip_ws(i + 1);
        let value_start = i;
        let mut value = Vec::new();
        let quoted = b.get(i) == Some(&b'\'');
        if quoted {
            i += 1;
        }
        while i < b.len() {
            let c = b[i];
            if (quoted && c == b'\'') || (!quoted && c.is_ascii_whitespace()) {
                break;
            }
            if c == b'\\' && i + 1 < b.len() {
                i += 1;
            }
            value.push(b[i]);
            i += 1;
        }
        if quoted && i < b.len() {
            i += 1;
        }
        if key == "password" && i > value_start {
            out.push((value_start..i, String::from_utf8_lossy(&value).into_owned()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_is_hidden_and_the_user_kept() {
        assert_eq!(
            redact_url("redis://user:s3cret@h:6379/0"),
            "redis://user:<redacted>@h:6379/0"
        );
        assert_eq!(
            redact_url("redis://:s3cret@h:6379"),
            "redis://:<redacted>@h:6379"
        );
        assert_eq!(
            redact_url("postgres://ferry:pw@db/ferry"),
            "postgres://ferry:<redacted>@db/ferry"
        );
        assert_eq!(
            redact_url("rediss://default:tok:en@cache.example:6380"),
            "rediss://default:<redacted>@cache.example:6380"
        );
        assert_eq!(redact_url(" redis://:pw@h:1 "), " redis://:<redacted>@h:1 ");
    }

    #[test]
    fn a_lone_user_is_hidden_whole() {
        assert_eq!(
            redact_url("https://ghp_abc123@keys.example/jwks.json"),
            "https://<redacted>@keys.example/jwks.json"
        );
        assert_eq!(
            redact_url("postgres://ferry@db/ferry"),
            "postgres://<redacted>@db/ferry"
        );
        // Nothing to hide: an empty user or an empty password.
        assert_eq!(redact_url("redis://@h:1"), "redis://@h:1");
        assert_eq!(redact_url("redis://u:@h:1"), "redis://u:@h:1");
    }

    #[test]
    fn no_userinfo_is_left_alone() {
        for url in [
            "redis://127.0.0.1:6379",
            "rediss://cache.example:6380/2",
            "postgres://db/ferry?sslmode=require",
            "https://keys.example/.well-known/jwks.json",
            "redis://[::1]:6379",
            "a:b@c",
            "not a url",
            "",
        ] {
            assert_eq!(redact_url(url), url);
        }
    }

    #[test]
    fn percent_encoded_passwords_are_scrubbed_in_both_forms() {
        let url = "postgres://u:p%40ss%2Fw%3Ard@db/ferry";
        assert_eq!(redact_url(url), "postgres://u:<redacted>@db/ferry");
        let r = Redactor::for_url(url);
        assert_eq!(
            r.apply("auth failed (password p@ss/w:rd) and p%40ss%2Fw%3Ard"),
            "auth failed (password <redacted>) and <redacted>"
        );
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
    }

    #[test]
    fn an_at_sign_inside_the_password_is_hidden() {
        let url = "redis://u:p@ss@h:6379/0";
        assert_eq!(redact_url(url), "redis://u:<redacted>@h:6379/0");
        assert_eq!(Redactor::for_url(url).apply("bad p@ss"), "bad <redacted>");
        // A raw `/` too (not a valid URL: hidden all the same).
        assert_eq!(redact_url("redis://:ab/cd@h:1"), "redis://:<redacted>@h:1");
    }

    #[test]
    fn ipv6_hosts_keep_their_colons() {
        assert_eq!(
            redact_url("redis://u:pw@[::1]:6379/0"),
            "redis://u:<redacted>@[::1]:6379/0"
        );
        assert_eq!(
            redact_url("postgres://:pw@[2001:db8::5]:5432/ferry"),
            "postgres://:<redacted>@[2001:db8::5]:5432/ferry"
        );
    }

    #[test]
    fn query_strings_do_not_count_as_userinfo() {
        assert_eq!(
            redact_url("postgres://u:pw@db/ferry?sslmode=require&application_name=a@b"),
            "postgres://u:<redacted>@db/ferry?sslmode=require&application_name=a@b"
        );
        assert_eq!(
            redact_url("postgres://db/ferry?options=x@y"),
            "postgres://db/ferry?options=x@y"
        );
        assert_eq!(
            redact_url("https://keys.example/jwks#a@b"),
            "https://keys.example/jwks#a@b"
        );
    }

    #[test]
    fn keyword_strings_hide_the_password() {
        assert_eq!(
            redact_url("host=db user=ferry password=s3cret dbname=ferry"),
            "host=db user=ferry password=<redacted> dbname=ferry"
        );
        assert_eq!(
            redact_url("host=db password = 'my \\'pass' sslmode=require"),
            "host=db password = <redacted> sslmode=require"
        );
        let r = Redactor::for_url("host=db password='my \\'pass'");
        assert_eq!(r.apply("x my 'pass y"), "x <redacted> y");
        assert_eq!(redact_url("host=db user=ferry"), "host=db user=ferry");
    }

    #[test]
    fn messages_are_scrubbed() {
        let url = "rediss://u:hunter2@cache.example:6380";
        let r = Redactor::for_url(url);
        assert_eq!(
            r.apply(&format!("cannot reach {url}: hunter2 refused")),
            "cannot reach rediss://u:<redacted>@cache.example:6380: <redacted> refused"
        );
        // A lone user: the URL quoted whole is redacted, the name elsewhere is not.
        let r = Redactor::for_url("postgres://ferry@db/ferry");
        assert_eq!(
            r.apply("postgres://ferry@db/ferry: role \"ferry\" does not exist"),
            "postgres://<redacted>@db/ferry: role \"ferry\" does not exist"
        );
        // Extra secrets, and nothing to do.
        let r = Redactor::new().secret("pw").secret("");
        assert_eq!(r.apply("a pw b"), "a <redacted> b");
        assert_eq!(Redactor::new().apply("plain"), "plain");
        assert!(!format!("{:?}", Redactor::for_url(url)).contains("hunter2"));
    }

    #[test]
    fn a_replacement_is_not_scrubbed_again() {
        // The password occurs inside the marker and inside the redacted URL.
        let r = Redactor::for_url("redis://u:red@h:1");
        assert_eq!(
            r.apply("redis://u:red@h:1 said red"),
            "redis://u:<redacted>@h:1 said <redacted>"
        );
    }
}
