//! Paced single submits for the latency phases of `submit`: an open-loop HTTP/1.1 client on bare keep-alive
//! connections.
//!
//! Each of `conns` connections sends its share of the rate on a fixed schedule, one request at a time, and a
//! request's latency runs from when it was due (when its connection was still busy with the previous one) or
//! else from when it was sent, to the end of its answer: a server that stalls is charged for every request it
//! held up, not only for those already sent (no coordinated omission), and the client's 1 ms timer is not.
//!
//! Written on a `TcpStream` rather than reqwest with a task per request because on this two-core machine the
//! client shares the cores with the system it measures: every microsecond it spends per request is taken from
//! the server at the rates the phases run.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::api::{Tally, lock};
use crate::stats::Latency;

/// One paced run: `rate` POSTs of `body` per second to `path` on `addr` for `secs` seconds (the first tenth, at
/// most a second, not counted), over `conns` connections, connection `c` carrying `tokens[c % len]`.
/// Returns the latencies, the tally, the requests sent and the seconds the sending took.
pub(crate) async fn run(
    addr: &str,
    path: &str,
    tokens: &[String],
    body: &'static str,
    rate: u64,
    secs: u64,
    conns: usize,
) -> anyhow::Result<(Latency, Arc<Tally>, u64, f64)> {
    if rate == 0 || tokens.is_empty() {
        bail!("a paced phase needs a rate above 0 and a token");
    }
    let total = rate * secs;
    let warm = (total / 10).min(rate);
    let conns = conns.clamp(1, total.max(1) as usize);
    let tally = Arc::new(Tally::default());
    let samples = Arc::new(std::sync::Mutex::new(Vec::with_capacity(total as usize)));
    let start = Instant::now() + Duration::from_millis(50);
    let hard_stop = start + Duration::from_secs(secs * 3 + 10);
    let mut tasks = tokio::task::JoinSet::new();
    for c in 0..conns {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            tokens[c % tokens.len()],
            body.len()
        );
        let (addr, tally, samples) = (addr.to_owned(), tally.clone(), samples.clone());
        tasks.spawn(async move {
            let mut conn: Option<TcpStream> = None;
            let mut buf = Vec::with_capacity(1024);
            let mut mine = Vec::new();
            let mut sent = 0u64;
            // Request i = k * conns + c is due at start + i / rate.
            let mut i = c as u64;
            while i < total && Instant::now() < hard_stop {
                let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
                let now = Instant::now();
                let from = if now < due {
                    tokio::time::sleep_until(due).await;
                    Instant::now()
                } else {
                    due
                };
                sent += 1;
                match exchange(&mut conn, &addr, request.as_bytes(), &mut buf).await {
                    Ok(202) => {
                        tally.accepted.fetch_add(1, Ordering::Relaxed);
                        if i >= warm {
                            mine.push(from.elapsed());
                        }
                    }
                    Ok(429) => {
                        tally.rate_limited.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(status) => tally.error(format!("HTTP {status}")),
                    Err(e) => {
                        conn = None;
                        tally.error(format!("{e:#}"));
                    }
                }
                i += conns as u64;
            }
            lock(&samples).extend(mine);
            sent
        });
    }
    let mut sent = 0;
    while let Some(n) = tasks.join_next().await {
        sent += n.context("a paced connection task")?;
    }
    let send_secs = start.elapsed().as_secs_f64();
    let samples = std::mem::take(&mut *lock(&samples));
    Ok((Latency::from_samples(samples), tally, sent, send_secs))
}

/// Send `request` on `conn` (connecting first when there is none) and read the whole answer; its status.
async fn exchange(
    conn: &mut Option<TcpStream>,
    addr: &str,
    request: &[u8],
    buf: &mut Vec<u8>,
) -> anyhow::Result<u16> {
    if conn.is_none() {
        let s = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connecting to {addr}"))?;
        s.set_nodelay(true)?;
        *conn = Some(s);
    }
    let s = conn.as_mut().expect("connected above");
    s.write_all(request).await.context("sending")?;
    buf.clear();
    // The head, then as much body as it announces.
    let head_end = loop {
        if let Some(at) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        read_more(s, buf).await?;
    };
    let head = std::str::from_utf8(&buf[..head_end]).context("an answer head that is not UTF-8")?;
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    let mut length = None;
    let mut close = false;
    for line in head.split("\r\n").skip(1) {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.parse::<usize>().context("content-length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("a {value} answer: this client reads content-length bodies only");
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            close = true;
        }
    }
    let length = length.with_context(|| format!("no content-length in {head:?}"))?;
    while buf.len() < head_end + length {
        read_more(s, buf).await?;
    }
    if close {
        *conn = None;
    }
    Ok(status)
}

async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = s.read(&mut chunk).await.context("reading the answer")?;
    if n == 0 {
        bail!("the server closed the connection");
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

/// The cumulative buckets (`le` in seconds, count) of ferry's `ferry_http_request_duration_seconds` for
/// `POST <route>` in a `/metrics` text.
pub(crate) fn post_buckets(metrics: &str, route: &str) -> Vec<(f64, u64)> {
    let want = format!("method=\"POST\",route=\"{route}\"");
    let mut out: Vec<(f64, u64)> = metrics
        .lines()
        .filter(|l| {
            l.starts_with("ferry_http_request_duration_seconds_bucket{") && l.contains(&want)
        })
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The server's own view of a phase from its histogram before and after: requests, how many took longer than
/// each bucket bound, and the bound under which 99 % finished.
pub(crate) fn server_view(before: &[(f64, u64)], after: &[(f64, u64)]) -> serde_json::Value {
    let delta: Vec<(f64, u64)> = after
        .iter()
        .map(|&(le, n)| {
            let was = before.iter().find(|b| b.0 == le).map_or(0, |b| b.1);
            (le, n.saturating_sub(was))
        })
        .collect();
    let total = delta.last().map_or(0, |d| d.1);
    let over: serde_json::Map<String, serde_json::Value> = delta
        .iter()
        .filter(|d| d.0.is_finite() && d.0 >= 0.0025 && d.0 <= 0.1)
        .map(|&(le, n)| (format!("over_{}ms", le * 1000.0), (total - n).into()))
        .collect();
    let p99_under_ms = delta
        .iter()
        .find(|d| d.1 as f64 >= total as f64 * 0.99)
        .map(|d| d.0 * 1000.0)
        .filter(|v| v.is_finite());
    serde_json::json!({ "requests": total, "p99_at_most_ms": p99_under_ms, "requests_over": over })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// A server that reads one request per answer and sends the answers in turn, on one connection each time
    /// the previous answer said `Connection: close`.
    async fn server(answers: Vec<&'static str>) -> String {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut answers = answers.into_iter();
            'conns: loop {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                loop {
                    let n = s.read(&mut buf).await.unwrap();
                    if n == 0 {
                        continue 'conns;
                    }
                    let Some(a) = answers.next() else { return };
                    s.write_all(a.as_bytes()).await.unwrap();
                    if a.contains("Connection: close") {
                        continue 'conns;
                    }
                }
            }
        });
        addr
    }

    #[tokio::test]
    async fn answers_are_read_whole_and_closed_connections_are_made_again() {
        let addr = server(vec![
            "HTTP/1.1 202 Accepted\r\ncontent-length: 11\r\n\r\n{\"id\":\"a\"}\n",
            "HTTP/1.1 429 Too Many Requests\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            "HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        ])
        .await;
        let mut conn = None;
        let mut buf = Vec::new();
        let req = b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            exchange(&mut conn, &addr, req, &mut buf).await.unwrap(),
            202
        );
        assert_eq!(
            exchange(&mut conn, &addr, req, &mut buf).await.unwrap(),
            429
        );
        assert!(
            conn.is_none(),
            "a `Connection: close` answer drops the connection"
        );
        assert_eq!(
            exchange(&mut conn, &addr, req, &mut buf).await.unwrap(),
            202
        );
        let e = exchange(&mut conn, &addr, req, &mut buf).await.unwrap_err();
        assert!(format!("{e:#}").contains("chunked"), "{e:#}");
    }

    #[tokio::test]
    async fn a_paced_run_sends_the_rate_over_its_connections() {
        let answer = "HTTP/1.1 202 Accepted\r\nContent-Length: 2\r\n\r\n{}";
        let addr = server(vec![answer; 200]).await;
        // One connection: the server above serves one at a time.
        let (lat, tally, sent, _) = run(&addr, "/", &["t".into()], "{}", 100, 2, 1)
            .await
            .unwrap();
        assert_eq!(sent, 200);
        assert_eq!(tally.accepted.load(Ordering::Relaxed), 200);
        // The first tenth is not measured.
        assert_eq!(lat.samples, 180);
    }

    #[test]
    fn the_servers_view_comes_from_its_histogram() {
        let text = |n: [u64; 4]| {
            format!(
                "ferry_http_request_duration_seconds_bucket{{method=\"POST\",route=\"/r\",le=\"0.005\"}} {}\n\
                 ferry_http_request_duration_seconds_bucket{{method=\"POST\",route=\"/r\",le=\"0.01\"}} {}\n\
                 ferry_http_request_duration_seconds_bucket{{method=\"POST\",route=\"/r\",le=\"0.025\"}} {}\n\
                 ferry_http_request_duration_seconds_bucket{{method=\"POST\",route=\"/r\",le=\"+Inf\"}} {}\n\
                 ferry_http_request_duration_seconds_bucket{{method=\"GET\",route=\"/r\",le=\"+Inf\"}} 9\n",
                n[0], n[1], n[2], n[3]
            )
        };
        let before = post_buckets(&text([10, 10, 10, 10]), "/r");
        let after = post_buckets(&text([990, 1005, 1010, 1010]), "/r");
        assert_eq!(after.len(), 4);
        let v = server_view(&before, &after);
        assert_eq!(v["requests"], 1000);
        assert_eq!(v["requests_over"]["over_5ms"], 20);
        assert_eq!(v["requests_over"]["over_10ms"], 5);
        assert_eq!(v["p99_at_most_ms"], 10.0);
    }
}
