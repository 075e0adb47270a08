import type { components } from "./openapi.js";

export type Problem = components["schemas"]["Problem"];

/** An HTTP answer other than 2xx: the problem+json body, its status and `Retry-After` (seconds) when given. */
export class FerryError extends Error {
  readonly status: number;
  readonly problem: Problem | undefined;
  readonly retryAfter: number | undefined;
  constructor(status: number, problem: Problem | undefined, retryAfter: number | undefined, fallback: string) {
    super(problem ? `${status} ${problem.title}: ${problem.detail}` : `${status} ${fallback}`);
    this.name = "FerryError";
    this.status = status;
    this.problem = problem;
    this.retryAfter = retryAfter;
  }
  /** The problem's type without its `urn:ferry:problem:` prefix (`bad-request`, `rate-limited`, ...). */
  get type(): string | undefined {
    return this.problem?.type.replace(/^urn:ferry:problem:/, "");
  }
}

/** A WebSocket request answered `{"ok": false, "error": {code, message}}`, or not answered (code `disconnected`, `timeout`). */
export class FerryWsError extends Error {
  readonly code: string;
  constructor(code: string, message: string) {
    super(`${code}: ${message}`);
    this.name = "FerryWsError";
    this.code = code;
  }
}

/** A job that ended `dead` or `cancelled` (from `submitAndWait`), with the job's error text. */
export class FerryJobError extends Error {
  readonly jobId: string;
  readonly state: "dead" | "cancelled";
  readonly jobError: string | undefined;
  constructor(jobId: string, state: "dead" | "cancelled", jobError: string | undefined) {
    super(`job ${jobId} ${state}${jobError ? `: ${jobError}` : ""}`);
    this.name = "FerryJobError";
    this.jobId = jobId;
    this.state = state;
    this.jobError = jobError;
  }
}
