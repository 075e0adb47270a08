import { FerryJobError, FerryWsError } from "./errors.js";
import { ChannelsApi, Http, JobsApi, OpsApi, QueuesApi, type NewJob, type SubmitOptions } from "./http.js";
import {
  Session,
  type JobEventData,
  type PushedFrame,
  type RecoveryInfo,
  type SessionState,
  type SubscribeOptions,
  type WebSocketCtor,
} from "./ws.js";

export interface FerryClientOptions {
  /** The gateway (or balancer/load balancer), e.g. `http://127.0.0.1:8080`; `/v1/...` is appended. */
  url: string;
  /** A JWT (see `ferry token`). */
  token: string;
  /** Asked for a fresh token shortly before the current one expires (`exp`), and when the server closes the
   * WebSocket with 4001. The new token is sent as a `refresh` frame and used by later HTTP calls. */
  refreshToken?: () => string | Promise<string>;
  /** How long before `exp` to refresh (default 60 000 ms; at most half the token's remaining life). */
  refreshBeforeMs?: number;
  /** WebSocket constructor; default `globalThis.WebSocket`, else the optional peer `ws` (dynamic import). */
  WebSocket?: WebSocketCtor;
  /** fetch; default `globalThis.fetch`. */
  fetch?: typeof fetch;
  /** Reconnect delays: full jitter over `min(maxMs, baseMs × 2^attempt)` (defaults 250 and 30 000 ms). */
  reconnect?: { baseMs?: number; maxMs?: number; backoffFloorMs?: number };
  /** How long a WebSocket request (`subscribe`, `publish`, `submit`, …) waits for its reply (default 10 000 ms). */
  requestTimeoutMs?: number;
  /** A resubscription (after a reconnect) answered: `recovered: false` means frames may have been missed; refetch
   * over HTTP what you need. */
  onRecovered?: (channel: string, info: RecoveryInfo) => void;
  onStateChange?: (state: SessionState, detail?: { code?: number; reason?: string; delayMs?: number }) => void;
  onError?: (err: Error) => void;
}

export interface SubmitAndWaitOptions extends SubmitOptions {
  /** Reject with a `timeout` FerryWsError after this long (default 60 000 ms). */
  timeoutMs?: number;
}

/** A finished job as `submitAndWait` resolves it: the `job.completed` event's data, `result` always filled. */
export type CompletedJob = JobEventData & { state: "completed"; result: unknown };

class JobsWithWait extends JobsApi {
  constructor(
    http: Http,
    private readonly session: Session,
  ) {
    super(http);
  }

  /** Subscribe (the automatic `user:` channel of the token's subject), submit over HTTP, and resolve when the job
   * completes; reject with a FerryJobError when it ends dead or cancelled, with a FerryWsError `timeout` after
   * `timeoutMs`. */
  async submitAndWait(queue: string, job: NewJob, opts: SubmitAndWaitOptions = {}): Promise<CompletedJob> {
    await this.session.ready();
    let id: string | undefined;
    const early: PushedFrame<JobEventData>[] = [];
    let settle: ((f: PushedFrame<JobEventData>) => void) | undefined;
    const off = this.session.subscribe("user:", (f) => {
      const frame = f as PushedFrame<JobEventData>;
      if (id === undefined) early.push(frame);
      else if (frame.data?.id === id) settle?.(frame);
    });
    let timer: ReturnType<typeof setTimeout> | undefined;
    let offOpen: (() => void) | undefined;
    try {
      return await new Promise<CompletedJob>((resolve, reject) => {
        timer = setTimeout(
          () => reject(new FerryWsError("timeout", `job ${id ?? "(not yet submitted)"} did not finish within ${opts.timeoutMs ?? 60_000} ms`)),
          opts.timeoutMs ?? 60_000,
        );
        const finish = (state: string, data: JobEventData): boolean => {
          if (state === "completed") {
            if (data.result_omitted || !("result" in data)) {
              this.get(data.id).then((j) => resolve({ ...data, state: "completed", result: j.result }), reject);
            } else resolve(data as CompletedJob);
            return true;
          }
          if (state === "dead" || state === "cancelled") {
            if (data.error_omitted) {
              this.get(data.id).then((j) => reject(new FerryJobError(data.id, state, j.error ?? undefined)), reject);
            } else reject(new FerryJobError(data.id, state, data.error));
            return true;
          }
          return false;
        };
        settle = (f) => {
          const state = f.event.replace(/^job\./, "");
          finish(state, f.data);
        };
        // After a reconnect the job may have finished while recovery could not replay it (recovered: false):
        // look it up once over HTTP.
        const lookUp = (jobId: string) =>
          this.get(jobId).then(
            (j) =>
              finish(j.state, {
                id: j.id,
                queue: j.queue,
                kind: j.kind,
                state: j.state,
                attempt: j.attempts,
                at: j.updated_at,
                result: j.result,
                error: j.error ?? undefined,
              }),
            () => undefined,
          );
        offOpen = this.session.onOpen(() => {
          if (id !== undefined) void lookUp(id);
        });
        this.submit(queue, job, opts).then((s) => {
          id = s.id;
          for (const f of early.splice(0)) if (f.data?.id === id) settle?.(f);
          // A duplicate may have finished long ago: its events are not coming again.
          if (s.duplicate) void lookUp(s.id);
        }, reject);
      });
    } finally {
      clearTimeout(timer);
      offOpen?.();
      off();
    }
  }
}

/** The ferry client: typed HTTP calls for every `/v1` route, and one WebSocket session (connected on first use). */
export class FerryClient {
  readonly jobs: JobsWithWait;
  readonly queues: QueuesApi;
  readonly channels: ChannelsApi;
  readonly ops: OpsApi;
  /** The WebSocket session: `publish`, `submit`, `refresh`, `ping` over the connection. */
  readonly ws: Session;
  private token: string;

  constructor(opts: FerryClientOptions) {
    this.token = opts.token;
    const base = opts.url.endsWith("/") ? opts.url : `${opts.url}/`;
    const f = opts.fetch ?? globalThis.fetch.bind(globalThis);
    const http = new Http({ baseUrl: base, token: () => this.token, fetch: f });
    this.ws = new Session({
      wsBase: base.replace(/^http/, "ws"),
      getToken: () => this.token,
      setToken: (t) => {
        this.token = t;
      },
      refreshToken: opts.refreshToken,
      refreshBeforeMs: opts.refreshBeforeMs ?? 60_000,
      WebSocket: opts.WebSocket,
      reconnectBaseMs: opts.reconnect?.baseMs ?? 250,
      reconnectMaxMs: opts.reconnect?.maxMs ?? 30_000,
      backoffFloorMs: opts.reconnect?.backoffFloorMs ?? 1_000,
      requestTimeoutMs: opts.requestTimeoutMs ?? 10_000,
      onRecovered: opts.onRecovered,
      onStateChange: opts.onStateChange,
      onError: opts.onError,
    });
    this.jobs = new JobsWithWait(http, this.ws);
    this.queues = new QueuesApi(http);
    this.channels = new ChannelsApi(http);
    this.ops = new OpsApi(http);
  }

  /** Subscribe `onEvent` to `channel` over the WebSocket (connecting if needed); returns the unsubscribe function.
   * `job:<id>`, `queue:<name>`, `app:<name>`; `user:` (any suffix) is the automatic channel of your jobs.
   * `opts.since`: recover from a position your application saved (see `SubscribeOptions`). */
  subscribe(channel: string, onEvent: (frame: PushedFrame) => void, opts?: SubscribeOptions): () => void {
    return this.ws.subscribe(channel, onEvent, opts);
  }

  /** Open the WebSocket now; resolves once connected. */
  connect(): Promise<void> {
    return this.ws.ready();
  }

  /** The token HTTP calls and new connections use (the last refreshed one). */
  get currentToken(): string {
    return this.token;
  }

  /** Replace the token for later HTTP calls, and send it as a `refresh` on the open connection. */
  setToken(token: string): Promise<number> {
    return this.ws.refresh(token);
  }

  /** Close the WebSocket for good (no reconnect). HTTP calls keep working. */
  close(): void {
    this.ws.close();
  }
}
