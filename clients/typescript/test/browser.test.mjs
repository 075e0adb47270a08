// The built client in headless Chromium (Debian's /usr/bin/chromium, driven by puppeteer-core; nothing is
// downloaded): a page served from another origin calls the HTTP API (CORS, `ferry dev --cors-origin`) and uses the
// browser's own WebSocket.
import { test, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { existsSync } from "node:fs";
import puppeteer from "puppeteer-core";
import { startDev, token, ALL } from "./support.mjs";

const chromium = process.env.CHROMIUM ?? "/usr/bin/chromium";
const root = new URL("../", import.meta.url);
const cleanup = [];
after(async () => {
  for (const f of cleanup.reverse()) await f();
});

const PAGE = `<!doctype html><meta charset="utf-8"><title>ferry client</title>
<script type="module">
import { FerryClient, FerryError } from "/dist/index.js";
const q = new URLSearchParams(location.search);
const out = {};
try {
  const client = new FerryClient({ url: q.get("gw"), token: q.get("token") });
  out.submitted = await client.jobs.submit("default", { kind: "ferry.echo", payload: { from: "browser" } });
  out.job = await client.jobs.get(out.submitted.id);
  out.waited = await client.jobs.submitAndWait("default", { kind: "ferry.echo", payload: 42 }, { timeoutMs: 10000 });
  const got = [];
  client.subscribe("app:page", (f) => got.push(f.data));
  await client.connect();
  for (let i = 0; i < 50 && got.length === 0; i++) {
    await client.ws.publish("app:page", { hi: i });
    await new Promise((r) => setTimeout(r, 50));
  }
  out.message = got[0];
  try { await client.jobs.get("not-a-uuid"); } catch (e) { out.problem = e instanceof FerryError ? e.problem : String(e); }
  client.close();
} catch (e) {
  out.error = String(e && e.stack || e);
}
window.result = out;
</script>`;

test("the client in headless Chromium, from another origin", { timeout: 60_000 }, async () => {
  assert.ok(existsSync(chromium), `${chromium} missing: apt-get install chromium (scripts/test.sh does)`);
  const server = createServer(async (req, res) => {
    const path = new URL(req.url, "http://x").pathname;
    if (path === "/") {
      res.writeHead(200, { "content-type": "text/html" }).end(PAGE);
      return;
    }
    if (path.startsWith("/dist/") && !path.includes("..")) {
      try {
        const body = await readFile(new URL(`.${path}`, root));
        res.writeHead(200, { "content-type": path.endsWith(".js") ? "text/javascript" : "application/octet-stream" }).end(body);
        return;
      } catch {
        // 404 below
      }
    }
    res.writeHead(404).end();
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  cleanup.push(() => new Promise((r) => server.close(r)));
  const origin = `http://127.0.0.1:${server.address().port}`;
  const dev = await startDev(["--cors-origin", origin]);
  cleanup.push(() => dev.kill());

  const browser = await puppeteer.launch({
    executablePath: chromium,
    headless: true,
    args: ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
  });
  cleanup.push(() => browser.close());
  const page = await browser.newPage();
  const logs = [];
  page.on("console", (m) => logs.push(m.text()));
  page.on("pageerror", (e) => logs.push(String(e)));
  const url = `${origin}/?gw=${encodeURIComponent(dev.url)}&token=${token("erin", ALL)}`;
  await page.goto(url);
  await page.waitForFunction(() => window.result !== undefined, { timeout: 30_000 });
  const r = await page.evaluate(() => window.result);
  assert.equal(r.error, undefined, `${r.error}\n${logs.join("\n")}`);
  assert.equal(r.submitted.queue, "default");
  assert.equal(r.job.id, r.submitted.id);
  assert.equal(r.waited.result, 42);
  assert.deepEqual(Object.keys(r.message), ["hi"]);
  assert.equal(r.problem.status, 400);
});
