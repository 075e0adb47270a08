//! The gateway tier scaling out behind `ferry balancer`: real `ferry gateway` and `ferry balancer` processes on
//! one real `redis-server`, 3,000 real WebSocket clients of 3,000 distinct subjects, all on loopback.
//!
//! 1. Three gateways: the balancer spreads the clients with max/mean connections ≤ 1.15.
//! 2. A fourth gateway joins: the others move clients to it (`goaway` reason `rebalance`, paced by
//!    `--rebalance-rate`) until max/mean over the four is ≤ 1.2, within 60 s, never faster than the budget, and
//!    the moves stop once it is reached.
//! 3. One of the first gateways is killed with SIGKILL: its clients are back on the others within 15 s.
//!
//! Every client follows one `app:` channel throughout, published to at a steady rate, and after each move or
//! loss it resubscribes with `since` (the last offset and epoch it saw): at the end each one has received every
//! message, in order, none twice.

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use ferry_testkit::{RedisServer, eventually};
use futures::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

use crate::support::{self, Proc, ferry, until_ready};

const SECRET: &str = "scale-out-test-secret-scale-out-test-secret";
const CLIENTS: usize = 3_000;
/// `--rebalance-rate`: reconnects per second for the whole cluster.
const RATE: usize = 200;
/// `--rebalance-cooldown-ms`: short, so the join can start moving clients soon after they connected.
const COOLDOWN_MS: u64 = 2_000;
const PUBLISH_EVERY: Duration = Duration::from_millis(200);

/// `ferry ARGS` listening on port 0, once it logged `announce`: the process and that line.
async fn spawn(args: &[&str], announce: &str) -> Result<(Proc, String)> {
    Proc::spawn_listening(
        ferry()
            .args(args)
            .env("FERRY_LOG", "warn,ferry_cli=info")
            .env_remove("FERRY_LOG_FORMAT")
            .env_remove("FERRY_CONFIG")
            .env_remove("FERRY_ADMIN_LISTEN")
            .stdin(Stdio::null())
            .stdout(Stdio::null()),
        announce,
    )
    .await
}

/// A `ferry gateway` on port 0, once it listens: the process and its address.
async fn spawn_gateway(redis: &str) -> Result<(Proc, String)> {
    let rate = RATE.to_string();
    let cooldown = COOLDOWN_MS.to_string();
    let args = [
        "gateway",
        "--redis",
        redis,
        "--listen",
        "127.0.0.1:0",
        "--jwt-secret",
        SECRET,
        "--heartbeat-ms",
        "250",
        "--membership-ttl-ms",
        "2000",
        "--rebalance-rate",
        &rate,
        "--rebalance-cooldown-ms",
        &cooldown,
        "--ws-close-spread-ms",
        "1000",
        // Every client comes from the balancer's address.
        "--max-unauthenticated-per-ip",
        "100000",
    ];
    let (proc, line) = spawn(&args, "gateway listening").await?;
    Ok((proc, support::announced(&line, "listen")?))
}

/// What one client saw over the whole run.
#[derive(Debug, Default)]
struct Seen {
    /// The `data.seq` of every message, in arrival order.
    seqs: Vec<u64>,
    /// `goaway` frames with reason `rebalance`.
    moved: usize,
    /// Resubscriptions with `since` answered `recovered: false`.
    not_recovered: usize,
    /// Messages without `offset` or `epoch`.
    unpositioned: usize,
    /// From losing a connection without a `goaway` to the next subscription's answer.
    longest_outage: Duration,
}

/// What every client shares with the test.
struct Shared {
    /// Messages received so far, by client.
    received: Vec<AtomicUsize>,
    /// Clients subscribed right now.
    subscribed: AtomicUsize,
    /// When each `goaway` with reason `rebalance` arrived.
    moves: Mutex<Vec<Instant>>,
}

/// One client: connect through the balancer, subscribe to `app:room` (with `since` once it has seen a message),
/// read until the connection ends, again until `stop`.
async fn client(i: usize, front: String, shared: Arc<Shared>, stop: CancellationToken) -> Seen {
    let token = support::token(
        SECRET,
        &format!("scale-{i}"),
        &["subscribe"],
        Duration::from_secs(600),
    );
    let url = format!("ws://{front}/v1/ws?token={token}");
    let mut seen = Seen::default();
    let mut last: Option<(String, String)> = None;
    let mut lost_at: Option<Instant> = None;
    let mut attempt = 0u64;
    while !stop.is_cancelled() {
        let ws = tokio::select! {
            r = tokio_tungstenite::connect_async(&url) => r.ok(),
            () = stop.cancelled() => break,
        };
        let Some((mut ws, _)) = ws else {
            // Full jitter over 50–800 ms, the same for no two clients.
            attempt += 1;
            let ms = 50 + (i as u64 * 7_919 + attempt * 104_729) % 750;
            tokio::time::sleep(Duration::from_millis(ms)).await;
            continue;
        };
        let mut sub = json!({"id": 1, "op": "subscribe", "channel": "app:room"});
        if let Some((offset, epoch)) = &last {
            sub["since"] = json!({"offset": offset, "epoch": epoch});
        }
        if ws.send(Message::text(sub.to_string())).await.is_err() {
            continue;
        }
        let mut subscribed = false;
        let mut told_to_go = false;
        loop {
            let m = tokio::select! {
                m = ws.next() => m,
                () = stop.cancelled() => break,
            };
            let text = match m {
                Some(Ok(Message::Text(t))) => t,
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => continue,
            };
            let v: Value = serde_json::from_str(text.as_str()).unwrap_or_default();
            if v["id"] == 1 && v["ok"] == true {
                subscribed = true;
                shared.subscribed.fetch_add(1, Ordering::SeqCst);
                if last.is_some() && v["recovered"] != true {
                    seen.not_recovered += 1;
                }
                if let Some(at) = lost_at.take() {
                    seen.longest_outage = seen.longest_outage.max(at.elapsed());
                }
            } else if v["event"] == "message" {
                seen.seqs
                    .push(v["data"]["seq"].as_u64().unwrap_or(u64::MAX));
                shared.received[i].fetch_add(1, Ordering::SeqCst);
                match (v["offset"].as_str(), v["epoch"].as_str()) {
                    (Some(o), Some(e)) => last = Some((o.to_owned(), e.to_owned())),
                    _ => seen.unpositioned += 1,
                }
            } else if v["type"] == "goaway" && v["reason"] == "rebalance" {
                told_to_go = true;
                seen.moved += 1;
                shared.moves.lock().unwrap().push(Instant::now());
            }
        }
        if subscribed {
            shared.subscribed.fetch_sub(1, Ordering::SeqCst);
        }
        if !told_to_go && lost_at.is_none() && !stop.is_cancelled() {
            lost_at = Some(Instant::now());
        }
    }
    seen
}

/// `ferry_ws_connections` of each gateway, from its own /metrics (a killed one counts 0).
async fn connections(http: &reqwest::Client, gateways: &[String]) -> Vec<f64> {
    let mut out = Vec::new();
    for g in gateways {
        let text = match http.get(format!("http://{g}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        out.push(support::sample(&text, "ferry_ws_connections").unwrap_or(0.0));
    }
    out
}

fn max_over_mean(loads: &[f64]) -> f64 {
    let total: f64 = loads.iter().sum();
    if total == 0.0 {
        return f64::INFINITY;
    }
    loads.iter().cloned().fold(0.0, f64::max) * loads.len() as f64 / total
}

/// Waits until no client has been moved for 2 s (at most `within`): how many were moved so far.
async fn quiescence(shared: &Shared, within: Duration) -> Result<usize> {
    let deadline = Instant::now() + within;
    loop {
        let (n, last) = {
            let m = shared.moves.lock().unwrap();
            (m.len(), m.last().copied())
        };
        if last.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
            return Ok(n);
        }
        ensure!(
            Instant::now() < deadline,
            "clients still moving after {within:?}: {n} moves"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The most `goaway`s within any one second.
fn peak_moves_per_second(moves: &[Instant]) -> usize {
    let mut sorted = moves.to_vec();
    sorted.sort();
    let mut peak = 0;
    let mut from = 0;
    for (to, t) in sorted.iter().enumerate() {
        while t.duration_since(sorted[from]) >= Duration::from_secs(1) {
            from += 1;
        }
        peak = peak.max(to - from + 1);
    }
    peak
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_thousand_clients_stay_balanced_as_gateways_join_and_die() -> Result<()> {
    let redis = RedisServer::start()?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let mut addrs: Vec<String> = Vec::new();
    let mut gateways: Vec<Proc> = Vec::new();
    for _ in 0..3 {
        let (proc, addr) = spawn_gateway(&redis.url()).await?;
        gateways.push(proc);
        addrs.push(addr);
    }
    for a in &addrs {
        until_ready(&http, &format!("http://{a}"), Duration::from_secs(30)).await?;
    }
    let (_balancer, line) = spawn(
        &[
            "balancer",
            "--redis",
            &redis.url(),
            "--listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ],
        "balancer listening",
    )
    .await?;
    let (front, admin) = (
        support::announced(&line, "addr")?,
        support::announced(&line, "admin")?,
    );
    until_ready(&http, &format!("http://{admin}"), Duration::from_secs(30)).await?;
    support::until_balancer_sees(&http, &admin, 3, Duration::from_secs(15)).await?;

    // 1. Three gateways, 3,000 clients.
    let shared = Arc::new(Shared {
        received: (0..CLIENTS).map(|_| AtomicUsize::new(0)).collect(),
        subscribed: AtomicUsize::new(0),
        moves: Mutex::new(Vec::new()),
    });
    let (stop_clients, stop_publisher) = (CancellationToken::new(), CancellationToken::new());
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        clients.push(tokio::spawn(client(
            i,
            front.clone(),
            shared.clone(),
            stop_clients.clone(),
        )));
        if i % 100 == 99 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    eventually(
        Duration::from_secs(60),
        "every client subscribed",
        || async { Ok((shared.subscribed.load(Ordering::SeqCst) == CLIENTS).then_some(())) },
    )
    .await?;
    // Clients that spilled while the totals were small may already be moving home (cooldown 2 s): a moved client
    // is subscribed on this side until it reads the close the gateway already counted, so the gateways' counts
    // are read until they agree with the clients'.
    let last_read = Mutex::new(Vec::new());
    let three = eventually(
        Duration::from_secs(15),
        "the gateways count every client",
        || async {
            let counts = connections(&http, &addrs[..3]).await;
            *last_read.lock().unwrap() = counts.clone();
            Ok((counts.iter().sum::<f64>() == CLIENTS as f64
                && shared.subscribed.load(Ordering::SeqCst) == CLIENTS)
                .then_some(counts))
        },
    )
    .await
    .with_context(|| format!("the gateways count {:?}", last_read.lock().unwrap()))?;
    eprintln!("three gateways: {three:?}");
    ensure!(
        max_over_mean(&three) <= 1.15,
        "max/mean {:.3} over {three:?}",
        max_over_mean(&three)
    );

    // Messages from here on; the publisher talks to the first gateway, which stays up.
    let publisher = tokio::spawn({
        let http = http.clone();
        let url = format!("http://{}/v1/channels/room/publish", addrs[0]);
        let token = support::token(SECRET, "publisher", &["publish"], Duration::from_secs(600));
        let stop = stop_publisher.clone();
        async move {
            let mut seq = 0u64;
            let mut tick = tokio::time::interval(PUBLISH_EVERY);
            while !stop.is_cancelled() {
                tick.tick().await;
                let r = http
                    .post(&url)
                    .bearer_auth(&token)
                    .json(&json!({"seq": seq}))
                    .send()
                    .await
                    .with_context(|| format!("publishing {seq}"))?;
                ensure!(r.status().is_success(), "publishing {seq}: {}", r.status());
                seq += 1;
            }
            anyhow::Ok(seq)
        }
    });
    // Clients placed on a node below their partition's owner while the totals were small (the bound is ⌈1.1 ×
    // mean⌉, so early arrivals spill) go home once older than the cooldown: a few, and then nothing moves.
    let quiet = quiescence(&shared, Duration::from_secs(30)).await?;
    eprintln!("{quiet} clients moved home before the join");
    ensure!(
        quiet <= CLIENTS / 20,
        "{quiet} moves among three balanced gateways"
    );
    shared.moves.lock().unwrap().clear();

    // 2. A fourth gateway joins.
    let joined = Instant::now();
    let (proc, addr) = spawn_gateway(&redis.url()).await?;
    gateways.push(proc);
    addrs.push(addr);
    let mut four = Vec::new();
    let mut balanced_after = None;
    while joined.elapsed() < Duration::from_secs(60) {
        four = connections(&http, &addrs).await;
        if four[3] > 0.0 && max_over_mean(&four) <= 1.2 {
            balanced_after = Some(joined.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let balanced_after = balanced_after
        .with_context(|| format!("max/mean over four not ≤ 1.2 in 60 s: {four:?}"))?;
    let moves_at_balance = shared.moves.lock().unwrap().len();
    eprintln!(
        "four gateways {four:?} (max/mean {:.3}) {balanced_after:?} after the join, {moves_at_balance} moves",
        max_over_mean(&four)
    );
    // Moves in flight when the bound was reached still land; then nothing moves.
    quiescence(&shared, Duration::from_secs(30)).await?;
    let moves = shared.moves.lock().unwrap().clone();
    let peak = peak_moves_per_second(&moves);
    eprintln!("{} moves in all, at most {peak} in one second", moves.len());
    // The budget, with room for one heartbeat's worth of rounding across four nodes.
    ensure!(
        peak <= RATE + RATE / 4,
        "{peak} moves in one second, budget {RATE}"
    );
    // A newcomer needs a quarter of the clients; churn beyond that is moves for nothing.
    ensure!(
        moves.len() <= CLIENTS / 4 + CLIENTS / 10,
        "{} moves for a newcomer's {} clients",
        moves.len(),
        CLIENTS / 4
    );

    // 3. SIGKILL of the second gateway: its clients come back through the balancer on the others.
    let victims = connections(&http, &addrs).await[1] as usize;
    let moves_before_kill = shared.moves.lock().unwrap().len();
    let killed = Instant::now();
    gateways[1].kill9();
    eventually(
        Duration::from_secs(5),
        "the killed gateway's clients noticed",
        || async { Ok((shared.subscribed.load(Ordering::SeqCst) < CLIENTS).then_some(())) },
    )
    .await?;
    eventually(
        Duration::from_secs(15).saturating_sub(killed.elapsed()),
        "every client back within 15 s of the kill",
        || async { Ok((shared.subscribed.load(Ordering::SeqCst) == CLIENTS).then_some(())) },
    )
    .await?;
    let back_after = killed.elapsed();
    let survivors: Vec<f64> = connections(&http, &addrs)
        .await
        .into_iter()
        .enumerate()
        .filter(|(k, _)| *k != 1)
        .map(|(_, c)| c)
        .collect();
    let moves_after_kill = shared.moves.lock().unwrap().len() - moves_before_kill;
    eprintln!(
        "{victims} clients of the killed gateway back in {back_after:?}: {survivors:?}, {moves_after_kill} moves \
         meanwhile"
    );
    // The survivors are within the bound once the dead node's clients are back: a surge of arrivals is no
    // reason to move anyone.
    ensure!(
        moves_after_kill <= victims / 4,
        "{moves_after_kill} moves after the kill"
    );

    // The end: the publisher stops, every client catches up to the last message, then all close.
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop_publisher.cancel();
    let published = publisher.await??;
    ensure!(published > 0, "nothing published");
    eventually(
        Duration::from_secs(30),
        "every client received every message",
        || async {
            Ok((shared
                .received
                .iter()
                .all(|r| r.load(Ordering::SeqCst) >= published as usize))
            .then_some(()))
        },
    )
    .await?;
    // A duplicate would arrive now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop_clients.cancel();
    let expected: Vec<u64> = (0..published).collect();
    let (mut lost, mut doubled, mut out_of_order, mut moved) = (0, 0, 0, 0);
    let (mut not_recovered, mut unpositioned) = (0, 0);
    let mut longest_outage = Duration::ZERO;
    for c in clients {
        let seen = c.await?;
        moved += seen.moved;
        not_recovered += seen.not_recovered;
        unpositioned += seen.unpositioned;
        longest_outage = longest_outage.max(seen.longest_outage);
        if seen.seqs != expected {
            let mut sorted = seen.seqs.clone();
            sorted.sort_unstable();
            out_of_order += usize::from(sorted != seen.seqs);
            sorted.dedup();
            doubled += seen.seqs.len() - sorted.len();
            lost += expected.len() - sorted.iter().filter(|s| **s < published).count();
        }
    }
    eprintln!(
        "{published} messages to {CLIENTS} clients: {lost} lost, {doubled} doubled, {out_of_order} clients out of \
         order; {moved} moves, {not_recovered} not recovered, longest outage after the kill {longest_outage:?}"
    );
    ensure!(lost == 0 && doubled == 0 && out_of_order == 0);
    ensure!(not_recovered == 0 && unpositioned == 0);
    ensure!(
        longest_outage <= Duration::from_secs(15),
        "a client was away {longest_outage:?}"
    );
    Ok(())
}
