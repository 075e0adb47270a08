// Typed calls for every `/v1` HTTP route (and the unauthenticated operations routes). Request and response types
// come from src/openapi.ts, generated from the gateway's OpenAPI document.
import type { components, operations } from "./openapi.js";
import { FerryError, type Problem } from "./errors.js";

type Schemas = components["schemas"];
export type Job = Schemas["Job"];
export type NewJob = Schemas["NewJob"];
export type Submitted = Schemas["Submitted"];
export type JobState = Schemas["JobState"];
export type QueueStats = Schemas["QueueStats"];
export type Paused = Schemas["Paused"];
export type JobEvent = Schemas["Event"];
export type Cluster = Schemas["Cluster"];
export type Autoscalers = Schemas["Autoscalers"];
export type Ready = Schemas["Ready"];

/** The JSON body of an operation's 200 or 202 answer. */
export type Ok<Op> = Op extends { responses: { 200: { content: { "application/json": infer T } } } }
  ? T
  : Op extends { responses: { 202: { content: { "application/json": infer T } } } }
    ? T
    : never;
type Query<Op> = Op extends { parameters: { query?: infer Q } } ? NonNullable<Q> : never;

export type ListJobsQuery = Query<operations["listJobs"]>;
export type JobPage = Ok<operations["listJobs"]>;
export type BatchSubmitted = Ok<operations["submitBatch"]>;
export type Cancelled = Ok<operations["cancelJob"]>;
export type Retried = Ok<operations["retryJob"]>;
export type JobEvents = Ok<operations["jobEvents"]>;
export type QueueList = Ok<operations["listQueues"]>;
export type DeadLetters = Ok<operations["deadLetters"]>;

/** Per-request headers of the submit routes. */
export interface SubmitOptions {
  /** `X-Request-Id`: becomes the job's correlation id. */
  requestId?: string;
  /** W3C `traceparent`. */
  traceparent?: string;
  signal?: AbortSignal;
}

export interface HttpOptions {
  baseUrl: string;
  token: () => string;
  fetch: typeof fetch;
}

export class Http {
  constructor(private readonly o: HttpOptions) {}

  url(path: string, query?: Record<string, string | number | undefined>): string {
    const u = new URL(path, this.o.baseUrl);
    for (const [k, v] of Object.entries(query ?? {})) {
      if (v !== undefined) u.searchParams.set(k, String(v));
    }
    return u.toString();
  }

  async request<T>(
    method: string,
    path: string,
    opts: {
      query?: Record<string, string | number | undefined>;
      body?: unknown;
      headers?: Record<string, string | undefined>;
      auth?: boolean;
      signal?: AbortSignal;
      text?: boolean;
      binary?: boolean;
    } = {},
  ): Promise<T> {
    const headers: Record<string, string> = {};
    if (opts.auth !== false) headers["Authorization"] = `Bearer ${this.o.token()}`;
    if (opts.body !== undefined) headers["Content-Type"] = "application/json";
    for (const [k, v] of Object.entries(opts.headers ?? {})) if (v !== undefined) headers[k] = v;
    const res = await this.o.fetch(this.url(path, opts.query), {
      method,
      headers,
      body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
      signal: opts.signal,
    });
    if (res.ok && opts.binary) return (await res.arrayBuffer()) as T;
    const text = await res.text();
    if (!res.ok) {
      let problem: Problem | undefined;
      try {
        problem = JSON.parse(text) as Problem;
      } catch {
        problem = undefined;
      }
      const ra = res.headers.get("Retry-After");
      throw new FerryError(res.status, problem, ra === null ? undefined : Number(ra), res.statusText || text);
    }
    if (opts.text) return text as T;
    return (text === "" ? undefined : JSON.parse(text)) as T;
  }
}

const seg = encodeURIComponent;

/** `client.jobs`: submit, read, list, cancel and retry jobs. */
export class JobsApi {
  constructor(protected readonly http: Http) {}

  /** `POST /v1/queues/{queue}/jobs` (`jobs:submit`). */
  submit(queue: string, job: NewJob, opts: SubmitOptions = {}): Promise<Submitted> {
    return this.http.request("POST", `/v1/queues/${seg(queue)}/jobs`, {
      body: job,
      headers: { "X-Request-Id": opts.requestId, traceparent: opts.traceparent },
      signal: opts.signal,
    });
  }

  /** `POST /v1/queues/{queue}/jobs/batch` (`jobs:submit`): ids in input order. */
  submitBatch(queue: string, jobs: NewJob[], opts: SubmitOptions = {}): Promise<BatchSubmitted> {
    return this.http.request("POST", `/v1/queues/${seg(queue)}/jobs/batch`, {
      body: { jobs },
      headers: { "X-Request-Id": opts.requestId, traceparent: opts.traceparent },
      signal: opts.signal,
    });
  }

  /** `GET /v1/jobs/{id}` (`jobs:read`). */
  get(id: string): Promise<Job> {
    return this.http.request("GET", `/v1/jobs/${seg(id)}`);
  }

  /** `DELETE /v1/jobs/{id}` (`jobs:cancel`). */
  cancel(id: string): Promise<Cancelled> {
    return this.http.request("DELETE", `/v1/jobs/${seg(id)}`);
  }

  /** `POST /v1/jobs/{id}/retry` (`queues:admin`): a dead job back in its queue. */
  retry(id: string): Promise<Retried> {
    return this.http.request("POST", `/v1/jobs/${seg(id)}/retry`);
  }

  /** `GET /v1/jobs?…` (`jobs:read`, needs a gateway with a database): one page. */
  list(query: ListJobsQuery = {}): Promise<JobPage> {
    return this.http.request("GET", "/v1/jobs", { query: query as Record<string, string | number | undefined> });
  }

  /** `GET /v1/jobs/{id}/events` (`jobs:read`, needs a gateway with a database): the job's audit trail. */
  events(id: string): Promise<JobEvents> {
    return this.http.request("GET", `/v1/jobs/${seg(id)}/events`);
  }
}

/** `client.queues`: figures, pause/resume, dead letters. */
export class QueuesApi {
  constructor(private readonly http: Http) {}

  /** `GET /v1/queues` (`queues:read`). */
  list(): Promise<QueueList> {
    return this.http.request("GET", "/v1/queues");
  }
  /** `GET /v1/queues/{queue}` (`queues:read`). */
  get(queue: string): Promise<QueueStats> {
    return this.http.request("GET", `/v1/queues/${seg(queue)}`);
  }
  /** `POST /v1/queues/{queue}/pause` (`queues:admin`). */
  pause(queue: string): Promise<Paused> {
    return this.http.request("POST", `/v1/queues/${seg(queue)}/pause`);
  }
  /** `POST /v1/queues/{queue}/resume` (`queues:admin`). */
  resume(queue: string): Promise<Paused> {
    return this.http.request("POST", `/v1/queues/${seg(queue)}/resume`);
  }
  /** `GET /v1/queues/{queue}/dead?limit=` (`queues:admin`), newest first. */
  dead(queue: string, opts: { limit?: number } = {}): Promise<DeadLetters> {
    return this.http.request("GET", `/v1/queues/${seg(queue)}/dead`, { query: { limit: opts.limit } });
  }
}

/** `client.channels`: publish over HTTP (`publish` scope). */
export class ChannelsApi {
  constructor(private readonly http: Http) {}
  /** `POST /v1/channels/{channel}/publish`: `channel` without its `app:` prefix (`chat`), as in the route. */
  async publish(channel: string, data: unknown): Promise<void> {
    await this.http.request("POST", `/v1/channels/${seg(channel.replace(/^app:/, ""))}/publish`, { body: data });
  }
}

/** Operations routes and the rest. */
export class OpsApi {
  constructor(private readonly http: Http) {}
  /** `GET /healthz` (no token): `"ok"`. */
  healthz(): Promise<string> {
    return this.http.request("GET", "/healthz", { auth: false, text: true });
  }
  /** `GET /readyz` (no token); a 503 (not ready, draining) is thrown as a FerryError. */
  readyz(): Promise<Ready> {
    return this.http.request("GET", "/readyz", { auth: false });
  }
  /** `GET /metrics` (no token): Prometheus text exposition. */
  metrics(): Promise<string> {
    return this.http.request("GET", "/metrics", { auth: false, text: true });
  }
  /** `GET /v1/openapi.json` (no token). */
  openapi(): Promise<Record<string, unknown>> {
    return this.http.request("GET", "/v1/openapi.json", { auth: false });
  }
  /** `GET /debug/pprof/profile?seconds=&hz=` (`admin`, gateways started with `--profiling`): a pprof protobuf. */
  profile(query: Query<operations["cpuProfile"]> = {}): Promise<ArrayBuffer> {
    return this.http.request("GET", "/debug/pprof/profile", { query, binary: true });
  }
  /** `GET /v1/cluster` (`admin`). */
  cluster(): Promise<Cluster> {
    return this.http.request("GET", "/v1/cluster");
  }
  /** `GET /v1/autoscaler` (`queues:read`): the last decisions of the autoscalers the gateway is pointed at. */
  autoscaler(): Promise<Autoscalers> {
    return this.http.request("GET", "/v1/autoscaler");
  }
}
