// The token, its scopes, the HTTP API and the WebSocket. The server enforces every scope; the dashboard reads
// them only to hide or disable what the token cannot do.

const KEY = "ferry.token";

export const auth = {
  token: sessionStorage.getItem(KEY) || "",
  claims: null,
  set(token) {
    this.token = token.trim();
    this.claims = decode(this.token);
    if (this.claims) sessionStorage.setItem(KEY, this.token);
    return this.claims;
  },
  clear() {
    this.token = "";
    this.claims = null;
    sessionStorage.removeItem(KEY);
  },
  scopes() {
    const c = this.claims || {};
    const s = c.scope ?? c.scp ?? "";
    return Array.isArray(s) ? s.map(String) : String(s).split(/\s+/).filter(Boolean);
  },
  can(scope) {
    const s = this.scopes();
    return s.includes("admin") || s.includes(scope);
  },
};
if (auth.token) auth.claims = decode(auth.token);

/** The JWT's claims (not verified: the server does that), or null when it is not a JWT. */
export function decode(token) {
  const parts = token.split(".");
  if (parts.length !== 3) return null;
  try {
    const b64 = parts[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = atob(b64 + "=".repeat((4 - (b64.length % 4)) % 4));
    const claims = JSON.parse(new TextDecoder().decode(Uint8Array.from(json, (c) => c.charCodeAt(0))));
    return claims && typeof claims === "object" ? claims : null;
  } catch {
    return null;
  }
}

export class ApiError extends Error {
  constructor(status, problem) {
    super(problem?.detail || problem?.title || `HTTP ${status}`);
    this.status = status;
    this.problem = problem || {};
    this.type = String(this.problem.type || "").replace("urn:ferry:problem:", "");
  }
}

export async function api(method, path, body) {
  const init = { method, headers: { Authorization: `Bearer ${auth.token}` } };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, { detail: `gateway unreachable: ${e.message}` });
  }
  const ct = res.headers.get("content-type") || "";
  const data = ct.includes("json") ? await res.json().catch(() => null) : null;
  if (!res.ok) {
    const err = new ApiError(res.status, data);
    if (res.status === 401) window.dispatchEvent(new CustomEvent("ferry:unauthorized", { detail: err.message }));
    throw err;
  }
  return data;
}

export const q = (s) => encodeURIComponent(s);

/** One WebSocket, reconnected with backoff; channels are re-subscribed after each reconnect. */
export class Live {
  constructor(onEvent, onState) {
    this.onEvent = onEvent;
    this.onState = onState;
    this.channels = new Set();
    this.pending = new Map();
    this.seq = 0;
    this.ws = null;
    this.backoff = 500;
    this.stopped = true;
  }
  start() {
    this.stopped = false;
    this.connect();
  }
  stop() {
    this.stopped = true;
    if (this.ws) this.ws.close(1000);
    this.ws = null;
  }
  connect() {
    if (this.stopped) return;
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/v1/ws?token=${q(auth.token)}`);
    this.ws = ws;
    ws.onopen = () => {
      this.backoff = 500;
      this.onState(true);
      for (const ch of this.channels) this.send({ op: "subscribe", channel: ch }).catch(() => {});
    };
    ws.onmessage = (m) => {
      let f;
      try {
        f = JSON.parse(m.data);
      } catch {
        return;
      }
      if (f.id && this.pending.has(f.id)) {
        const { resolve, reject } = this.pending.get(f.id);
        this.pending.delete(f.id);
        f.ok ? resolve(f) : reject(new Error(f.error?.message || "refused"));
      } else if (f.channel && f.event) {
        this.onEvent(f);
      }
    };
    ws.onclose = () => {
      if (this.ws !== ws) return;
      this.onState(false);
      for (const { reject } of this.pending.values()) reject(new Error("disconnected"));
      this.pending.clear();
      if (!this.stopped) {
        setTimeout(() => this.connect(), this.backoff);
        this.backoff = Math.min(this.backoff * 2, 15000);
      }
    };
  }
  send(frame) {
    const ws = this.ws;
    if (!ws || ws.readyState !== WebSocket.OPEN) return Promise.reject(new Error("not connected"));
    const id = `ui-${++this.seq}`;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      ws.send(JSON.stringify({ id, ...frame }));
    });
  }
  subscribe(channel) {
    if (this.channels.has(channel)) return;
    this.channels.add(channel);
    this.send({ op: "subscribe", channel }).catch(() => {});
  }
  unsubscribe(channel) {
    if (!this.channels.delete(channel)) return;
    this.send({ op: "unsubscribe", channel }).catch(() => {});
  }
}
