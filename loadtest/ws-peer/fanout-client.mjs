// An independent fan-out client (Node, `ws`): N sockets of N distinct subjects on one app: channel, one
// publisher posting M messages/s over HTTP, publish → delivery latency per delivery. It measures ferry and the
// Node peer (server.mjs) the same way, from outside ferry's own Rust load generator.
//
//   node fanout-client.mjs --ws ws://127.0.0.1:8080/v1/ws --http http://127.0.0.1:8080 \
//       [--secret S] [--sockets 2000] [--rate 25] [--secs 20] [--warmup 3]
//
// With --secret, each socket gets an HS256 token of its own subject (`fanout-<n>`, scope `subscribe`) in the
// `token` query parameter, and the publisher one with scope `publish`; without it (the Node peer) no token.
// Prints one JSON line: deliveries, expected, lost, deliveries/s, p50/p90/p99/max in ms, client CPU seconds, and
// per message the latency of its first and of its last delivery (first_p50/last_p50: medians over messages). The
// first delivery shows the server's own delay from publish to first write; the spread to the last one is mostly
// this client's, which reads every delivery in one event loop.
import crypto from 'node:crypto';
import { performance } from 'node:perf_hooks';
import WebSocket from 'ws';

const args = Object.fromEntries(
  process.argv.slice(2).reduce((acc, a, i, all) => (a.startsWith('--') ? [...acc, [a.slice(2), all[i + 1]]] : acc), []),
);
const wsUrl = args.ws ?? 'ws://127.0.0.1:8080/v1/ws';
const httpUrl = args.http ?? 'http://127.0.0.1:8080';
const secret = args.secret;
const sockets = Number(args.sockets ?? 2000);
const rate = Number(args.rate ?? 25);
const secs = Number(args.secs ?? 20);
const warmup = Number(args.warmup ?? 3);

const b64 = (x) => Buffer.from(typeof x === 'string' ? x : JSON.stringify(x)).toString('base64url');
function token(sub, scope) {
  const now = Math.floor(Date.now() / 1000);
  const head = b64({ alg: 'HS256', typ: 'JWT' });
  const body = b64({ sub, scope, iat: now, exp: now + 3600 });
  const sig = crypto.createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

// Wall-clock milliseconds with sub-millisecond precision, one clock for sender and receivers (one process).
const nowMs = () => performance.timeOrigin + performance.now();

const latencies = [];
// Per measured message: its earliest and latest delivery latency.
const first = new Map();
const last = new Map();
let measuring = false;
let received = 0;

function open(i) {
  return new Promise((resolve, reject) => {
    const url = secret ? `${wsUrl}?token=${token(`fanout-${i}`, 'subscribe')}` : wsUrl;
    const ws = new WebSocket(url, { perMessageDeflate: false });
    ws.on('error', reject);
    ws.on('open', () => ws.send(JSON.stringify({ id: 1, op: 'subscribe', channel: 'app:bench' })));
    ws.on('message', (raw) => {
      const at = nowMs();
      const msg = JSON.parse(raw.toString());
      if (msg.id === 1 && msg.ok) return resolve(ws);
      if (msg.event === 'message' && msg.data && typeof msg.data.t === 'number') {
        if (msg.data.w === 0) {
          const l = at - msg.data.t;
          received += 1;
          latencies.push(l);
          if (!(first.get(msg.data.s) <= l)) first.set(msg.data.s, l);
          if (!(last.get(msg.data.s) >= l)) last.set(msg.data.s, l);
        }
      }
    });
  });
}

const conns = [];
for (let i = 0; i < sockets; i += 100) {
  const batch = [];
  for (let k = i; k < Math.min(sockets, i + 100); k += 1) batch.push(open(k));
  conns.push(...(await Promise.all(batch)));
}

const publishToken = secret ? token('fanout-publisher', 'publish') : null;
const headers = { 'content-type': 'application/json' };
if (publishToken) headers.authorization = `Bearer ${publishToken}`;
let sent = 0;
let failed = 0;
const cpuStart = process.cpuUsage();
const start = nowMs();
const total = Math.round(rate * secs);
for (let n = 0; n < total; n += 1) {
  const due = start + (n * 1000) / rate;
  const wait = due - nowMs();
  if (wait > 0) await new Promise((r) => setTimeout(r, wait));
  const w = n < rate * warmup ? 1 : 0;
  if (!w) sent += 1;
  measuring = true;
  fetch(`${httpUrl}/v1/channels/bench/publish`, {
    method: 'POST',
    headers,
    body: JSON.stringify({ t: nowMs(), w, s: n }),
  })
    .then((r) => {
      if (r.status !== 202 && r.status !== 200) failed += 1;
      return r.arrayBuffer();
    })
    .catch(() => {
      failed += 1;
    });
}
const expected = sent * sockets;
const deadline = nowMs() + 5000;
while (received < expected && nowMs() < deadline) await new Promise((r) => setTimeout(r, 50));
const elapsed = (nowMs() - start - warmup * 1000) / 1000;
const cpu = process.cpuUsage(cpuStart);
latencies.sort((a, b) => a - b);
const q = (p) => (latencies.length ? latencies[Math.min(latencies.length - 1, Math.floor(p * latencies.length))] : null);
const r2 = (x) => (x === null ? null : Math.round(x * 10) / 10);
const median = (m) => {
  const v = [...m.values()].sort((a, b) => a - b);
  return v.length ? v[v.length >> 1] : null;
};
console.log(
  JSON.stringify({
    sockets,
    rate,
    secs,
    deliveries: received,
    expected,
    lost: expected - received,
    publish_errors: failed,
    deliveries_per_sec: Math.round(received / elapsed),
    p50_ms: r2(q(0.5)),
    p90_ms: r2(q(0.9)),
    p99_ms: r2(q(0.99)),
    max_ms: r2(latencies[latencies.length - 1] ?? null),
    first_p50_ms: r2(median(first)),
    last_p50_ms: r2(median(last)),
    client_cpu_s: Math.round(((cpu.user + cpu.system) / 1e6) * 10) / 10,
  }),
);
for (const ws of conns) ws.terminate();
process.exit(0);
