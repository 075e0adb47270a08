//! The request head: read (bounded in size; the caller bounds it in time) and parsed with `httparse`, to learn
//! whether it asks for a WebSocket upgrade and which token it carries. The bytes are forwarded upstream exactly
//! as they arrived: nothing here rewrites a request.

use tokio::io::{AsyncRead, AsyncReadExt};

/// Longest request head read before an upstream is chosen: a request line and headers with a large token fit
/// easily (the gateway reads tokens up to a few KiB); anything longer is answered 431.
pub const MAX_HEAD_BYTES: usize = 32 * 1024;

/// Most header lines parsed.
const MAX_HEADERS: usize = 100;

/// What the balancer needs from a request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Bytes of the head (request line, headers and the blank line) at the start of the buffer; what follows
    /// was already read from the client and is forwarded after it.
    pub len: usize,
    /// `Upgrade: websocket`.
    pub websocket: bool,
    /// The token of `Authorization: Bearer <token>`, else of the `token` query parameter.
    pub token: Option<String>,
}

/// Why no head could be read.
#[derive(Debug, thiserror::Error)]
pub enum HeadError {
    /// The client closed (or reset) the connection before a complete head: nothing to answer.
    #[error("the client closed the connection before a complete request head")]
    Closed,
    #[error("the request head is over {MAX_HEAD_BYTES} bytes")]
    TooLarge,
    #[error("malformed request head: {0}")]
    Malformed(String),
}

/// Read from `io` into `buf` until it holds a complete head; `buf` keeps every byte read (the head and any bytes
/// after it).
pub async fn read_head<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut Vec<u8>,
) -> Result<Head, HeadError> {
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(head) = parse(buf)? {
            return Ok(head);
        }
        if buf.len() >= MAX_HEAD_BYTES {
            return Err(HeadError::TooLarge);
        }
        let want = chunk.len().min(MAX_HEAD_BYTES - buf.len());
        let n = io
            .read(&mut chunk[..want])
            .await
            .map_err(|_| HeadError::Closed)?;
        if n == 0 {
            return Err(HeadError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Parse the head at the start of `buf`: `None` while it is incomplete.
pub fn parse(buf: &[u8]) -> Result<Option<Head>, HeadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => return Err(HeadError::Malformed(e.to_string())),
    };
    let header = |name: &str| {
        req.headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
            .and_then(|h| std::str::from_utf8(h.value).ok())
    };
    let websocket = header("upgrade").is_some_and(|v| {
        v.split(',')
            .any(|p| p.trim().eq_ignore_ascii_case("websocket"))
    });
    let token = header("authorization")
        .and_then(bearer)
        .or_else(|| query_token(req.path.unwrap_or("")));
    Ok(Some(Head {
        len,
        websocket,
        token,
    }))
}

fn bearer(value: &str) -> Option<String> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then(|| token.to_owned())
}

fn query_token(target: &str) -> Option<String> {
    let (_, query) = target.split_once('?')?;
    let query = query.split('#').next().unwrap_or("");
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "token" && !v.is_empty()).then(|| percent_decode(v))
    })
}

/// JWTs are base64url and dots, so a token needs no decoding unless a client escaped it anyway.
fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%'
            && let Some(x) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(x);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_are_parsed_when_complete() {
        let raw = b"GET /v1/ws?x=1&token=a.b%2Ec HTTP/1.1\r\nHost: h\r\nUpgrade: WebSocket\r\n\
                    Connection: Upgrade\r\n\r\nextra";
        assert!(parse(&raw[..20]).unwrap().is_none());
        let head = parse(raw).unwrap().unwrap();
        assert_eq!(head.len, raw.len() - "extra".len());
        assert!(head.websocket);
        assert_eq!(head.token.as_deref(), Some("a.b.c"));
        let bearer = b"GET /v1/jobs?token=q HTTP/1.1\r\nauthorization: bearer  t.u.v \r\n\r\n";
        let head = parse(bearer).unwrap().unwrap();
        assert!(!head.websocket);
        assert_eq!(head.token.as_deref(), Some("t.u.v"), "the header wins");
        let none = parse(b"GET / HTTP/1.1\r\nAuthorization: Basic x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(none.token, None);
        assert!(matches!(
            parse(b"\x16\x03\x01garbage\r\n\r\n"),
            Err(HeadError::Malformed(_))
        ));
    }
}
