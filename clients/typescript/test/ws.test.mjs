// The WebSocket session against a real `ferry dev`: subscribe/unsubscribe/publish/submit/refresh, submitAndWait.
// Token expiry is test/expiry.test.mjs; recovery across a gateway restart is test/cluster.test.mjs.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { FerryClient, FerryJobError, FerryWsError } from "../dist/index.js";
import { startDev, token, ALL, eventually, WebSocket } from "./support.mjs";

let dev;
const clients = [];
function client(extra = {}) {
  const c = new FerryClient({ url: dev.url, token: token("carol", ALL), WebSocket, ...extra });
  clients.push(c);
  return c;
}
before(async () => {
  dev = await startDev(["--queues", "default,ts-ws"]);
});
after(() => {
  for (const c of clients) c.close();
  dev?.kill();
});

test("app channel: subscribe, publish over WS and HTTP, unsubscribe", async () => {
  const c = client();
  const got = [];
  const off = c.subscribe("app:room", (f) => got.push(f));
  await c.connect();
  // The subscription is acknowledged asynchronously: publish until the first message arrives.
  await eventually(async () => {
    await c.ws.publish("app:room", { n: 0 });
    return got.length > 0;
  }, 5000, "first message");
  await c.channels.publish("room", { n: 1 });
  await eventually(() => got.some((f) => f.data?.n === 1), 5000, "HTTP-published message");
  const f = got.at(-1);
  assert.equal(f.channel, "app:room");
  assert.equal(f.event, "message");
  assert.match(f.offset, /^\d+-\d+$/);
  assert.equal(typeof f.epoch, "string");
  assert.deepEqual(c.ws.position("app:room"), { offset: f.offset, epoch: f.epoch });
  off();
  const n = got.length;
  await c.ws.ping();
  await c.channels.publish("room", { n: 2 });
  await c.ws.ping();
  await new Promise((r) => setTimeout(r, 200));
  assert.equal(got.length, n, "no message after unsubscribe");
});

test("submit over WS and job events on the user channel and job channel", async () => {
  const c = client();
  const user = [];
  c.subscribe("user:", (f) => user.push(f));
  const s = await c.ws.submit("ts-ws", { kind: "ferry.echo", payload: { x: 1 } });
  assert.equal(s.queue, "ts-ws");
  await eventually(() => user.some((f) => f.data.id === s.id && f.event === "job.completed"), 10_000, "job.completed");
  const done = user.find((f) => f.event === "job.completed");
  assert.deepEqual(done.data.result, { x: 1 });
  assert.ok(c.ws.userChannel?.startsWith("user:"));
  // job:<id> channel
  const later = await c.jobs.submit("ts-ws", { kind: "ferry.echo", delay_ms: 60_000 });
  const job = [];
  c.subscribe(`job:${later.id}`, (f) => job.push(f.event));
  await c.ws.ping();
  await new Promise((r) => setTimeout(r, 100));
  await c.jobs.cancel(later.id);
  await eventually(() => job.includes("job.cancelled"), 5000, "job.cancelled on job channel");
});

test("submitAndWait: completed, dead, cancelled, timeout", async () => {
  // No WebSocket option: globalThis.WebSocket, or on Node 20 the dynamic import of the optional peer `ws`.
  const c = client({ WebSocket: undefined });
  const ok = await c.jobs.submitAndWait("ts-ws", { kind: "ferry.echo", payload: "hi" }, { timeoutMs: 10_000 });
  assert.equal(ok.state, "completed");
  assert.equal(ok.result, "hi");
  await assert.rejects(
    c.jobs.submitAndWait("ts-ws", { kind: "no.handler", max_attempts: 1 }, { timeoutMs: 10_000 }),
    (e) => e instanceof FerryJobError && e.state === "dead" && /no handler/.test(e.jobError ?? ""),
  );
  // Cancelled while waiting: a scheduled job cancelled from elsewhere.
  const user = [];
  c.subscribe("user:", (f) => user.push(f));
  const waiting = c.jobs.submitAndWait("ts-ws", { kind: "ferry.echo", delay_ms: 60_000 }, { timeoutMs: 10_000 });
  const queued = await eventually(() => user.find((f) => f.event === "job.scheduled" || f.data?.state === "scheduled"), 5000, "scheduled event");
  await c.jobs.cancel(queued.data.id);
  await assert.rejects(waiting, (e) => e instanceof FerryJobError && e.state === "cancelled");
  await assert.rejects(
    c.jobs.submitAndWait("ts-ws", { kind: "ferry.echo", delay_ms: 60_000 }, { timeoutMs: 300 }),
    (e) => e instanceof FerryWsError && e.code === "timeout",
  );
  // An idempotent duplicate of a finished job resolves from GET /v1/jobs/{id}.
  const key = { kind: "ferry.echo", payload: 5, idempotency_key: "wait-dup" };
  await c.jobs.submitAndWait("ts-ws", key, { timeoutMs: 10_000 });
  const again = await c.jobs.submitAndWait("ts-ws", key, { timeoutMs: 10_000 });
  assert.equal(again.result, 5);
});

test("refresh: a new token over the connection, used by HTTP calls too", async () => {
  const c = client();
  await c.connect();
  const fresh = token("carol", ALL, 7200);
  const exp = await c.setToken(fresh);
  assert.ok(Math.abs(exp - (Math.floor(Date.now() / 1000) + 7200)) < 5, String(exp));
  assert.equal(c.currentToken, fresh);
  // Another subject: refused, and the current token stays.
  await assert.rejects(c.setToken(token("mallory", ALL)), (e) => e instanceof FerryWsError && e.code !== "disconnected");
  assert.equal(c.currentToken, fresh);
  await c.queues.list();
});

test("since: a position the application saved is recovered, or reported as out of reach", async () => {
  const a = client();
  const seen = [];
  a.subscribe("app:saved", (f) => seen.push(f));
  await a.connect();
  await eventually(async () => {
    await a.ws.publish("app:saved", { n: 0 });
    return seen.length > 0;
  }, 5000, "first message");
  for (const n of [1, 2, 3]) await a.channels.publish("saved", { n });
  await eventually(() => seen.some((f) => f.data?.n === 3), 5000, "three more");
  const one = seen.find((f) => f.data?.n === 1);
  // Another client starts from the saved position of message 1: messages 2 and 3 are replayed.
  const recoveries = [];
  const b = client({ onRecovered: (channel, info) => recoveries.push({ channel, ...info }) });
  const got = [];
  b.subscribe("app:saved", (f) => got.push(f.data?.n), { since: { offset: one.offset, epoch: one.epoch } });
  await eventually(() => got.includes(3), 5000, "replayed 2 and 3");
  assert.deepEqual(got.slice(0, 2), [2, 3]);
  assert.equal(recoveries.length, 1);
  assert.equal(recoveries[0].channel, "app:saved");
  assert.equal(recoveries[0].recovered, true);
  // A position of another epoch (another history) cannot be recovered: the application is told so.
  const lost = [];
  const c = client({ onRecovered: (_, info) => lost.push(info) });
  c.subscribe("app:saved", () => undefined, { since: { offset: one.offset, epoch: "not-this-epoch" } });
  await eventually(() => lost.length === 1, 5000, "recovery answer");
  assert.equal(lost[0].recovered, false);
});
