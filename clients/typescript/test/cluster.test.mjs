// A real cluster: redis-server (REDIS_URL, started by crates/cli/tests/cli/ts_client.rs), two `ferry gateway`, a
// `ferry worker`. The client's gateway is restarted (SIGTERM: goaway, 1001) while messages and job events keep
// flowing through the other one: after the reconnect the client recovers with `since` and misses nothing. And a
// gateway's per-subject connection limit: the session refused with 1013 backs off, then gets in.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { FerryClient } from "../dist/index.js";
import { Proc, token, ALL, eventually, sleep, waitReady, WebSocket } from "./support.mjs";

const redis = process.env.REDIS_URL;
const procs = [];
const clients = [];
after(() => {
  for (const c of clients) c.close();
  for (const p of procs) p.kill();
});

async function gateway(listen = "127.0.0.1:0", extra = []) {
  const p = new Proc([
    "gateway", "--redis", redis, "--listen", listen,
    "--drain-delay-ms", "0", "--ws-close-spread-ms", "300", "--shutdown-deadline-ms", "5000", ...extra,
  ]);
  procs.push(p);
  await p.listening();
  p.url = `http://${p.addr}`;
  await waitReady(p.url);
  return p;
}

let stop = false;
after(() => {
  stop = true;
});

test("a gateway restarted mid-stream: no message or job event lost", { skip: !redis && "REDIS_URL not set (run through cargo nextest)" }, async () => {
  const a = await gateway();
  const b = await gateway();
  const worker = new Proc(["worker", "--redis", redis, "--queues", "ts-cluster"]);
  procs.push(worker);
  await worker.waitLog(/worker started/);

  let n = 0;
  const recovered = [];
  const states = [];
  const c = new FerryClient({
    url: a.url,
    token: token("dave", ALL),
    WebSocket,
    reconnect: { baseMs: 100, maxMs: 1000 },
    onRecovered: (channel, info) => recovered.push({ channel, ...info }),
    onStateChange: (s, d) => states.push([s, d?.code, n]),
  });
  clients.push(c);
  const seen = [];
  const jobEvents = new Map();
  c.subscribe("app:feed", (f) => seen.push(f.data.n));
  c.subscribe("user:", (f) => {
    if (f.event === "job.completed") jobEvents.set(f.data.id, (jobEvents.get(f.data.id) ?? 0) + 1);
  });
  await c.connect();
  const pub = new FerryClient({ url: b.url, token: token("dave", ALL) });
  // Wait until the subscription is live (messages published before it are not part of the stream), then
  // publish a marker: a probe still in flight arrives before it, so the stream starts after the marker.
  let probe = 0;
  await eventually(async () => {
    await pub.channels.publish("feed", { n: -1 - probe++ });
    return seen.length > 0;
  }, 5000, "subscription live");
  await pub.channels.publish("feed", { n: "marker" });
  await eventually(() => seen.includes("marker"), 5000, "the marker");
  const start = seen.length;

  const submitted = [];
  const publisher = (async () => {
    while (!stop) {
      await pub.channels.publish("feed", { n: n++ });
      if (n % 5 === 0) submitted.push((await pub.jobs.submit("ts-cluster", { kind: "ferry.echo", payload: n })).id);
      await sleep(20);
    }
  })();
  await eventually(() => seen.length - start >= 10, 5000, "messages before the restart");

  // Restart the client's gateway on the same address.
  const { code } = await a.sigterm(10_000);
  assert.equal(code, 0, a.log);
  await sleep(200);
  await gateway(a.addr);
  await eventually(() => c.ws.connectionState === "open" && recovered.length >= 2, 15_000, "reconnected and recovered");
  const target = n + 10;
  await eventually(() => seen.at(-1) >= target, 10_000, `messages after the restart (seen ${seen.slice(-5)}; target ${target})`);
  stop = true;
  await publisher;
  const last = n - 1;
  await eventually(() => seen.at(-1) === last, 5000, "the last message");
  await eventually(() => submitted.every((id) => jobEvents.has(id)), 15_000, "every job's job.completed");

  const stream = seen.slice(start);
  assert.deepEqual(stream, [...Array(n).keys()], "every message once, in order");
  assert.ok(states.some(([s, code]) => s === "reconnecting" && code === 1001), JSON.stringify(states));
  // Messages were published while the client was away (so recovery, not luck, delivered them).
  const down = states.findIndex(([s, code]) => s === "reconnecting" && code === 1001);
  const up = states.findIndex(([s], i) => i > down && s === "open");
  assert.ok(states[up][2] > states[down][2], `published while disconnected: ${JSON.stringify(states)}`);
  const feed = recovered.find((r) => r.channel === "app:feed");
  assert.equal(feed?.recovered, true, JSON.stringify(recovered));
  const user = recovered.find((r) => r.channel.startsWith("user:"));
  assert.equal(user?.recovered, true, JSON.stringify(recovered));
  for (const id of submitted) assert.equal(jobEvents.get(id), 1, `job ${id}: job.completed exactly once`);
  assert.ok(submitted.length >= 2);
});

test("1013 over the per-subject limit: the session backs off at least the floor, then connects once there is room", { skip: !redis && "REDIS_URL not set (run through cargo nextest)" }, async () => {
  const g = await gateway("127.0.0.1:0", ["--max-connections-per-subject", "1"]);
  const first = new FerryClient({ url: g.url, token: token("gina", ALL), WebSocket });
  clients.push(first);
  await first.connect();
  const states = [];
  const second = new FerryClient({
    url: g.url,
    token: token("gina", ALL),
    WebSocket,
    reconnect: { baseMs: 50, maxMs: 100, backoffFloorMs: 800 },
    onStateChange: (state, d) => states.push({ state, code: d?.code, delayMs: d?.delayMs }),
  });
  clients.push(second);
  second.subscribe("app:limited", () => undefined);
  await eventually(() => states.some((x) => x.code === 1013), 5000, "a 1013 close");
  for (const x of states.filter((x) => x.code === 1013)) assert.ok(x.delayMs >= 800, JSON.stringify(states));
  assert.notEqual(second.ws.connectionState, "closed");
  first.close();
  await eventually(() => second.ws.connectionState === "open", 10_000, `open once there is room: ${JSON.stringify(states)}`);
});
