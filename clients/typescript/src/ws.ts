// The WebSocket session of `/v1/ws`: one connection at a time, reconnected with full-jitter exponential backoff,
// resubscribed with `since` so missed frames are replayed (docs/api.md, "Recovery of missed frames").
import { fullJitter } from "./backoff.js";
import { FerryWsError } from "./errors.js";
import { expiresAt } from "./jwt.js";
import type { JobState, NewJob } from "./http.js";

/** The subset of the WHATWG WebSocket the session uses (browsers, Node 22+, `ws`). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  addEventListener(type: "open", l: () => void): void;
  addEventListener(type: "message", l: (ev: { data: unknown }) => void): void;
  addEventListener(type: "close", l: (ev: { code: number; reason: string }) => void): void;
  addEventListener(type: "error", l: (ev: unknown) => void): void;
}
export type WebSocketCtor = new (url: string) => WebSocketLike;

/** A pushed frame: a job event (`job.*`) or an application message (`message`). */
export interface PushedFrame<D = unknown> {
  channel: string;
  event: string;
  data: D;
  /** `"<ms>-<seq>"`, rising within the channel; absent from frames of gateways without history. */
  offset?: string;
  epoch?: string;
}

/** `data` of a `job.*` event. */
export interface JobEventData {
  id: string;
  queue: string;
  kind: string;
  state: JobState;
  attempt: number;
  at: number;
  result?: unknown;
  error?: string;
  progress?: unknown;
  run_at?: number;
  result_omitted?: boolean;
  error_omitted?: boolean;
  progress_omitted?: boolean;
}

/** A position in a channel, as every pushed frame carries it (`offset`, `epoch`). */
export interface Position {
  offset: string;
  epoch: string;
}

export interface SubscribeOptions {
  /** Recover from a position the application saved (a frame's `offset` and `epoch`): the server replays what the
   * channel's history still holds after it, and `onRecovered` says whether it reached back (`recovered: false`:
   * refetch over HTTP). Applies when this call opens the subscription (the first handler of the channel); for
   * `user:`, before the session's first connection (the connect URL carries it). */
  since?: Position;
}

/** What a (re)subscription with `since` answered. */
export interface RecoveryInfo {
  recovered: boolean;
  epoch: string | null;
  offset: string | null;
}

export type SessionState = "idle" | "connecting" | "open" | "reconnecting" | "closed";

export interface SessionOptions {
  /** `ws://` or `wss://` base (the client derives it from `url`). */
  wsBase: string;
  getToken: () => string;
  setToken: (t: string) => void;
  /** Asked for a fresh token before the current one expires, and after a 4001 close. */
  refreshToken?: () => string | Promise<string>;
  /** How long before `exp` to refresh (default 60 s, at most half the token's remaining life). */
  refreshBeforeMs: number;
  WebSocket?: WebSocketCtor;
  reconnectBaseMs: number;
  reconnectMaxMs: number;
  /** Delay floor after 4008, 4009 and 1013 (the server asked us to back off). */
  backoffFloorMs: number;
  requestTimeoutMs: number;
  onRecovered?: (channel: string, info: RecoveryInfo) => void;
  onStateChange?: (state: SessionState, detail?: { code?: number; reason?: string; delayMs?: number }) => void;
  onError?: (err: Error) => void;
}

interface ChannelState {
  handlers: Set<(f: PushedFrame) => void>;
  offset?: string;
  epoch?: string;
  /** Subscribed on the current connection (acknowledged). */
  live: boolean;
}

interface Pending {
  resolve: (v: Record<string, unknown>) => void;
  reject: (e: Error) => void;
  timer: ReturnType<typeof setTimeout>;
}

const USER = "user:";

/** `"<ms>-<seq>"` → comparable pair; undefined when malformed. */
function parseOffset(o: string | undefined): [number, number] | undefined {
  if (!o) return undefined;
  const m = /^(\d+)-(\d+)$/.exec(o);
  return m ? [Number(m[1]), Number(m[2])] : undefined;
}
function older(a: [number, number], b: [number, number]): boolean {
  return a[0] < b[0] || (a[0] === b[0] && a[1] < b[1]);
}

export class Session {
  private ws: WebSocketLike | undefined;
  private state: SessionState = "idle";
  private nextId = 1;
  private readonly pending = new Map<string, Pending>();
  private readonly channels = new Map<string, ChannelState>();
  /** The automatic `user:` channel: handlers, and the last position seen. */
  private readonly user: ChannelState = { handlers: new Set(), live: false };
  private userChannelName: string | undefined;
  private attempt = 0;
  private openedAt = 0;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  private refreshTimer: ReturnType<typeof setTimeout> | undefined;
  private goawayTimer: ReturnType<typeof setTimeout> | undefined;
  private readyWaiters: { resolve: () => void; reject: (e: Error) => void }[] = [];
  private ctor: Promise<WebSocketCtor> | undefined;
  private readonly reopenListeners = new Set<() => void>();

  constructor(private readonly o: SessionOptions) {}

  get connectionState(): SessionState {
    return this.state;
  }

  /** Connect (if not yet) and resolve once the connection is open and its `user:` channel is subscribed. */
  ready(): Promise<void> {
    if (this.state === "closed") return Promise.reject(new FerryWsError("closed", "the client is closed"));
    if (this.state === "open") return Promise.resolve();
    const p = new Promise<void>((resolve, reject) => this.readyWaiters.push({ resolve, reject }));
    if (this.state === "idle") this.connect();
    return p;
  }

  /** Register `onEvent` for `channel` (`job:<id>`, `queue:<name>`, `app:<name>`; any `user:…` means the automatic
   * channel of the token's subject). Returns the function that unsubscribes this handler. */
  subscribe(channel: string, onEvent: (f: PushedFrame) => void, opts: SubscribeOptions = {}): () => void {
    if (channel.startsWith(USER)) {
      if (opts.since && this.state === "idle" && this.user.offset === undefined) {
        this.user.offset = opts.since.offset;
        this.user.epoch = opts.since.epoch;
      }
      this.user.handlers.add(onEvent);
      if (this.state === "idle") this.connect();
      return () => this.user.handlers.delete(onEvent);
    }
    let ch = this.channels.get(channel);
    if (!ch) {
      ch = { handlers: new Set(), live: false, offset: opts.since?.offset, epoch: opts.since?.epoch };
      this.channels.set(channel, ch);
      if (this.state === "open") this.sendSubscribe(channel, ch);
    }
    ch.handlers.add(onEvent);
    if (this.state === "idle") this.connect();
    const c = ch;
    return () => {
      c.handlers.delete(onEvent);
      if (c.handlers.size === 0 && this.channels.get(channel) === c) {
        this.channels.delete(channel);
        if (this.state === "open" && c.live) {
          this.request({ op: "unsubscribe", channel }).catch(() => undefined);
        }
      }
    };
  }

  /** Call `listener` on every later (re)connection; returns the function that removes it. */
  onOpen(listener: () => void): () => void {
    this.reopenListeners.add(listener);
    return () => this.reopenListeners.delete(listener);
  }

  /** The last position seen on `channel` (what a resubscription asks to recover from). */
  position(channel: string): { offset?: string; epoch?: string } | undefined {
    const ch = channel.startsWith(USER) ? this.user : this.channels.get(channel);
    return ch ? { offset: ch.offset, epoch: ch.epoch } : undefined;
  }

  /** `publish` on the connection (`publish` scope), to `app:<name>`. */
  async publish(channel: string, data: unknown): Promise<void> {
    await this.ready();
    await this.request({ op: "publish", channel, data });
  }

  /** `submit` on the connection (`jobs:submit`). */
  async submit(queue: string, job: NewJob): Promise<{ id: string; queue: string; state: JobState; duplicate?: true }> {
    await this.ready();
    const r = await this.request({ op: "submit", queue, job });
    return r["job"] as { id: string; queue: string; state: JobState };
  }

  /** `ping` on the connection. */
  async ping(): Promise<void> {
    await this.ready();
    await this.request({ op: "ping" });
  }

  /** Send `refresh` with `token` (or one from `refreshToken`); the HTTP calls use it too. Returns the new `exp`. */
  async refresh(token?: string): Promise<number> {
    const t = token ?? (this.o.refreshToken ? await this.o.refreshToken() : undefined);
    if (!t) throw new FerryWsError("bad_request", "no token to refresh with (give one, or the refreshToken option)");
    if (this.state !== "open") {
      // Not connected: the next connection uses it.
      this.o.setToken(t);
      return (expiresAt(t) ?? 0) / 1000;
    }
    // Only a token the gateway accepted replaces the current one.
    const r = await this.request({ op: "refresh", token: t });
    this.o.setToken(t);
    this.scheduleRefresh();
    return r["exp"] as number;
  }

  /** Close for good: no reconnect; pending requests fail with `closed`. */
  close(): void {
    this.setState("closed");
    this.clearTimers();
    this.failPending("closed", "the client is closed");
    for (const w of this.readyWaiters.splice(0)) w.reject(new FerryWsError("closed", "the client is closed"));
    const ws = this.ws;
    this.ws = undefined;
    if (ws && ws.readyState <= 1) ws.close(1000, "client closed");
  }

  // --- connection ---------------------------------------------------------------------------------------------

  private async resolveCtor(): Promise<WebSocketCtor> {
    if (this.o.WebSocket) return this.o.WebSocket;
    const g = (globalThis as { WebSocket?: WebSocketCtor }).WebSocket;
    if (g) return g;
    // Node without a global WebSocket (Node 20): the optional peer `ws`. A variable specifier keeps bundlers
    // for browsers from trying to resolve it.
    const name = "ws";
    try {
      const mod = (await import(name)) as { default?: WebSocketCtor; WebSocket?: WebSocketCtor };
      const c = mod.WebSocket ?? mod.default;
      if (c) return c;
    } catch {
      // fall through
    }
    throw new FerryWsError(
      "no_websocket",
      "no WebSocket: pass the WebSocket option, run Node 22+ (or 20 with --experimental-websocket), or install ws",
    );
  }

  private connect(): void {
    if (this.state === "closed") return;
    this.setState(this.state === "idle" || this.state === "connecting" ? "connecting" : "reconnecting");
    this.ctor ??= this.resolveCtor();
    this.ctor.then(
      (Ctor) => this.open(Ctor),
      (e: Error) => {
        this.o.onError?.(e);
        for (const w of this.readyWaiters.splice(0)) w.reject(e);
        this.setState("closed");
      },
    );
  }

  private open(Ctor: WebSocketCtor): void {
    if (this.state === "closed") return;
    const u = new URL("/v1/ws", this.o.wsBase);
    u.searchParams.set("token", this.o.getToken());
    if (this.user.offset && this.user.epoch) {
      u.searchParams.set("since_offset", this.user.offset);
      u.searchParams.set("since_epoch", this.user.epoch);
    }
    let ws: WebSocketLike;
    try {
      ws = new Ctor(u.toString());
    } catch (e) {
      this.o.onError?.(e as Error);
      this.scheduleReconnect(undefined, "");
      return;
    }
    this.ws = ws;
    let goaway = false;
    ws.addEventListener("open", () => {
      if (this.ws !== ws) return;
      this.openedAt = Date.now();
      this.user.live = true;
      this.setState("open");
      for (const [name, ch] of this.channels) this.sendSubscribe(name, ch);
      this.scheduleRefresh();
      for (const w of this.readyWaiters.splice(0)) w.resolve();
      for (const l of [...this.reopenListeners]) l();
    });
    ws.addEventListener("message", (ev) => {
      if (this.ws !== ws) return;
      let f: Record<string, unknown>;
      try {
        f = JSON.parse(typeof ev.data === "string" ? ev.data : String(ev.data)) as Record<string, unknown>;
      } catch {
        return;
      }
      if (f["type"] === "goaway") {
        goaway = true;
        // The server closes with 1001 in about reconnect_after_ms; if it has not by then (plus a margin),
        // move on ourselves: recovery covers the gap.
        const after = typeof f["reconnect_after_ms"] === "number" ? f["reconnect_after_ms"] : 0;
        clearTimeout(this.goawayTimer);
        this.goawayTimer = setTimeout(() => {
          if (this.ws === ws) ws.close(1000, "goaway");
        }, after + 2000);
        return;
      }
      this.onFrame(f);
    });
    ws.addEventListener("error", () => {
      // A close event follows; nothing to do here.
    });
    ws.addEventListener("close", (ev) => {
      if (this.ws !== ws) return;
      this.ws = undefined;
      clearTimeout(this.goawayTimer);
      clearTimeout(this.refreshTimer);
      this.user.live = false;
      for (const ch of this.channels.values()) ch.live = false;
      this.failPending("disconnected", `connection closed (${ev.code}${ev.reason ? ` ${ev.reason}` : ""})`);
      if (this.state === "closed") return;
      this.scheduleReconnect(goaway && ev.code === 1000 ? 1001 : ev.code, ev.reason);
    });
  }

  private scheduleReconnect(code: number | undefined, reason: string): void {
    // A connection that stayed up a while was a success: start the backoff over.
    if (this.openedAt && Date.now() - this.openedAt > 10_000) this.attempt = 0;
    this.openedAt = 0;
    let delay: number;
    if (code === 1001) {
      // Shutdown or rebalance after a goaway: the server already spread the closes; come back soon.
      delay = fullJitter(0, Math.min(this.o.reconnectBaseMs, 250), this.o.reconnectMaxMs);
      this.attempt = 0;
    } else if (code === 4001) {
      // The token expired: ask the application for a fresh one, then reconnect at once.
      if (!this.o.refreshToken) {
        this.o.onError?.(new FerryWsError("unauthorized", "token expired (4001) and no refreshToken option"));
        this.close();
        return;
      }
      this.setState("reconnecting", { code, reason, delayMs: 0 });
      Promise.resolve(this.o.refreshToken()).then(
        (t) => {
          this.o.setToken(t);
          if (this.state !== "closed") this.connect();
        },
        (e: Error) => {
          this.o.onError?.(e);
          this.close();
        },
      );
      return;
    } else if (code === 4008 || code === 4009 || code === 1013) {
      // The server asked us to back off (flooding, slow consumer, over the connection limit).
      delay = this.o.backoffFloorMs + fullJitter(this.attempt, this.o.reconnectBaseMs, this.o.reconnectMaxMs);
      this.attempt++;
    } else {
      delay = fullJitter(this.attempt, this.o.reconnectBaseMs, this.o.reconnectMaxMs);
      this.attempt++;
    }
    this.setState("reconnecting", { code, reason, delayMs: delay });
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => this.connect(), delay);
  }

  private scheduleRefresh(): void {
    clearTimeout(this.refreshTimer);
    if (!this.o.refreshToken) return;
    const exp = expiresAt(this.o.getToken());
    if (exp === undefined) return;
    const left = exp - Date.now();
    const wait = Math.max(0, left - Math.min(this.o.refreshBeforeMs, left / 2));
    this.refreshTimer = setTimeout(() => {
      this.refresh().catch((e: Error) => this.o.onError?.(e));
    }, wait);
  }

  // --- frames -------------------------------------------------------------------------------------------------

  private sendSubscribe(channel: string, ch: ChannelState): void {
    const frame: Record<string, unknown> = { op: "subscribe", channel };
    const asked = ch.offset !== undefined && ch.epoch !== undefined;
    if (asked) frame["since"] = { offset: ch.offset, epoch: ch.epoch };
    this.request(frame).then(
      (r) => {
        if (this.channels.get(channel) !== ch) return;
        ch.live = true;
        if (asked && typeof r["recovered"] === "boolean") {
          const info = {
            recovered: r["recovered"],
            epoch: (r["epoch"] as string | null) ?? null,
            offset: (r["offset"] as string | null) ?? null,
          };
          if (info.recovered && info.epoch) ch.epoch = info.epoch;
          if (!info.recovered) {
            // The history does not reach back: carry on from the live frames of the new epoch.
            ch.offset = undefined;
            ch.epoch = undefined;
          }
          this.o.onRecovered?.(channel, info);
        }
      },
      (e: Error) => {
        if (e instanceof FerryWsError && e.code === "disconnected") return; // retried on reconnect
        this.o.onError?.(new FerryWsError((e as FerryWsError).code ?? "error", `subscribe ${channel}: ${e.message}`));
      },
    );
  }

  private onFrame(f: Record<string, unknown>): void {
    const id = f["id"];
    if (typeof id === "string" && this.pending.has(id)) {
      const p = this.pending.get(id)!;
      this.pending.delete(id);
      clearTimeout(p.timer);
      if (f["ok"] === true) p.resolve(f);
      else {
        const err = (f["error"] ?? {}) as { code?: string; message?: string };
        p.reject(new FerryWsError(err.code ?? "error", err.message ?? "request failed"));
      }
      return;
    }
    if (f["type"] === "recovery" && typeof f["channel"] === "string") {
      this.userChannelName = f["channel"];
      const info: RecoveryInfo = {
        recovered: f["recovered"] === true,
        epoch: (f["epoch"] as string | null) ?? null,
        offset: (f["offset"] as string | null) ?? null,
      };
      if (!info.recovered) {
        this.user.offset = undefined;
        this.user.epoch = undefined;
      }
      this.o.onRecovered?.(f["channel"], info);
      return;
    }
    const channel = f["channel"];
    if (typeof channel !== "string" || typeof f["event"] !== "string") return;
    const frame = f as unknown as PushedFrame;
    const isUser = channel.startsWith(USER);
    const ch = isUser ? this.user : this.channels.get(channel);
    if (!ch) return;
    if (isUser) this.userChannelName = channel;
    // Positions: drop a frame strictly older than one already seen in the same epoch (never expected: the gateway
    // replays without duplicates), and remember the last one.
    const off = parseOffset(frame.offset);
    if (off && frame.epoch !== undefined) {
      const last = parseOffset(ch.offset);
      if (last && ch.epoch === frame.epoch && older(off, last)) return;
      ch.offset = frame.offset;
      ch.epoch = frame.epoch;
    }
    for (const h of [...ch.handlers]) {
      try {
        h(frame);
      } catch (e) {
        this.o.onError?.(e as Error);
      }
    }
  }

  /** Send a frame with an id and wait for its reply. */
  request(frame: Record<string, unknown>): Promise<Record<string, unknown>> {
    const ws = this.ws;
    if (!ws || this.state !== "open") {
      return Promise.reject(new FerryWsError("disconnected", "not connected"));
    }
    const id = `c${this.nextId++}`;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(new FerryWsError("timeout", `no reply to ${String(frame["op"])} within ${this.o.requestTimeoutMs} ms`));
      }, this.o.requestTimeoutMs);
      this.pending.set(id, { resolve, reject, timer });
      ws.send(JSON.stringify({ id, ...frame }));
    });
  }

  private failPending(code: string, message: string): void {
    for (const [id, p] of this.pending) {
      clearTimeout(p.timer);
      this.pending.delete(id);
      p.reject(new FerryWsError(code, message));
    }
  }

  private clearTimers(): void {
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.refreshTimer);
    clearTimeout(this.goawayTimer);
  }

  private setState(s: SessionState, detail?: { code?: number; reason?: string; delayMs?: number }): void {
    if (this.state === "closed" && s !== "closed") return;
    const changed = this.state !== s;
    this.state = s;
    if (changed || detail) this.o.onStateChange?.(s, detail);
  }

  /** The automatic `user:` channel's name as the gateway sends it (known after its first frame). */
  get userChannel(): string | undefined {
    return this.userChannelName;
  }
}
