// Token expiry against a real `ferry dev`: the session refreshes a token before its `exp` over the live
// connection, and when the gateway closes with 4001 (token expired) it asks the application for a fresh token and
// reconnects with it. test/session.test.mjs covers every close code against a scripted server.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { FerryClient } from "../dist/index.js";
import { startDev, token, ALL, eventually, sleep, WebSocket } from "./support.mjs";

let dev;
const clients = [];
before(async () => {
  dev = await startDev();
});
after(() => {
  for (const c of clients) c.close();
  dev?.kill();
});

function client(opts) {
  const states = [];
  const c = new FerryClient({
    url: dev.url,
    WebSocket,
    onStateChange: (state, detail) => states.push({ state, code: detail?.code }),
    ...opts,
  });
  clients.push(c);
  return { c, states };
}

/** A message published over HTTP reaches `got` through the session: the connection is live and authorized. */
async function roundTrip(c, got, n) {
  await eventually(async () => {
    await c.channels.publish("expiry", { n });
    return got.some((f) => f.data?.n === n);
  }, 5000, `message ${n}`);
}

test("a token near its exp is refreshed over the live connection, without a reconnect", async () => {
  let asked = 0;
  const { c, states } = client({
    token: token("erin", ALL, 4),
    refreshToken: () => {
      asked += 1;
      return token("erin", ALL, 3600);
    },
  });
  const got = [];
  c.subscribe("app:expiry", (f) => got.push(f));
  await c.connect();
  await roundTrip(c, got, 1);
  // Past the first token's exp: the gateway would have closed with 4001 had the refresh not reached it.
  await sleep(5500);
  assert.ok(asked >= 1, "refreshToken was called before exp");
  await roundTrip(c, got, 2);
  assert.deepEqual(
    states.filter((s) => s.state === "reconnecting"),
    [],
    `no reconnect: ${JSON.stringify(states)}`,
  );
});

test("4001 from the gateway: the session asks for a fresh token and reconnects with it", async () => {
  // The refresh before exp is slow (the application's token service is late), so the gateway closes with 4001
  // first; the second call answers at once.
  let asked = 0;
  const { c, states } = client({
    token: token("frank", ALL, 2),
    refreshToken: async () => {
      asked += 1;
      if (asked === 1) await sleep(4000);
      return token("frank", ALL, 3600);
    },
  });
  const got = [];
  c.subscribe("app:expiry", (f) => got.push(f));
  await c.connect();
  await roundTrip(c, got, 10);
  await eventually(() => states.some((s) => s.state === "reconnecting" && s.code === 4001), 6000, "4001 close");
  await eventually(() => states.at(-1)?.state === "open", 5000, "open again");
  await roundTrip(c, got, 11);
  assert.ok(asked >= 2, `refreshToken asked ${asked} times`);
});
