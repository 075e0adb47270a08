// Every /v1 route through the typed HTTP calls, against a real `ferry dev`.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { FerryClient, FerryError } from "../dist/index.js";
import { startDev, token, ALL, eventually } from "./support.mjs";

let dev, client;
before(async () => {
  dev = await startDev(["--queues", "default,ts-http"]);
  client = new FerryClient({ url: dev.url, token: token("alice", ALL) });
});
after(() => {
  client?.close();
  dev?.kill();
});

test("submit, get, list, events, cancel", async () => {
  const s = await client.jobs.submit("ts-http", { kind: "ferry.echo", payload: { n: 1 } }, { requestId: "req-ts-1" });
  assert.equal(s.queue, "ts-http");
  assert.match(s.id, /^[0-9a-f-]{36}$/);
  const done = await eventually(async () => {
    const j = await client.jobs.get(s.id);
    return j.state === "completed" && j;
  }, 10_000, "job completed");
  assert.deepEqual(done.result, { n: 1 });
  const page = await eventually(async () => {
    const p = await client.jobs.list({ queue: "ts-http", limit: 10 });
    return p.jobs.some((j) => j.id === s.id) && p;
  }, 10_000, "job in the listing");
  assert.ok("next_cursor" in page);
  const events = await eventually(async () => {
    const e = await client.jobs.events(s.id);
    return e.events?.some((x) => x.type === "job.completed") && e;
  }, 10_000, "job.completed in the audit trail");
  assert.ok(events.events.every((e) => e.correlation_id === "req-ts-1"));

  const later = await client.jobs.submit("ts-http", { kind: "ferry.echo", delay_ms: 60_000 });
  assert.equal(later.state, "scheduled");
  const c = await client.jobs.cancel(later.id);
  assert.equal(c.state, "cancelled");
  await assert.rejects(client.jobs.cancel(later.id), (e) => e instanceof FerryError && e.status === 409 && e.type === "conflict");
});

test("batch submit and idempotency", async () => {
  const b = await client.jobs.submitBatch("ts-http", [{ kind: "ferry.echo" }, { kind: "ferry.echo", payload: 2 }]);
  assert.equal(b.ids.length, 2);
  const a1 = await client.jobs.submit("ts-http", { kind: "ferry.echo", idempotency_key: "k-1" });
  const a2 = await client.jobs.submit("ts-http", { kind: "ferry.echo", idempotency_key: "k-1" });
  assert.equal(a2.id, a1.id);
  assert.equal(a2.duplicate, true);
});

test("queues: list, get, pause, resume, dead letters, retry", async () => {
  const p = await client.queues.pause("ts-http");
  assert.deepEqual(p, { queue: "ts-http", paused: true });
  assert.equal((await client.queues.get("ts-http")).paused, true);
  assert.equal((await client.queues.resume("ts-http")).paused, false);
  const list = await client.queues.list();
  assert.ok(list.queues.some((q) => q.queue === "ts-http"));
  // A kind with no handler goes straight to dead.
  const s = await client.jobs.submit("ts-http", { kind: "no.such.kind", max_attempts: 1 });
  const dead = await eventually(async () => {
    const d = await client.queues.dead("ts-http", { limit: 10 });
    return d.jobs.some((j) => j.id === s.id) && d;
  }, 10_000, "dead letter");
  assert.equal(dead.queue, "ts-http");
  const r = await client.jobs.retry(s.id);
  assert.equal(r.state, "queued");
});

test("publish, cluster, autoscaler and the operations routes", async () => {
  await client.channels.publish("app:news", { hello: 1 });
  await client.channels.publish("news", { hello: 2 });
  const cluster = await client.ops.cluster();
  assert.ok(Array.isArray(cluster.nodes));
  // ferry dev is pointed at no autoscaler.
  assert.deepEqual(await client.ops.autoscaler(), { autoscalers: [] });
  assert.equal(await client.ops.healthz(), "ok");
  assert.equal((await client.ops.readyz()).status, "ready");
  assert.match(await client.ops.metrics(), /ferry_/);
  // Profiling is off in this ferry dev: 404 saying so.
  await assert.rejects(client.ops.profile({ seconds: 1 }), (e) => e instanceof FerryError && e.status === 404);
  const doc = await client.ops.openapi();
  assert.ok(String(doc.openapi).startsWith("3.1"));
});

test("errors are FerryErrors with the problem", async () => {
  await assert.rejects(client.jobs.submit("ts-http", { kind: "bad kind" }), (e) => {
    assert.ok(e instanceof FerryError);
    assert.equal(e.status, 400);
    assert.equal(e.type, "bad-request");
    assert.equal(e.problem.errors[0].field, "kind");
    return true;
  });
  await assert.rejects(client.jobs.get("00000000-0000-7000-8000-000000000000"), (e) => e.status === 404);
  const anon = new FerryClient({ url: dev.url, token: "not-a-jwt" });
  await assert.rejects(anon.queues.list(), (e) => e.status === 401 && e.type === "unauthorized");
  const weak = new FerryClient({ url: dev.url, token: token("bob", "jobs:read") });
  await assert.rejects(weak.queues.list(), (e) => e.status === 403);
});
