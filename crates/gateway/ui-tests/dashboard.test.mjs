// End-to-end test of the /ui dashboard in headless Chromium against a running gateway (`ferry dev`).
// Run by crates/cli/tests/cli/dashboard.rs, which starts ferry and passes:
//   FERRY_UI_BASE            http://127.0.0.1:PORT
//   FERRY_UI_LINK            the dashboard link `ferry dev` printed (/ui/#token=<admin token>)
//   FERRY_UI_ADMIN_TOKEN     a token with every scope
//   FERRY_UI_READONLY_TOKEN  a token with queues:read and jobs:read only
//   CHROMIUM                 the browser (default /usr/bin/chromium)
//   FERRY_UI_SCREENSHOTS     optional: a directory to save 1280×800 screenshots in (docs/dashboard)
import assert from "node:assert/strict";
import { mkdirSync } from "node:fs";
import puppeteer from "puppeteer-core";

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const BASE = env("FERRY_UI_BASE");
const LINK = process.env.FERRY_UI_LINK || `${BASE}/ui/#token=${env("FERRY_UI_ADMIN_TOKEN")}`;
const ADMIN = env("FERRY_UI_ADMIN_TOKEN");
const READONLY = env("FERRY_UI_READONLY_TOKEN");
const SHOTS = process.env.FERRY_UI_SCREENSHOTS;
if (SHOTS) mkdirSync(SHOTS, { recursive: true });

// A payload that would run script if any of it were parsed as HTML.
const XSS = {
  script: "<script>window.__pwned = 'script'</script>",
  img: "\"><img src=x onerror=\"window.__pwned='img'\">",
  svg: "<svg onload=\"window.__pwned='svg'\"></svg>",
};

const http = async (method, path, token, body) => {
  const res = await fetch(`${BASE}${path}`, {
    method,
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : null };
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
async function until(what, fn, ms = 15000) {
  const end = Date.now() + ms;
  for (;;) {
    const v = await fn();
    if (v) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

const browser = await puppeteer.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"],
  defaultViewport: { width: 1280, height: 800 },
});
const problems = []; // console errors, CSP violations, page errors: any fails the test
const log = [];
async function newPage({ refused = false } = {}) {
  const page = await browser.newPage();
  page.on("console", (m) => {
    log.push(`[console.${m.type()}] ${m.text()}`);
    // Failed requests the test provokes on purpose are logged by Chromium as errors; so is the WebSocket
    // handshake of a token the gateway refuses.
    const expected = /status of (401|404|409|503)/.test(m.text()) || (refused && /WebSocket/.test(m.text()));
    if (m.type() === "error" && !expected) problems.push(m.text());
  });
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  return page;
}
const shot = async (page, name) => {
  if (!SHOTS) return;
  await page.$eval("#flash", (e) => e.classList.add("hidden"));
  await page.screenshot({ path: `${SHOTS}/${name}.png` });
};
const texts = (page, sel) => page.$$eval(sel, (els) => els.map((e) => e.textContent));
const steps = [];
async function step(name, fn) {
  const t = Date.now();
  await fn();
  steps.push(name);
  console.log(`ok   ${name} (${Date.now() - t} ms)`);
}

let page;
try {
  page = await newPage();

  await step("the link ferry dev prints signs in and leaves the address bar", async () => {
    const res = await page.goto(LINK, { waitUntil: "load" });
    assert.equal(res.status(), 200);
    assert.match(res.headers()["content-security-policy"], /script-src 'self'/);
    await page.waitForSelector("#page-queues");
    const url = page.url();
    assert.ok(!url.includes("token="), `token still in ${url}`);
    assert.ok(url.endsWith("/ui/#/queues"), url);
    assert.equal(await page.evaluate(() => sessionStorage.getItem("ferry.token")), ADMIN);
    await until("the WebSocket", () => page.$eval("#live", (e) => e.textContent === "live"));
  });

  let xssId;
  await step("enqueue from the UI; payload with markup renders as text", async () => {
    await page.goto(`${BASE}/ui/#/enqueue`);
    await page.waitForSelector("#e-payload");
    await page.$eval("#e-payload", (e, v) => (e.value = v), JSON.stringify(XSS));
    await page.click("#enqueue");
    const link = await page.waitForSelector("#enqueued-link");
    xssId = await link.evaluate((e) => e.textContent);
    await link.click();
    await page.waitForSelector("#job-id");
    await until("the job to complete", () => page.$eval("#job-state", (e) => e.textContent === "completed").catch(() => false));
    const payload = JSON.parse(await page.$eval("#payload", (e) => e.textContent));
    assert.deepEqual(payload, XSS);
    assert.deepEqual(JSON.parse(await page.$eval("#result", (e) => e.textContent)), XSS);
    await until("the audit trail", async () => (await texts(page, "table.trail tbody tr")).length === 3);
    const trail = await texts(page, "table.trail tbody td:nth-child(2)");
    assert.deepEqual(trail, ["job.queued", "job.active", "job.completed"]);
  });

  const inert = async (where) => {
    assert.equal(await page.evaluate(() => window.__pwned), undefined, `script ran on ${where}`);
    assert.equal(await page.$$eval("img", (i) => i.length), 0, `an img element on ${where}`);
    assert.equal(await page.$$eval("main script, main svg:not(.spark)", (i) => i.length), 0, `markup on ${where}`);
  };
  await step("markup in the payload stays inert on the job page", async () => {
    await inert("job page");
    await shot(page, "job");
  });

  await step("the live tail shows the job's events, markup as text", async () => {
    await page.goto(`${BASE}/ui/#/events`);
    await page.waitForSelector("#page-events");
    // Events arrive while connected; run another job so the tail has some now.
    const r = await http("POST", "/v1/queues/default/jobs", ADMIN, { kind: "ferry.echo", payload: XSS });
    assert.equal(r.status, 202);
    await until("a completed event in the tail", async () =>
      (await texts(page, "table.tail tbody tr")).some((t) => t.includes("job.completed") && t.includes(r.body.id)));
    const rows = await texts(page, "table.tail tbody tr");
    assert.ok(rows.some((t) => t.includes("<script>")), "the result is shown as text");
    await inert("event tail");
    await shot(page, "events");
  });

  await step("queues table: figures, sparklines, sorting, pause and resume", async () => {
    await page.goto(`${BASE}/ui/#/queues`);
    await page.waitForSelector("#page-queues table");
    const names = await texts(page, "#page-queues tbody td:first-child");
    assert.ok(names.includes("default"), names.join());
    assert.ok((await page.$$("svg.spark polyline")).length > 0, "sparklines drawn");
    // Throughput is counted in the browser from the queue's live events.
    await sleep(500); // the page's first poll subscribed queue:default
    for (let i = 0; i < 12; i++) {
      const kind = i % 4 === 3 ? "no.such.kind" : "ferry.echo";
      assert.equal((await http("POST", "/v1/queues/default/jobs", ADMIN, { kind, payload: { i }, max_attempts: 1 })).status, 202);
    }
    await until("12 finished jobs counted", async () => {
      const [done, fail] = await page.$$eval('#page-queues tbody tr', (trs) => {
        const tr = trs.find((t) => t.firstChild.textContent === "default");
        return [tr.children[7].textContent, tr.children[8].textContent];
      });
      return /\b(9|1\d)\/min/.test(done) && /\b(1\d|2\d|30)%/.test(fail);
    });
    await page.click('th[data-key="depth"]');
    assert.ok(await page.$('th[data-key="depth"].sorted-desc'));
    await page.click('button.pause[data-queue="default"]');
    await until("paused", async () => (await http("GET", "/v1/queues/default", ADMIN)).body.paused === true);
    await page.waitForSelector('button.resume[data-queue="default"]');
    await page.click('button.resume[data-queue="default"]');
    await until("resumed", async () => (await http("GET", "/v1/queues/default", ADMIN)).body.paused === false);
    await page.waitForSelector('button.pause[data-queue="default"]');
    await shot(page, "queues");
  });

  await step("dead letters: retry one, a selection and all", async () => {
    const base = (await http("GET", "/v1/queues/default", ADMIN)).body.dead;
    const n = base + 4;
    const ids = [];
    for (let i = 0; i < 4; i++) {
      const r = await http("POST", "/v1/queues/default/jobs", ADMIN, { kind: "no.handler", payload: { i, note: XSS.img }, max_attempts: 1 });
      ids.push(r.body.id);
    }
    await until("four more dead jobs", async () => (await http("GET", "/v1/queues/default", ADMIN)).body.dead === n);
    await page.goto(`${BASE}/ui/#/queue/default`);
    await page.waitForSelector("table.dead");
    assert.equal((await page.$$("table.dead tbody tr")).length, n);
    await inert("dead letters");
    await shot(page, "dead-letters");
    const retried = async (k) => {
      await until(`${k} retried`, async () => (await texts(page, "#flash")).some((t) => t.startsWith(`retried ${k} job`)));
      await page.$eval("#flash", (e) => (e.textContent = ""));
    };
    await page.click("button.retry-one");
    await retried(1);
    // The retried job has no handler either: it dies again and comes back to the list.
    await until("four dead again", async () => (await http("GET", "/v1/queues/default", ADMIN)).body.dead === n);
    await page.goto(`${BASE}/ui/#/queues`);
    await page.goto(`${BASE}/ui/#/queue/default`);
    await until("four rows", async () => (await page.$$("table.dead tbody tr")).length === n);
    const boxes = await page.$$("table.dead tbody input[type=checkbox]");
    await boxes[0].click();
    await page.waitForSelector("table.dead tbody input[type=checkbox]");
    await (await page.$$("table.dead tbody input[type=checkbox]"))[1].click();
    assert.match(await page.$eval("#retry-selected", (e) => e.textContent), /\(2\)/);
    await page.click("#retry-selected");
    await retried(2);
    await until("four dead again", async () => (await http("GET", "/v1/queues/default", ADMIN)).body.dead === n);
    await page.goto(`${BASE}/ui/#/queues`);
    await page.goto(`${BASE}/ui/#/queue/default`);
    await until("four rows", async () => (await page.$$("table.dead tbody tr")).length === n);
    await page.click("#retry-all");
    await retried(n);
  });

  await step("job search: by id, by filters, and the no-database message", async () => {
    await page.goto(`${BASE}/ui/#/jobs`);
    await page.waitForSelector("#f-id");
    await page.type("#f-id", xssId);
    await page.click("#search");
    await page.waitForSelector("#job-id");
    assert.equal(await page.$eval("#job-id", (e) => e.textContent), xssId);
    await page.goto(`${BASE}/ui/#/jobs`);
    await page.waitForSelector("#f-id");
    await page.$eval("#f-id", (e) => (e.value = ""));
    await page.$eval("#f-kind", (e) => (e.value = ""));
    await page.type("#f-kind", "ferry.echo");
    await page.select("#f-state", "completed");
    await page.click("#search");
    await until("results", async () => (await texts(page, "table.jobs tbody tr")).some((t) => t.includes(xssId)));
    await inert("job search");
    // A gateway without a database answers 503 no-store: the page says so instead of failing.
    await page.setRequestInterception(true);
    const intercept = (req) => {
      if (req.url().includes("/v1/jobs?")) {
        req.respond({
          status: 503,
          contentType: "application/problem+json",
          body: JSON.stringify({ type: "urn:ferry:problem:no-store", title: "No store", status: 503, detail: "no database" }),
        });
      } else req.continue();
    };
    page.on("request", intercept);
    await page.click("#search");
    await until("the notice", async () => (await texts(page, ".notice")).some((t) => t.includes("needs a database")));
    page.off("request", intercept);
    await page.setRequestInterception(false);
  });

  await step("job detail from a search: dead job shows its error and retry", async () => {
    const dead = (await http("GET", "/v1/queues/default/dead", ADMIN)).body.jobs[0];
    await page.goto(`${BASE}/ui/#/job/${dead.id}`);
    await page.waitForSelector("#job-state");
    assert.equal(await page.$eval("#job-state", (e) => e.textContent), "dead");
    assert.match(await page.$eval("#error", (e) => e.textContent), /no handler/);
    assert.ok(await page.$("#retry"), "retry offered on a dead job");
    await inert("dead job");
  });

  await step("cluster page lists this gateway", async () => {
    await page.goto(`${BASE}/ui/#/cluster`);
    await until("a gateway row", async () => (await page.$$("table.nodes tbody tr")).length >= 1 || (await page.$(".error")));
    const err = await page.$(".error");
    assert.equal(err, null, err && (await err.evaluate((e) => e.textContent)));
    assert.match((await texts(page, "table.nodes tbody tr"))[0], /\(this\)/);
    await shot(page, "cluster");
  });

  await step("autoscaler page: its last decisions, or how to point the gateway at one", async () => {
    await page.goto(`${BASE}/ui/#/autoscaler`);
    if (process.env.FERRY_UI_AUTOSCALER) {
      await until("a decision row", async () => (await page.$$("table.decisions tbody tr")).length >= 1 || (await page.$("#page-autoscaler .error")));
      const err = await page.$("#page-autoscaler .error");
      assert.equal(err, null, err && (await err.evaluate((e) => e.textContent)));
      assert.match((await texts(page, "table.decisions tbody tr"))[0], /^default/);
      assert.match(await page.$eval("#page-autoscaler h2", (e) => e.textContent), /dry run/);
      await shot(page, "autoscaler");
    } else {
      await until("the notice", async () => (await page.$("#page-autoscaler .notice")) !== null);
      assert.match(await page.$eval("#page-autoscaler .notice", (e) => e.textContent), /--autoscaler-url/);
    }
  });

  await step("a read-only token sees figures but no actions", async () => {
    const ro = await newPage();
    await ro.goto(`${BASE}/ui/`);
    await ro.waitForSelector("#token");
    await ro.type("#token", READONLY);
    await ro.click("#login");
    await ro.waitForSelector("#page-queues table");
    const hiddenNav = await ro.$$eval("#nav a.hidden", (a) => a.map((e) => e.dataset.page).sort());
    assert.deepEqual(hiddenNav, ["cluster", "enqueue"]);
    const buttons = await ro.$$eval("#page-queues tbody button", (b) => b.map((e) => e.disabled));
    assert.ok(buttons.length > 0 && buttons.every(Boolean), "pause/resume disabled");
    assert.equal(await ro.$$eval("#page-queues tbody a", (a) => a.length), 0, "no dead-letter links");
    await ro.goto(`${BASE}/ui/#/enqueue`);
    await ro.waitForSelector(".notice");
    await ro.close();
  });

  await step("a bad token is refused and the login page says why", async () => {
    const bad = await newPage({ refused: true });
    await bad.goto(`${BASE}/ui/#token=${ADMIN.slice(0, -4)}AAAA`);
    await bad.waitForSelector(".login .error");
    assert.match(await bad.$eval(".login .error", (e) => e.textContent), /refused/);
    assert.equal(await bad.evaluate(() => sessionStorage.getItem("ferry.token")), null);
    await bad.close();
  });

  await step("assets: types, CSP, nosniff; unknown asset is a 404 problem", async () => {
    for (const [path, type] of [["/ui", "text/html"], ["/ui/", "text/html"], ["/ui/app.js", "text/javascript"], ["/ui/app.css", "text/css"]]) {
      const res = await fetch(`${BASE}${path}`);
      assert.equal(res.status, 200, path);
      assert.ok(res.headers.get("content-type").startsWith(type), path);
      assert.equal(res.headers.get("x-content-type-options"), "nosniff");
      assert.match(res.headers.get("content-security-policy"), /default-src 'none'/);
    }
    const res = await fetch(`${BASE}/ui/nope.js`);
    assert.equal(res.status, 404);
    assert.equal(res.headers.get("content-type"), "application/problem+json");
  });

  assert.deepEqual(problems, [], "console errors or CSP violations");
  console.log(`all ${steps.length} steps passed`);
} catch (e) {
  console.error(`FAILED after ${steps.length} steps: ${e.stack || e}`);
  if (problems.length) console.error(`console problems:\n  ${problems.join("\n  ")}`);
  console.error(`browser log (last 40):\n  ${log.slice(-40).join("\n  ")}`);
  if (page) console.error(`page at failure: ${page.url()}\n${await page.$eval("main", (m) => m.innerText).catch(() => "?")}`);
  process.exitCode = 1;
} finally {
  await browser.close();
}
