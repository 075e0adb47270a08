export { FerryClient, type FerryClientOptions, type SubmitAndWaitOptions, type CompletedJob } from "./client.js";
export { FerryError, FerryWsError, FerryJobError, type Problem } from "./errors.js";
export type * from "./http.js";
export type {
  WebSocketLike,
  WebSocketCtor,
  PushedFrame,
  JobEventData,
  RecoveryInfo,
  SessionState,
  Position,
  SubscribeOptions,
} from "./ws.js";
export type { Session } from "./ws.js";
export { fullJitter } from "./backoff.js";
export { decodeClaims, expiresAt } from "./jwt.js";
export type { paths, components, operations } from "./openapi.js";
