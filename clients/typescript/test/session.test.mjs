// The session's reconnect, backoff, refresh and recovery rules against a scripted fake WebSocket (no server).
import { test } from "node:test";
import assert from "node:assert/strict";
import { FerryClient, fullJitter } from "../dist/index.js";
import { token, eventually } from "./support.mjs";

/** A fake WebSocket class recording every instance; the test plays the server. */
function fakeServer() {
  const sockets = [];
  class FakeWs {
    constructor(url) {
      this.url = new URL(url);
      this.readyState = 0;
      this.sent = [];
      this.listeners = { open: [], message: [], close: [], error: [] };
      sockets.push(this);
      queueMicrotask(() => {
        if (this.refuse) return this.serverClose(1006, "");
        this.readyState = 1;
        this.emit("open");
      });
    }
    addEventListener(t, l) {
      this.listeners[t].push(l);
    }
    emit(t, ev) {
      for (const l of this.listeners[t]) l(ev);
    }
    send(s) {
      const f = JSON.parse(s);
      this.sent.push(f);
      const custom = this.onRequest?.(f);
      const plain = { id: f.id, ok: true, channel: f.channel };
      if (f.since) Object.assign(plain, { recovered: true, epoch: f.since.epoch, offset: f.since.offset });
      const reply = custom === undefined ? plain : custom;
      if (reply !== null) queueMicrotask(() => this.push(reply));
    }
    push(frame) {
      this.emit("message", { data: JSON.stringify(frame) });
    }
    close(code = 1000, reason = "") {
      this.serverClose(code, reason);
    }
    serverClose(code, reason = "") {
      if (this.readyState === 3) return;
      this.readyState = 3;
      queueMicrotask(() => this.emit("close", { code, reason }));
    }
  }
  return { FakeWs, sockets };
}

const fast = { baseMs: 5, maxMs: 20, backoffFloorMs: 200 };

test("full jitter stays under min(max, base * 2^attempt)", () => {
  for (let a = 0; a < 12; a++) {
    for (const r of [0, 0.5, 0.999]) {
      const d = fullJitter(a, 100, 5000, () => r);
      assert.ok(d >= 0 && d < Math.min(5000, 100 * 2 ** a) + 1, `${a} ${r} ${d}`);
    }
  }
  assert.equal(fullJitter(3, 100, 5000, () => 0), 0);
});

test("resubscribes with since after a drop, and reports recovered", async () => {
  const { FakeWs, sockets } = fakeServer();
  const recovered = [];
  const client = new FerryClient({
    url: "http://gw.test",
    token: token("alice", "subscribe"),
    WebSocket: FakeWs,
    reconnect: fast,
    onRecovered: (channel, info) => recovered.push([channel, info]),
  });
  const got = [];
  client.subscribe("app:chat", (f) => got.push(f.data));
  client.subscribe("user:", (f) => got.push(f.data));
  await client.connect();
  await eventually(() => sockets[0].sent.length === 1);
  assert.deepEqual(sockets[0].sent[0], { id: sockets[0].sent[0].id, op: "subscribe", channel: "app:chat" });
  assert.equal(sockets[0].url.searchParams.get("since_offset"), null);
  sockets[0].push({ channel: "app:chat", event: "message", data: 1, offset: "100-0", epoch: "e1" });
  sockets[0].push({ channel: "user:alice", event: "job.queued", data: { id: "j" }, offset: "7-1", epoch: "u1" });
  // A frame older than one seen is dropped.
  sockets[0].push({ channel: "app:chat", event: "message", data: "old", offset: "99-5", epoch: "e1" });
  sockets[0].serverClose(1006);
  await eventually(() => sockets.length === 2 && sockets[1].sent.length === 1, 2000, "reconnect");
  assert.equal(sockets[1].url.searchParams.get("since_offset"), "7-1");
  assert.equal(sockets[1].url.searchParams.get("since_epoch"), "u1");
  assert.deepEqual(sockets[1].sent[0].since, { offset: "100-0", epoch: "e1" });
  sockets[1].push({ type: "recovery", channel: "user:alice", recovered: true, epoch: "u1", offset: "7-1" });
  assert.deepEqual(got, [1, { id: "j" }]);
  await eventually(() => recovered.length === 2);
  assert.deepEqual(
    recovered.map(([c, i]) => [c, i.recovered]).sort(),
    [["app:chat", true], ["user:alice", true]],
  );
  client.close();
});

test("unsubscribe sends unsubscribe once the last handler goes", async () => {
  const { FakeWs, sockets } = fakeServer();
  const client = new FerryClient({ url: "http://gw.test", token: token("a", "subscribe"), WebSocket: FakeWs, reconnect: fast });
  const off1 = client.subscribe("app:x", () => {});
  const off2 = client.subscribe("app:x", () => {});
  await client.connect();
  await eventually(() => sockets[0].sent.length === 1);
  await new Promise((r) => setTimeout(r, 10));
  off1();
  assert.equal(sockets[0].sent.length, 1);
  off2();
  assert.equal(sockets[0].sent.at(-1).op, "unsubscribe");
  client.close();
  assert.equal(sockets[0].readyState, 3);
});

test("4008, 4009 and 1013 back off at least the floor; other drops reconnect fast", async () => {
  for (const code of [4008, 4009, 1013, 1006]) {
    const { FakeWs, sockets } = fakeServer();
    const delays = [];
    const client = new FerryClient({
      url: "http://gw.test",
      token: token("a", "subscribe"),
      WebSocket: FakeWs,
      reconnect: fast,
      onStateChange: (s, d) => s === "reconnecting" && d?.delayMs !== undefined && delays.push(d.delayMs),
    });
    await client.connect();
    sockets[0].serverClose(code);
    await eventually(() => delays.length === 1);
    if (code === 1006) assert.ok(delays[0] < 200, `${code}: ${delays[0]}`);
    else assert.ok(delays[0] >= 200, `${code}: ${delays[0]}`);
    client.close();
  }
});

test("goaway then 1001: reconnects at once; goaway without a close: the client moves on itself", async () => {
  const { FakeWs, sockets } = fakeServer();
  const client = new FerryClient({ url: "http://gw.test", token: token("a", "subscribe"), WebSocket: FakeWs, reconnect: { ...fast, baseMs: 10_000, maxMs: 60_000 } });
  await client.connect();
  sockets[0].push({ type: "goaway", reason: "shutdown", reconnect_after_ms: 10 });
  sockets[0].serverClose(1001, "shutdown");
  await eventually(() => sockets.length === 2, 1000, "reconnect after 1001");
  sockets[1].push({ type: "goaway", reason: "rebalance", reconnect_after_ms: 0 });
  await eventually(() => sockets.length === 3, 4000, "reconnect after an unclosed goaway");
  client.close();
});

test("4001: asks for a fresh token and reconnects with it; refreshes before exp on its own", async () => {
  const { FakeWs, sockets } = fakeServer();
  let asked = 0;
  const client = new FerryClient({
    url: "http://gw.test",
    // Expires in 2 s; refresh 60 s before exp is capped at half the remaining life: about 1 s from now.
    token: token("a", "subscribe", 2),
    WebSocket: FakeWs,
    reconnect: fast,
    refreshToken: () => {
      asked++;
      return token("a", "subscribe", 3600, { n: asked });
    },
  });
  await client.connect();
  const refresh = await eventually(() => sockets[0].sent.find((f) => f.op === "refresh"), 3000, "refresh frame");
  assert.equal(asked, 1);
  assert.equal(refresh.token, client.currentToken);
  sockets[0].serverClose(4001, "token expired");
  await eventually(() => sockets.length === 2, 2000, "reconnect after 4001");
  assert.equal(asked, 2);
  assert.equal(sockets[1].url.searchParams.get("token"), client.currentToken);
  client.close();
});

test("4001 without refreshToken: the session closes and reports it", async () => {
  const { FakeWs, sockets } = fakeServer();
  const errors = [];
  const client = new FerryClient({ url: "http://gw.test", token: token("a", "subscribe"), WebSocket: FakeWs, reconnect: fast, onError: (e) => errors.push(e) });
  await client.connect();
  sockets[0].serverClose(4001);
  await eventually(() => client.ws.connectionState === "closed");
  assert.match(errors[0].message, /4001/);
  await assert.rejects(client.connect(), /closed/);
});

test("requests fail with disconnected when the connection drops", async () => {
  const { FakeWs, sockets } = fakeServer();
  const client = new FerryClient({ url: "http://gw.test", token: token("a", "publish"), WebSocket: FakeWs, reconnect: fast });
  await client.connect();
  sockets[0].onRequest = () => null; // never answered
  const p = client.ws.publish("app:x", 1);
  await eventually(() => sockets[0].sent.length === 1);
  sockets[0].serverClose(1006);
  await assert.rejects(p, (e) => e.code === "disconnected");
  client.close();
});

test("submitAndWait looks the job up over HTTP after a reconnect (events the history could not replay)", async () => {
  const { FakeWs, sockets } = fakeServer();
  const calls = [];
  const job = { id: "j1", queue: "q", kind: "k", state: "active", priority: "normal", attempts: 1, max_attempts: 3, payload: null, result: null, error: null, created_at: 1, updated_at: 2, run_at: null };
  const fakeFetch = async (url, init) => {
    const path = new URL(url).pathname;
    calls.push(`${init.method} ${path}`);
    const body = path === "/v1/queues/q/jobs" ? { id: "j1", queue: "q", state: "queued" } : job;
    return new Response(JSON.stringify(body), { status: path.endsWith("/jobs") ? 202 : 200 });
  };
  const client = new FerryClient({ url: "http://gw.test", token: token("a", "jobs:submit jobs:read"), WebSocket: FakeWs, fetch: fakeFetch, reconnect: fast });
  const waiting = client.jobs.submitAndWait("q", { kind: "k" }, { timeoutMs: 5000 });
  await eventually(() => calls.includes("POST /v1/queues/q/jobs"), 2000, "submit");
  await new Promise((r) => setTimeout(r, 10));
  // The job completes while the connection is down and the history does not reach back.
  Object.assign(job, { state: "completed", result: { ok: true } });
  sockets[0].serverClose(1006);
  await eventually(() => sockets.length === 2, 2000, "reconnect");
  sockets[1].push({ type: "recovery", channel: "user:a", recovered: false, epoch: null, offset: null });
  const done = await waiting;
  assert.deepEqual(done.result, { ok: true });
  assert.ok(calls.includes("GET /v1/jobs/j1"), calls.join(", "));
  client.close();
});
