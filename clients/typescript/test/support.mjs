// What the node tests share: the ferry binary, spawned processes that announce their address, tokens.
import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { fileURLToPath } from "node:url";
import { existsSync } from "node:fs";
import WS from "ws";

export const SECRET = "ts-client-test-secret-0123456789abcdef";
const here = fileURLToPath(new URL(".", import.meta.url));

/** The ferry binary: FERRY_BIN (set by crates/cli/tests/cli/ts_client.rs), else the workspace's debug build. */
export function ferryBin() {
  const bin = process.env.FERRY_BIN ?? `${here}../../../target/debug/ferry`;
  if (!existsSync(bin)) throw new Error(`no ferry binary at ${bin}: set FERRY_BIN or build with cargo build -p ferry-cli`);
  return bin;
}

/** Node 20 has no global WebSocket: the tests pass `ws` explicitly unless told to use the global. */
export const WebSocket = globalThis.WebSocket ?? WS;

/** An HS256 token for SECRET (what `ferry token` mints), `ttlS` seconds long. */
export function token(sub, scope, ttlS = 3600, extra = {}) {
  const b64 = (o) => Buffer.from(JSON.stringify(o)).toString("base64url");
  const now = Math.floor(Date.now() / 1000);
  const body = `${b64({ alg: "HS256", typ: "JWT" })}.${b64({ sub, scope, iat: now, exp: now + ttlS, ...extra })}`;
  return `${body}.${createHmac("sha256", SECRET).update(body).digest("base64url")}`;
}

export const ALL = "jobs:submit jobs:read jobs:cancel queues:read queues:admin publish subscribe admin";

/** A spawned ferry process; `addr` once it logged `<what> listening listen=ADDR`. */
export class Proc {
  constructor(args, env = {}) {
    this.args = args;
    this.log = "";
    this.child = spawn(ferryBin(), args, {
      env: { ...process.env, FERRY_JWT_SECRET: SECRET, NO_COLOR: "1", RUST_LOG: "info", ...env },
      stdio: ["ignore", "pipe", "pipe"],
    });
    this.exited = new Promise((resolve) => this.child.on("exit", (code, signal) => resolve({ code, signal })));
    const add = (d) => {
      this.log += d.toString();
    };
    this.child.stdout.on("data", add);
    this.child.stderr.on("data", add);
  }

  /** Wait (up to `ms`) for the `gateway listening listen=ADDR` line; its ADDR. */
  async listening(ms = 20_000) {
    const deadline = Date.now() + ms;
    const re = /gateway listening listen=(\S+)/;
    while (Date.now() < deadline) {
      const m = re.exec(this.log);
      if (m) return (this.addr = m[1]);
      if (this.child.exitCode !== null) break;
      await sleep(20);
    }
    throw new Error(`no "gateway listening" line from ferry ${this.args.join(" ")}:\n${this.log}`);
  }

  /** Wait for a log line matching `re`. */
  async waitLog(re, ms = 20_000) {
    const deadline = Date.now() + ms;
    while (Date.now() < deadline) {
      if (re.test(this.log)) return;
      await sleep(20);
    }
    throw new Error(`no ${re} in the log of ferry ${this.args.join(" ")}:\n${this.log}`);
  }

  async sigterm(ms = 20_000) {
    this.child.kill("SIGTERM");
    return withTimeout(this.exited, ms, "exit after SIGTERM");
  }

  kill() {
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill("SIGKILL");
  }
}

/** `ferry dev` on a free port, ready. */
export async function startDev(extra = []) {
  const p = new Proc(["dev", "--listen", "127.0.0.1:0", "--drain-delay-ms", "0", "--ws-close-spread-ms", "200", ...extra]);
  await p.listening();
  p.url = `http://${p.addr}`;
  await waitReady(p.url);
  return p;
}

export async function waitReady(url, ms = 20_000) {
  const deadline = Date.now() + ms;
  while (Date.now() < deadline) {
    try {
      if ((await fetch(`${url}/readyz`)).status === 200) return;
    } catch {
      // not yet
    }
    await sleep(50);
  }
  throw new Error(`${url} not ready`);
}

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

export function withTimeout(p, ms, what) {
  let t;
  return Promise.race([
    p.finally(() => clearTimeout(t)),
    new Promise((_, rej) => {
      t = setTimeout(() => rej(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    }),
  ]);
}

/** Poll `check` until it returns a truthy value (up to `ms`). */
export async function eventually(check, ms = 10_000, what = "condition") {
  const deadline = Date.now() + ms;
  let last;
  while (Date.now() < deadline) {
    last = await check();
    if (last) return last;
    await sleep(25);
  }
  throw new Error(`timed out after ${ms} ms waiting for ${what} (last: ${JSON.stringify(last)})`);
}
