//! Command-line flags, each with its `FERRY_*` environment variable. These are raw strings and numbers as typed;
//! [`crate::worker`] and [`crate::enqueue`] turn them into validated configuration before anything connects.
//!
//! A flag that sets a field of a library's configuration takes its default from that library's own default
//! (`WorkerConfig::default()`, `LimitsConfig::default()`, ...), so the two cannot drift apart; the drift test
//! (`defaults.rs`) resolves every role with no optional flag and compares the result with the libraries'
//! defaults. Literals remain only where no library field exists (listen addresses, the autoscaler's interval).
//!
//! A flag whose name differs from the library field it sets carries that field's name as its id
//! (`--http-rate` is `id = "http_rate_per_sec"`; a duration's id ends in `_ms`), so an error a library
//! reports by field name finds its flag (`flag_of` in the crate root).

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use ferry_balancer::BalancerConfig;
use ferry_broker::placement::DEFAULT_EPSILON;
use ferry_broker::{ChannelHistory, EngineConfig, RedisOptions};
use ferry_gateway::config::{
    ClusterConfig, ConnectionConfig, LimitsConfig, ReadinessConfig, ResilienceConfig,
    ShutdownConfig,
};
use ferry_store::PgConfig;
use ferry_store::reconciler::ReconcilerConfig;
use ferry_store::recorder::RecorderConfig;
use ferry_worker::node::DEFAULT_READY_BUDGET;
use ferry_worker::{WebhookConfig, WorkerConfig};

/// A library default given in milliseconds on the command line. `default_value_t` shows the number in
/// `--help`; clap evaluates it when it builds the command.
fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// The store's defaults (the URL is not one of them).
fn pg() -> PgConfig {
    PgConfig::new(String::new())
}

/// The recorder's defaults (the consumer name is drawn at start).
fn recorder() -> RecorderConfig {
    RecorderConfig::new(String::new())
}

/// The reconciler's defaults (the lease holder is drawn at start).
fn reconciler() -> ReconcilerConfig {
    ReconcilerConfig::new(String::new())
}

/// The balancer's defaults (its listen address and shards are required flags).
fn balancer() -> BalancerConfig {
    BalancerConfig::new(([127, 0, 0, 1], 0).into(), Vec::new())
}

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "ferry: a job queue and realtime event cluster",
    propagate_version = true
)]
pub struct Cli {
    /// Log format: `text` for people, `json` (one object per line) for log collectors. The level comes from
    /// --log.
    #[arg(
        long,
        value_enum,
        env = "FERRY_LOG_FORMAT",
        default_value = "text",
        global = true
    )]
    pub log_format: LogFormat,

    /// Log filter: a level (`info`) and per-module directives (`info,ferry_worker=debug`). Unset, RUST_LOG is
    /// read, else `info`.
    #[arg(long, value_name = "FILTER", env = "FERRY_LOG", global = true)]
    pub log: Option<String>,

    /// Export spans to this OpenTelemetry collector over OTLP/HTTP (protobuf), e.g. `http://127.0.0.1:4318`;
    /// they are posted to <URL>/v1/traces. Unset: no export.
    #[arg(long, value_name = "URL", env = "FERRY_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,

    /// `service.name` of the exported spans. Default: `ferry-<role>` (`ferry-worker`, `ferry-gateway`, ...).
    #[arg(
        long,
        value_name = "NAME",
        env = "FERRY_OTLP_SERVICE_NAME",
        global = true
    )]
    pub otlp_service_name: Option<String>,

    /// TOML configuration file. Precedence: built-in defaults, then this file, then FERRY_* variables, then
    /// flags. Keys are the flag names (`concurrency = 20`); top-level keys apply to every role that has the
    /// flag, `[worker]` / `[gateway]` / `[dev]` / `[enqueue]` / `[migrate]` sections to one role. Unknown keys
    /// are refused.
    #[arg(long, value_name = "FILE", env = "FERRY_CONFIG", global = true)]
    pub config: Option<std::path::PathBuf>,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run gateway, worker and scheduler in one process on the embedded engine: try ferry in a minute.
    Dev(DevArgs),
    /// Run a gateway (HTTPS/WebSocket API) against Redis.
    Gateway(GatewayArgs),
    /// Run a worker: claim jobs from the given queues and run them until SIGTERM/SIGINT, then drain.
    Worker(WorkerArgs),
    /// Submit jobs straight to the broker.
    Enqueue(EnqueueArgs),
    /// Mint an HS256 token for the gateway.
    Token(TokenArgs),
    /// Apply the durable store's schema migrations to PostgreSQL (safe to repeat).
    Migrate(MigrateArgs),
    /// Size the worker fleet of each region from its queues (see docs/autoscaling.md).
    Autoscaler(AutoscalerArgs),
    /// Run a WebSocket-aware balancer in front of the gateways: each client goes to the gateway that owns its
    /// subject (see docs/balancer.md).
    Balancer(BalancerArgs),
    /// Validate a configuration (file, FERRY_* variables) for a role and print the effective settings, each with
    /// where it came from, secrets redacted.
    CheckConfig(CheckConfigArgs),
}

#[derive(Debug, Args)]
pub struct CheckConfigArgs {
    /// The role whose configuration to check.
    #[arg(long, value_enum, default_value = "worker")]
    pub role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Role {
    Dev,
    Gateway,
    Worker,
    Enqueue,
    Migrate,
    Autoscaler,
    Balancer,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Dev => "dev",
            Self::Gateway => "gateway",
            Self::Worker => "worker",
            Self::Enqueue => "enqueue",
            Self::Migrate => "migrate",
            Self::Autoscaler => "autoscaler",
            Self::Balancer => "balancer",
        }
    }
}

/// Engine settings every process touching Redis must agree on.
#[derive(Debug, Args)]
pub struct EngineArgs {
    /// Longest dead-letter list per queue; older dead jobs leave Redis (the PostgreSQL record keeps them).
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_DEAD_LETTER_MAX",
        default_value_t = EngineConfig::default().dead_letter_max
    )]
    pub dead_letter_max: usize,

    /// Hard cap of each shard's durable event log, in entries (keep --backlog-high-water well below it).
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_EVENT_LOG_MAX",
        default_value_t = EngineConfig::default().event_stream_max
    )]
    pub event_log_max: usize,

    /// How long an idempotency key is remembered.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_IDEMPOTENCY_TTL_MS",
        default_value_t = ms(EngineConfig::default().idempotency_ttl)
    )]
    pub idempotency_ttl_ms: u64,
}

/// The gateway's limits (per node).
#[derive(Debug, Args)]
pub struct LimitsArgs {
    /// Largest request body, bytes.
    #[arg(
        long,
        value_name = "BYTES",
        env = "FERRY_MAX_BODY_BYTES",
        default_value_t = LimitsConfig::default().max_body_bytes
    )]
    pub max_body_bytes: usize,
    /// Most jobs in one batch submit.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_MAX_BATCH",
        default_value_t = LimitsConfig::default().max_batch
    )]
    pub max_batch: usize,
    /// HTTP requests per second per subject, sustained.
    #[arg(
        id = "http_rate_per_sec",
        long = "http-rate",
        value_name = "N",
        env = "FERRY_HTTP_RATE",
        default_value_t = LimitsConfig::default().http_rate_per_sec
    )]
    pub http_rate: u32,
    /// HTTP request burst per subject.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_HTTP_BURST",
        default_value_t = LimitsConfig::default().http_burst
    )]
    pub http_burst: u32,
    /// WebSocket frames per second per connection, sustained.
    #[arg(
        id = "ws_rate_per_sec",
        long = "ws-rate",
        value_name = "N",
        env = "FERRY_WS_RATE",
        default_value_t = LimitsConfig::default().ws_rate_per_sec
    )]
    pub ws_rate: u32,
    /// WebSocket frame burst per connection.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_WS_BURST",
        default_value_t = LimitsConfig::default().ws_burst
    )]
    pub ws_burst: u32,
    /// WebSocket connections per node.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_MAX_CONNECTIONS",
        default_value_t = LimitsConfig::default().max_connections
    )]
    pub max_connections: usize,
    /// WebSocket connections per subject.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_MAX_CONNECTIONS_PER_SUBJECT",
        default_value_t = LimitsConfig::default().max_connections_per_subject
    )]
    pub max_connections_per_subject: usize,
    /// Largest WebSocket frame accepted, bytes.
    #[arg(
        long,
        value_name = "BYTES",
        env = "FERRY_MAX_FRAME_BYTES",
        default_value_t = LimitsConfig::default().max_frame_bytes
    )]
    pub max_frame_bytes: usize,
    /// Largest payload pushed to WebSocket subscribers, bytes (compact JSON): a publish over it is refused (413,
    /// `too_large`); a job event's result, error or progress over it is left out (`result_omitted`, …).
    #[arg(
        long,
        value_name = "BYTES",
        env = "FERRY_MAX_PUBLISH_BYTES",
        default_value_t = LimitsConfig::default().max_publish_bytes
    )]
    pub max_publish_bytes: usize,
    /// Messages queued for one connection before it is closed as a slow consumer (4009).
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_SEND_QUEUE",
        default_value_t = LimitsConfig::default().send_queue
    )]
    pub send_queue: usize,
}

/// What application channels keep for clients that reconnect (`subscribe` with `since`), and how far back any
/// channel is recovered.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Messages kept per app: channel for recovery (Redis keeps about this many: `XADD MAXLEN ~`).
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_HISTORY_SIZE",
        default_value_t = ChannelHistory::default().size
    )]
    pub history_size: usize,
    /// How long an app: channel's history lives after its last publish, and the oldest position any channel
    /// (app:, user:, job:, queue:) is recovered from.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_HISTORY_TTL_MS",
        default_value_t = ms(ChannelHistory::default().ttl)
    )]
    pub history_ttl_ms: u64,
}

/// The durable record in PostgreSQL.
#[derive(Debug, Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL of the durable record (postgres://user[:password]@host:port/db[?sslmode=...]). TLS as libpq:
    /// `sslmode=disable|prefer|require|verify-ca|verify-full`, `prefer` when absent.
    #[arg(
        long,
        value_name = "URL",
        env = "FERRY_DATABASE_URL",
        hide_env_values = true
    )]
    pub database_url: Option<String>,

    /// A read replica of the record (postgres://…, same TLS options) for listings, job lookups and audit trails;
    /// writes stay on --database-url, and reads fall back to it while the replica does not answer.
    #[arg(
        long,
        value_name = "URL",
        env = "FERRY_DATABASE_READ_URL",
        hide_env_values = true
    )]
    pub database_read_url: Option<String>,

    /// Connections in the pool.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_DATABASE_POOL_SIZE",
        default_value_t = pg().pool_size
    )]
    pub database_pool_size: usize,

    /// Longest wait to open a connection, and to get one from the pool.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_DATABASE_TIMEOUT_MS",
        default_value_t = ms(pg().connect_timeout)
    )]
    pub database_timeout_ms: u64,

    /// Longest a statement may run before PostgreSQL cancels it.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_DATABASE_STATEMENT_TIMEOUT_MS",
        default_value_t = ms(pg().statement_timeout)
    )]
    pub database_statement_timeout_ms: u64,

    /// PEM CA certificate(s) to trust for `sslmode=verify-ca|verify-full` instead of the system's roots (a
    /// private CA, or the RDS bundle); with `require`, the chain is then checked too.
    #[arg(long, value_name = "FILE", env = "FERRY_DATABASE_CA_FILE")]
    pub database_ca_file: Option<std::path::PathBuf>,

    /// Prepare statements on every use instead of caching them per connection (for poolers in transaction
    /// mode that cannot keep prepared statements).
    #[arg(long, env = "FERRY_DATABASE_NO_STATEMENT_CACHE")]
    pub database_no_statement_cache: bool,

    /// Apply schema migrations at start (as `ferry migrate` does).
    #[arg(long, env = "FERRY_MIGRATE")]
    pub migrate: bool,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Args)]
pub struct JwtArgs {
    /// Shared secret for HS256/384/512 tokens (at least 32 bytes).
    #[arg(
        long,
        value_name = "SECRET",
        env = "FERRY_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,

    /// The `kid` of --jwt-secret. Without one, the secret also verifies tokens naming a kid no other key has.
    #[arg(
        long,
        value_name = "KID",
        env = "FERRY_JWT_SECRET_KID",
        requires = "jwt_secret"
    )]
    pub jwt_secret_kid: Option<String>,

    /// PEM file with a public key (RSA, EC P-256 or Ed25519) that verifies tokens, as `FILE` or `KID=FILE`
    /// (a `=` before the first `/`); repeatable. Without a kid, the key also verifies tokens naming a kid no
    /// other key has.
    #[arg(
        long = "jwt-public-key",
        value_name = "[KID=]FILE",
        env = "FERRY_JWT_PUBLIC_KEYS",
        value_delimiter = ','
    )]
    pub jwt_public_keys: Vec<std::path::PathBuf>,

    /// JWKS file whose keys verify tokens (selected by `kid`).
    #[arg(long, value_name = "FILE", env = "FERRY_JWKS_FILE")]
    pub jwks_file: Option<std::path::PathBuf>,

    /// http(s) URL of a JWKS whose keys verify tokens (selected by `kid`); fetched at start, refreshed every 10
    /// minutes and when a token names an unknown `kid`.
    #[arg(long, value_name = "URL", env = "FERRY_JWKS_URL")]
    pub jwks_url: Option<String>,

    /// Required `iss` claim.
    #[arg(long, value_name = "ISS", env = "FERRY_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim.
    #[arg(long, value_name = "AUD", env = "FERRY_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
}

#[derive(Debug, Args)]
pub struct GatewayArgs {
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Address to listen on.
    #[arg(
        long,
        value_name = "ADDR",
        env = "FERRY_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: String,

    /// PEM certificate chain; with --tls-key, serve HTTPS/WSS.
    #[arg(
        long,
        value_name = "FILE",
        env = "FERRY_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "FERRY_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub jwt: JwtArgs,

    #[command(flatten)]
    pub limits: LimitsArgs,

    #[command(flatten)]
    pub history: HistoryArgs,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// The durable record, for `GET /v1/jobs`, a job's events, and jobs Redis no longer holds.
    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Longest wait for one Redis (and one PostgreSQL) call made for a request; past it the request is
    /// answered 503 with Retry-After.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_BROKER_TIMEOUT_MS",
        default_value_t = ms(ResilienceConfig::default().broker_timeout)
    )]
    pub broker_timeout_ms: u64,

    /// Refuse new submissions (503 overloaded, with Retry-After) while more than this many event-log entries
    /// wait for the recorder; 0 turns shedding off.
    #[arg(
        long,
        value_name = "ENTRIES",
        env = "FERRY_BACKLOG_HIGH_WATER",
        default_value_t = ResilienceConfig::default().backlog_high_water.unwrap_or(0)
    )]
    pub backlog_high_water: u64,

    /// Browser origins allowed to call the HTTP API from pages of another origin (CORS), e.g.
    /// https://app.example.com; repeat the flag or separate with commas; `*` allows any origin. Default: none
    /// (no CORS headers).
    #[arg(
        long,
        value_name = "ORIGIN",
        env = "FERRY_CORS_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origin: Vec<String>,

    /// Admin listeners of `ferry autoscaler` (e.g. http://ferry-autoscaler:9465) whose last scaling decisions
    /// GET /v1/autoscaler and the dashboard show; repeat the flag or separate with commas. Default: none.
    #[arg(
        long,
        value_name = "URL",
        env = "FERRY_AUTOSCALER_URL",
        value_delimiter = ','
    )]
    pub autoscaler_url: Vec<String>,

    /// Serve GET /debug/pprof/profile (CPU profiles in the pprof format), for tokens with the admin scope. Off by default.
    #[arg(long, env = "FERRY_PROFILING")]
    pub profiling: bool,

    #[command(flatten)]
    pub shutdown: ShutdownArgs,

    #[command(flatten)]
    pub cluster: ClusterArgs,

    #[command(flatten)]
    pub tuning: GatewayTuningArgs,
}

/// The gateway tier: membership and rebalancing of WebSocket clients.
#[derive(Debug, Args)]
pub struct ClusterArgs {
    /// Where balancers send this gateway's clients, announced in the membership (http:// or https://).
    /// Default: http://<listen address> (https:// with --tls-cert); set it when listening on 0.0.0.0.
    #[arg(long, value_name = "URL", env = "FERRY_ADVERTISE_URL")]
    pub advertise_url: Option<String>,

    /// Region announced in the membership (free text, e.g. eu-west-1).
    #[arg(long, value_name = "NAME", env = "FERRY_REGION")]
    pub region: Option<String>,

    /// ε of the load bound of placement: no gateway above ceil((1 + ε) × mean) WebSocket connections.
    /// Give every gateway and balancer the same value.
    #[arg(
        long,
        value_name = "EPSILON",
        env = "FERRY_BALANCE_EPSILON",
        default_value_t = DEFAULT_EPSILON
    )]
    pub balance_epsilon: f64,

    /// How often the gateway announces itself in the membership and rebalances its WebSocket clients.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_HEARTBEAT_MS",
        default_value_t = ms(ClusterConfig::default().heartbeat)
    )]
    pub heartbeat_ms: u64,

    /// How long one announcement lasts: a gateway that stops announcing (killed) leaves the membership after
    /// it. Must exceed --heartbeat-ms.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_MEMBERSHIP_TTL_MS",
        default_value_t = ms(ClusterConfig::default().membership_ttl)
    )]
    pub membership_ttl_ms: u64,

    /// Rebalancing reconnects per second for the whole cluster, shared by the eligible gateways; 0 turns
    /// rebalancing off.
    #[arg(
        long,
        value_name = "PER_SEC",
        env = "FERRY_REBALANCE_RATE",
        default_value_t = ClusterConfig::default().rebalance_rate
    )]
    pub rebalance_rate: u32,

    /// A WebSocket connection younger than this is never moved by rebalancing (no client moves twice within it).
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_REBALANCE_COOLDOWN_MS",
        default_value_t = ms(ClusterConfig::default().rebalance_cooldown)
    )]
    pub rebalance_cooldown_ms: u64,
}

/// How the gateway drains on SIGTERM/SIGINT.
#[derive(Debug, Args)]
pub struct ShutdownArgs {
    /// After SIGTERM/SIGINT, how long /readyz answers 503 while everything is still served, so load balancers
    /// stop sending before the listener closes.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_DRAIN_DELAY_MS",
        default_value_t = ms(ShutdownConfig::default().drain_delay)
    )]
    pub drain_delay_ms: u64,

    /// WebSocket clients are told to go away, then each is closed (1001) after its own delay within this
    /// window, so they do not all reconnect at once.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_WS_CLOSE_SPREAD_MS",
        default_value_t = ms(ShutdownConfig::default().ws_close_spread)
    )]
    pub ws_close_spread_ms: u64,

    /// Longest the whole drain may take after the signal; past it the process reports what was still open
    /// and exits 70. Must exceed --drain-delay-ms + --ws-close-spread-ms.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_SHUTDOWN_DEADLINE_MS",
        default_value_t = ms(ShutdownConfig::default().hard_deadline)
    )]
    pub shutdown_deadline_ms: u64,
}

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Address to listen on.
    #[arg(
        long,
        value_name = "ADDR",
        env = "FERRY_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: String,

    /// Shared secret for tokens; when absent one is generated and an admin token printed.
    #[arg(
        long,
        value_name = "SECRET",
        env = "FERRY_JWT_SECRET",
        hide_env_values = true
    )]
    pub jwt_secret: Option<String>,

    /// Queues the embedded worker serves (comma-separated).
    #[arg(
        long,
        value_name = "Q1,Q2",
        env = "FERRY_QUEUES",
        value_delimiter = ',',
        default_value = "default"
    )]
    pub queues: Vec<String>,

    /// Jobs run at once per queue by the embedded worker.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_CONCURRENCY",
        default_value_t = WorkerConfig::default().concurrency
    )]
    pub concurrency: usize,

    /// Browser origins allowed to call the HTTP API from pages of another origin (CORS), e.g.
    /// https://app.example.com; repeat the flag or separate with commas; `*` allows any origin. Default: none
    /// (no CORS headers).
    #[arg(
        long,
        value_name = "ORIGIN",
        env = "FERRY_CORS_ORIGIN",
        value_delimiter = ','
    )]
    pub cors_origin: Vec<String>,

    /// Serve GET /debug/pprof/profile (CPU profiles in the pprof format) on the gateway, for tokens with the admin scope. Off by default.
    #[arg(long, env = "FERRY_PROFILING")]
    pub profiling: bool,

    /// Failed authentications per second per client IP, HTTP requests and WebSocket upgrades alike; past it
    /// they are answered 429 (as `ferry gateway --unauth-upgrade-rate`).
    #[arg(
        id = "unauth_upgrades_per_sec_per_ip",
        long = "unauth-upgrade-rate",
        value_name = "N",
        env = "FERRY_UNAUTH_UPGRADE_RATE",
        default_value_t = LimitsConfig::default().unauth_upgrades_per_sec_per_ip
    )]
    pub unauth_upgrade_rate: u32,

    #[command(flatten)]
    pub history: HistoryArgs,

    #[command(flatten)]
    pub shutdown: ShutdownArgs,
}

#[derive(Debug, Args)]
pub struct TokenArgs {
    /// The token's subject (`sub`): who it is for.
    #[arg(long, value_name = "SUB")]
    pub sub: String,

    /// Space-separated scopes: jobs:submit jobs:read jobs:cancel queues:read queues:admin publish subscribe
    /// admin.
    #[arg(long, value_name = "SCOPES", default_value = "jobs:submit jobs:read")]
    pub scope: String,

    /// Lifetime: a number with s, m, h or d (e.g. 90s, 30m, 1h, 7d).
    #[arg(long, value_name = "TTL", default_value = "1h")]
    pub ttl: String,

    /// Tenant the token belongs to.
    #[arg(long, value_name = "TENANT")]
    pub tenant: Option<String>,

    /// The gateway's shared secret.
    #[arg(
        long,
        value_name = "SECRET",
        env = "FERRY_JWT_SECRET",
        hide_env_values = true
    )]
    pub secret: String,

    /// `iss` claim to include.
    #[arg(long, value_name = "ISS", env = "FERRY_JWT_ISSUER")]
    pub issuer: Option<String>,

    /// `aud` claim to include.
    #[arg(long, value_name = "AUD", env = "FERRY_JWT_AUDIENCE")]
    pub audience: Option<String>,

    #[command(flatten)]
    pub unused: Untraced,
}

/// The process-wide logging and span-export flags, for a command that neither logs nor exports spans
/// (`ferry token`). Declared under the global flags' ids, they take their place (clap does not propagate a global
/// flag to a subcommand that has its own), so `ferry token --help` lists only what minting a token uses; hidden,
/// without their variables, they are still accepted on the command line and ignored.
#[derive(Debug, Args)]
pub struct Untraced {
    #[arg(long, value_enum, hide = true)]
    pub log_format: Option<LogFormat>,
    #[arg(long, hide = true)]
    pub log: Option<String>,
    #[arg(long, hide = true)]
    pub otlp_endpoint: Option<String>,
    #[arg(long, hide = true)]
    pub otlp_service_name: Option<String>,
}

#[derive(Debug, Args)]
pub struct RedisArgs {
    /// Redis shard URL (redis://host:port[/db], rediss:// for TLS); repeat for several shards, over which queues
    /// are spread by rendezvous hashing of queue names. Every process of a cluster must list the same shards
    /// (order does not matter; redis:// and rediss:// name the same shard).
    #[arg(
        long = "redis",
        value_name = "URL",
        env = "FERRY_REDIS_URLS",
        value_delimiter = ',',
        required_unless_present = "redis_cluster",
        conflicts_with = "redis_cluster"
    )]
    pub redis: Vec<String>,

    /// A Redis Cluster instead of standalone shards: the URL (redis://host:port) of one or more of its nodes,
    /// from which the rest are found. Queues are spread over the cluster's slots in virtual shards
    /// (docs/sharding.md). Every process of a ferry cluster must use the same Redis Cluster.
    #[arg(
        long = "redis-cluster",
        value_name = "URL",
        env = "FERRY_REDIS_CLUSTER",
        value_delimiter = ','
    )]
    pub redis_cluster: Vec<String>,

    /// How many virtual shards queues are spread over on a Redis Cluster. Fixed for the cluster's life: the
    /// first ferry records it there, and a process started with another count is refused.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_REDIS_CLUSTER_VSHARDS",
        default_value_t = ferry_broker::DEFAULT_VSHARDS
    )]
    pub redis_cluster_vshards: usize,

    /// Longest wait for a Redis reply (blocking reads excepted); a slower reply fails the call, which is
    /// retried or reported, and retires its connection (later calls use a new one).
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_REDIS_TIMEOUT_MS",
        default_value_t = ms(RedisOptions::default().response_timeout)
    )]
    pub redis_timeout_ms: u64,

    /// Longest wait to open a connection to a Redis shard.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_REDIS_CONNECT_TIMEOUT_MS",
        default_value_t = ms(RedisOptions::default().connection_timeout)
    )]
    pub redis_connect_timeout_ms: u64,

    /// PEM CA certificate(s) to trust for `rediss://` shards instead of the system's roots (a private CA). The
    /// server certificate is always verified, host name included.
    #[arg(long, value_name = "FILE", env = "FERRY_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Args)]
pub struct WorkerArgs {
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Queues to work on, comma-separated.
    #[arg(
        long,
        value_name = "Q1,Q2",
        env = "FERRY_QUEUES",
        value_delimiter = ',',
        required = true
    )]
    pub queues: Vec<String>,

    /// Most jobs running at once per queue.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_CONCURRENCY",
        default_value_t = WorkerConfig::default().concurrency
    )]
    pub concurrency: usize,

    /// Per-queue concurrency override, QUEUE=N; repeatable or comma-separated.
    #[arg(
        long,
        value_name = "QUEUE=N",
        env = "FERRY_QUEUE_CONCURRENCY",
        value_delimiter = ','
    )]
    pub queue_concurrency: Vec<String>,

    /// Most jobs claimed in one call (never more than the free slots).
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_BATCH_SIZE",
        default_value_t = WorkerConfig::default().batch_size
    )]
    pub batch_size: usize,

    /// Longest a claim waits for work; bounds how long shutdown takes to notice.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_CLAIM_WAIT_MS",
        default_value_t = ms(WorkerConfig::default().claim_wait)
    )]
    pub claim_wait_ms: u64,

    /// Time limit of an attempt whose job sets no timeout.
    #[arg(
        id = "default_job_timeout_ms",
        long = "job-timeout-ms",
        value_name = "MS",
        env = "FERRY_JOB_TIMEOUT_MS",
        default_value_t = ms(WorkerConfig::default().default_job_timeout)
    )]
    pub job_timeout_ms: u64,

    /// A job not heartbeated for this long is reclaimed by another worker. Every worker of a cluster should use
    /// the same value.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_VISIBILITY_TIMEOUT_MS",
        default_value_t = ms(WorkerConfig::default().visibility_timeout)
    )]
    pub visibility_timeout_ms: u64,

    /// Heartbeat period for leases held (default: a third of the visibility timeout).
    #[arg(long, value_name = "MS", env = "FERRY_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u64>,

    /// Outcomes sent to the broker in one call.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_ACK_BATCH_SIZE",
        default_value_t = WorkerConfig::default().ack_batch_size
    )]
    pub ack_batch_size: usize,

    /// Extra time an outcome may wait for its batch to fill (0: send whatever is waiting).
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_ACK_MAX_DELAY_MS",
        default_value_t = ms(WorkerConfig::default().ack_max_delay)
    )]
    pub ack_max_delay_ms: u64,

    /// Acknowledgement calls in flight at once.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_ACK_CONCURRENCY",
        default_value_t = WorkerConfig::default().ack_concurrency
    )]
    pub ack_concurrency: usize,

    /// How often due jobs are promoted and expired leases reclaimed.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_SCHEDULER_INTERVAL_MS",
        default_value_t = ms(WorkerConfig::default().scheduler_interval)
    )]
    pub scheduler_interval_ms: u64,

    /// How often stream trimming and retention run.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_MAINTAIN_INTERVAL_MS",
        default_value_t = ms(WorkerConfig::default().maintain_interval)
    )]
    pub maintain_interval_ms: u64,

    /// On shutdown, how long running jobs may finish before they are cancelled and released.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_DRAIN_TIMEOUT_MS",
        default_value_t = ms(WorkerConfig::default().drain_timeout)
    )]
    pub drain_timeout_ms: u64,

    /// How long finished jobs stay in Redis for lookups. With --database-url, completed and cancelled jobs
    /// leave as soon as they are recorded instead, and lookups find them in the record.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_FINISHED_RETENTION_MS",
        default_value_t = ms(EngineConfig::default().finished_retention)
    )]
    pub finished_retention_ms: u64,

    /// Consumer name in the broker (default: <hostname>-<pid>-<random>).
    #[arg(long, value_name = "NAME", env = "FERRY_CONSUMER")]
    pub consumer: Option<String>,

    /// Drain and stop when the parent process goes away (set by the autoscaler's local actuator, so its
    /// workers do not outlive it).
    #[arg(long, hide = true)]
    pub exit_with_parent: bool,

    /// Admin listener serving /metrics, /healthz and /readyz, HOST:PORT; `off` disables it.
    #[arg(
        long,
        value_name = "ADDR",
        env = "FERRY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub admin_listen: String,

    /// Serve GET /debug/pprof/profile (CPU profiles in the pprof format) on the admin listener, which has no authentication: keep it on a private address. Off by default.
    #[arg(long, env = "FERRY_PROFILING")]
    pub profiling: bool,

    /// Run jobs of KIND by POSTing them to URL, KIND=URL; repeatable or comma-separated.
    #[arg(
        long,
        value_name = "KIND=URL",
        env = "FERRY_WEBHOOKS",
        value_delimiter = ','
    )]
    pub webhook: Vec<String>,

    /// Per-request time limit of webhooks.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_WEBHOOK_TIMEOUT_MS",
        default_value_t = ms(WebhookConfig::new(String::new()).timeout)
    )]
    pub webhook_timeout_ms: u64,

    /// Header sent with every webhook request, "Name: value"; repeatable (the variable holds one header).
    #[arg(long, value_name = "HEADER", env = "FERRY_WEBHOOK_HEADER")]
    pub webhook_header: Vec<String>,

    #[command(flatten)]
    pub database: DatabaseArgs,

    #[command(flatten)]
    pub engine: EngineArgs,

    /// Do not run the recorder (which copies job events into PostgreSQL) in this worker.
    #[arg(long, env = "FERRY_NO_RECORDER")]
    pub no_recorder: bool,

    /// Most events the recorder writes in one transaction.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_RECORDER_BATCH",
        default_value_t = recorder().batch_max
    )]
    pub recorder_batch: usize,

    /// Most bytes of events (as logged; a `job.queued` event carries its payload) the recorder gathers in one
    /// batch.
    #[arg(
        long,
        value_name = "BYTES",
        env = "FERRY_RECORDER_BATCH_BYTES",
        default_value_t = recorder().batch_max_bytes
    )]
    pub recorder_batch_bytes: usize,

    /// Longest an event waits in the recorder's batch before it is written.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_RECORDER_MAX_DELAY_MS",
        default_value_t = ms(recorder().max_delay)
    )]
    pub recorder_max_delay_ms: u64,

    /// Events read by a recorder and not acknowledged for this long are taken over by another recorder (the
    /// first one died); checked every quarter of it. Must exceed the recorder's max delay + 2 × its write timeout
    /// + 1 s.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_RECORDER_RECLAIM_IDLE_MS",
        default_value_t = ms(recorder().reclaim_idle)
    )]
    pub recorder_reclaim_idle_ms: u64,

    /// How often one worker (whichever takes the lease in Redis) puts back jobs that PostgreSQL holds as not
    /// finished and Redis has lost (a crash that dropped the AOF's last second, a failover to a replica that
    /// lagged); 0 turns the reconciler off. Needs --database-url.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_RECONCILE_INTERVAL_MS",
        default_value_t = ms(reconciler().interval)
    )]
    pub reconcile_interval_ms: u64,

    /// The reconciler looks at a job once its PostgreSQL record has not moved for this long (so a record that
    /// is merely behind is left alone).
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_RECONCILE_GRACE_MS",
        default_value_t = ms(reconciler().grace)
    )]
    pub reconcile_grace_ms: u64,

    /// Keep finished jobs and their events in PostgreSQL this long after they finished (`30d`, `12h`), then drop
    /// them with their time partition; jobs not finished are kept whatever their age. Unset: keep everything.
    #[arg(long, value_name = "DURATION", env = "FERRY_RECORD_RETENTION")]
    pub record_retention: Option<String>,

    /// Length of the record's time partitions (`1d`, `6h`; at least an hour), for partitions created from now on.
    #[arg(
        long,
        value_name = "DURATION",
        env = "FERRY_RECORD_PARTITION_WIDTH",
        default_value = "1d"
    )]
    pub record_partition_width: String,

    #[command(flatten)]
    pub recorder_tuning: RecorderTuningArgs,

    #[command(flatten)]
    pub tuning: WorkerTuningArgs,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PriorityArg {
    High,
    Normal,
    Low,
}

#[derive(Debug, Args)]
pub struct EnqueueArgs {
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Queue to submit to.
    #[arg(long, value_name = "QUEUE", env = "FERRY_QUEUE")]
    pub queue: String,

    /// Job kind (which handler runs it), e.g. ferry.echo.
    #[arg(long, value_name = "KIND", env = "FERRY_KIND")]
    pub kind: String,

    /// Job payload, as JSON.
    #[arg(
        long,
        value_name = "JSON",
        env = "FERRY_PAYLOAD",
        default_value = "null"
    )]
    pub payload: String,

    /// Submit this many copies and print a summary line instead of the ids.
    #[arg(long, value_name = "N", env = "FERRY_COUNT")]
    pub count: Option<u64>,

    #[arg(long, value_enum, env = "FERRY_PRIORITY", default_value = "normal")]
    pub priority: PriorityArg,

    /// Run no earlier than this many milliseconds from now.
    #[arg(long, value_name = "MS", env = "FERRY_DELAY_MS")]
    pub delay_ms: Option<u64>,

    /// Attempts before the job is dead (default 3).
    #[arg(long, value_name = "N", env = "FERRY_MAX_ATTEMPTS")]
    pub max_attempts: Option<u32>,

    /// Per-attempt time limit (default: the worker's).
    #[arg(long, value_name = "MS", env = "FERRY_TIMEOUT_MS")]
    pub timeout_ms: Option<u64>,

    /// A second submit with the same key returns the first job's id.
    #[arg(long, value_name = "KEY", env = "FERRY_IDEMPOTENCY_KEY")]
    pub idempotency_key: Option<String>,
}

/// Worker settings an operator rarely changes: timeouts of the drain and of broker calls.
#[derive(Debug, Args)]
pub struct WorkerTuningArgs {
    /// On shutdown, how long a cancelled job's handler gets to return before it is dropped.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_CANCEL_GRACE_MS",
        default_value_t = ms(WorkerConfig::default().cancel_grace)
    )]
    pub cancel_grace_ms: u64,

    /// After the drain, how long outcomes not yet delivered to Redis may still be retried.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_FLUSH_TIMEOUT_MS",
        default_value_t = ms(WorkerConfig::default().flush_timeout)
    )]
    pub flush_timeout_ms: u64,

    /// Longest the whole shutdown may take after SIGTERM/SIGINT; past it the worker logs the jobs it still
    /// holds and exits 70. Default: --drain-timeout-ms + --cancel-grace-ms + --flush-timeout-ms + 10 s.
    #[arg(long, value_name = "MS", env = "FERRY_SHUTDOWN_DEADLINE_MS")]
    pub shutdown_deadline_ms: Option<u64>,

    /// Client-side limit of one broker call made by the worker's loops.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_BROKER_CALL_TIMEOUT_MS",
        default_value_t = ms(WorkerConfig::default().broker_call_timeout)
    )]
    pub broker_call_timeout_ms: u64,

    /// Cap of the exponential backoff between retries of a failing broker call.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_RETRY_MAX_DELAY_MS",
        default_value_t = ms(WorkerConfig::default().retry_max_delay)
    )]
    pub retry_max_delay_ms: u64,

    /// How long a batch of outcomes is retried while Redis is unreachable before it is given up (its jobs are
    /// redelivered once their leases expire). Default: --visibility-timeout-ms.
    #[arg(long, value_name = "MS", env = "FERRY_ACK_RETRY_TIMEOUT_MS")]
    pub ack_retry_timeout_ms: Option<u64>,

    /// Most jobs promoted (due) or reclaimed (expired lease) per queue in one scheduler call.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_SCHEDULER_BATCH",
        default_value_t = WorkerConfig::default().scheduler_batch
    )]
    pub scheduler_batch: usize,

    /// How often the queue gauges (ferry_queue_*) are refreshed from Redis.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_QUEUE_METRICS_INTERVAL_MS",
        default_value_t = ms(WorkerConfig::default().queue_metrics_interval)
    )]
    pub queue_metrics_interval_ms: u64,

    /// Longest wait for each /readyz check of the admin listener (Redis, PostgreSQL).
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_READY_BUDGET_MS",
        default_value_t = ms(DEFAULT_READY_BUDGET)
    )]
    pub ready_budget_ms: u64,
}

/// The recorder's less common settings.
#[derive(Debug, Args)]
pub struct RecorderTuningArgs {
    /// Event-log entries the recorder asks for in one read.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_RECORDER_READ_COUNT",
        default_value_t = recorder().read_count
    )]
    pub recorder_read_count: usize,

    /// Transactions in flight at once per shard.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_RECORDER_WRITERS",
        default_value_t = recorder().writers
    )]
    pub recorder_writers: usize,

    /// Longest one write to PostgreSQL may take before it counts as failed (bounded by the reclaim idle time).
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_RECORDER_WRITE_TIMEOUT_MS",
        default_value_t = ms(recorder().write_timeout)
    )]
    pub recorder_write_timeout_ms: u64,

    /// Consecutive failed writes that open the recorder's circuit breaker (it then stops reading and probes).
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_RECORDER_BREAKER_FAILURES",
        default_value_t = recorder().breaker.failure_threshold
    )]
    pub recorder_breaker_failures: u32,

    /// How long the recorder's breaker stays open before a probe write.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_RECORDER_BREAKER_OPEN_MS",
        default_value_t = ms(recorder().breaker.open_for)
    )]
    pub recorder_breaker_open_ms: u64,
}

/// Gateway settings an operator rarely changes: dependency protection, readiness and WebSocket keep-alive.
#[derive(Debug, Args)]
pub struct GatewayTuningArgs {
    /// Longest wait for one PostgreSQL call made for a request; past it the request is answered 503.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_STORE_TIMEOUT_MS",
        default_value_t = ms(ResilienceConfig::default().store_timeout)
    )]
    pub store_timeout_ms: u64,

    /// Consecutive failed calls that open the circuit breaker of Redis, or of PostgreSQL (requests needing it
    /// are then answered 503 at once).
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_BREAKER_FAILURES",
        default_value_t = ResilienceConfig::default().broker_breaker.failure_threshold
    )]
    pub breaker_failures: u32,

    /// How long an open breaker refuses calls before one probe goes through.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_BREAKER_OPEN_MS",
        default_value_t = ms(ResilienceConfig::default().broker_breaker.open_for)
    )]
    pub breaker_open_ms: u64,

    /// How often the recorder's event-log backlog is read for shedding.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_BACKLOG_POLL_MS",
        default_value_t = ms(ResilienceConfig::default().backlog_poll)
    )]
    pub backlog_poll_ms: u64,

    /// Longest wait for the pub/sub canary of /readyz (a message sent through every shard and back).
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_CANARY_BUDGET_MS",
        default_value_t = ms(ReadinessConfig::default().pubsub_budget)
    )]
    pub canary_budget_ms: u64,

    /// WebSocket ping period; a client that answers none of two pings is dropped.
    #[arg(
        id = "ping_interval_ms",
        long = "ws-ping-interval-ms",
        value_name = "MS",
        env = "FERRY_WS_PING_INTERVAL_MS",
        default_value_t = ms(LimitsConfig::default().ping_interval)
    )]
    pub ws_ping_interval_ms: u64,

    /// Channels one WebSocket connection may subscribe to.
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_MAX_SUBSCRIPTIONS",
        default_value_t = LimitsConfig::default().max_subscriptions
    )]
    pub max_subscriptions: usize,

    /// Rate-limited WebSocket frames in a row before the connection is closed (4008).
    #[arg(
        id = "ws_sustained_violations",
        long = "ws-rate-violations",
        value_name = "N",
        env = "FERRY_WS_RATE_VIOLATIONS",
        default_value_t = LimitsConfig::default().ws_sustained_violations
    )]
    pub ws_rate_violations: u32,

    /// Failed authentications per second per client IP, HTTP requests and WebSocket upgrades alike; past it
    /// they are answered 429.
    #[arg(
        id = "unauth_upgrades_per_sec_per_ip",
        long = "unauth-upgrade-rate",
        value_name = "N",
        env = "FERRY_UNAUTH_UPGRADE_RATE",
        default_value_t = LimitsConfig::default().unauth_upgrades_per_sec_per_ip
    )]
    pub unauth_upgrade_rate: u32,

    /// Time a new connection has to send its first request's headers (TLS handshake included), and a
    /// kept-alive one to finish a request's headers after their first byte; past it the connection is closed.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_HEADER_TIMEOUT_MS",
        default_value_t = ms(ConnectionConfig::default().header_timeout)
    )]
    pub header_timeout_ms: u64,

    /// Time a request body has to arrive, from the end of its headers; past it 408 and the connection closes.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_BODY_TIMEOUT_MS",
        default_value_t = ms(ConnectionConfig::default().body_timeout)
    )]
    pub body_timeout_ms: u64,

    /// A kept-alive HTTP connection with no request in flight is closed after this (not WebSockets).
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_IDLE_TIMEOUT_MS",
        default_value_t = ms(ConnectionConfig::default().idle_timeout)
    )]
    pub idle_timeout_ms: u64,

    /// Connections on this node that have not yet completed an authenticated request or upgrade; past it new
    /// ones get only /healthz and /readyz (429 otherwise). Keep it well under the open-file limit.
    #[arg(
        id = "max_unauthenticated",
        long = "max-unauthenticated-connections",
        value_name = "N",
        env = "FERRY_MAX_UNAUTHENTICATED_CONNECTIONS",
        default_value_t = ConnectionConfig::default().max_unauthenticated
    )]
    pub max_unauthenticated_connections: usize,

    /// The same per client address (behind a proxy every client has the proxy's address: raise it there).
    #[arg(
        long,
        value_name = "N",
        env = "FERRY_MAX_UNAUTHENTICATED_PER_IP",
        default_value_t = ConnectionConfig::default().max_unauthenticated_per_ip
    )]
    pub max_unauthenticated_per_ip: usize,
}

#[derive(Debug, Args)]
pub struct AutoscalerArgs {
    /// The regions file (TOML): each region's Redis shards, queues, policy and actuator.
    #[arg(long, value_name = "FILE", env = "FERRY_AUTOSCALER_REGIONS")]
    pub regions: std::path::PathBuf,

    /// How often the queues are read and a decision made.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_AUTOSCALER_INTERVAL_MS",
        default_value_t = 5_000
    )]
    pub interval_ms: u64,

    /// Print (log) every decision with its inputs without acting on it.
    #[arg(long, env = "FERRY_DRY_RUN")]
    pub dry_run: bool,

    /// Admin listener serving /metrics (the ferry_autoscaler_* series), /healthz and /readyz, HOST:PORT; `off`
    /// disables it.
    #[arg(
        long,
        value_name = "ADDR",
        env = "FERRY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9465"
    )]
    pub admin_listen: String,

    /// PEM CA certificate(s) to trust for the regions' `rediss://` shards instead of the system's roots.
    #[arg(long, value_name = "FILE", env = "FERRY_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,

    #[command(flatten)]
    pub engine: EngineArgs,
}

#[derive(Debug, Args)]
pub struct BalancerArgs {
    /// The Redis shards of the cluster (the membership lives on the one that `ferry:gw` hashes to).
    #[command(flatten)]
    pub redis: RedisArgs,

    /// Address to listen on for clients (HTTP and WebSocket, or HTTPS/WSS with --tls-cert).
    #[arg(
        long,
        value_name = "ADDR",
        env = "FERRY_LISTEN",
        default_value = "127.0.0.1:8000"
    )]
    pub listen: String,

    /// PEM certificate chain; with --tls-key, terminate TLS (clients speak HTTPS/WSS to the balancer).
    #[arg(
        long,
        value_name = "FILE",
        env = "FERRY_TLS_CERT",
        requires = "tls_key"
    )]
    pub tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of --tls-cert.
    #[arg(
        long,
        value_name = "FILE",
        env = "FERRY_TLS_KEY",
        requires = "tls_cert"
    )]
    pub tls_key: Option<std::path::PathBuf>,

    /// PEM CA certificate(s) trusted for gateways that advertise https:// URLs, instead of the system's roots.
    #[arg(long, value_name = "FILE", env = "FERRY_UPSTREAM_CA")]
    pub upstream_ca: Option<std::path::PathBuf>,

    /// Admin listener serving /metrics, /healthz and /readyz, HOST:PORT; `off` disables it.
    #[arg(
        long,
        value_name = "ADDR",
        env = "FERRY_ADMIN_LISTEN",
        default_value = "127.0.0.1:9466"
    )]
    pub admin_listen: String,

    /// ε of the load bound: no gateway gets a client while it holds more than ⌈(1 + ε) × mean⌉ connections;
    /// the gateways must use the same value.
    #[arg(
        long,
        value_name = "EPSILON",
        env = "FERRY_BALANCE_EPSILON",
        default_value_t = balancer().epsilon
    )]
    pub balance_epsilon: f64,

    /// Time a new connection has to complete its TLS handshake and send its request head; past it the
    /// balancer answers 408 and closes.
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_HEADER_TIMEOUT_MS",
        default_value_t = ms(balancer().header_timeout)
    )]
    pub header_timeout_ms: u64,

    /// A proxied connection with no byte either way for this long is closed (gateways ping WebSockets every
    /// --ws-ping-interval-ms, 20 s by default, so keep this well above it).
    #[arg(
        long,
        value_name = "MS",
        env = "FERRY_IDLE_TIMEOUT_MS",
        default_value_t = ms(balancer().idle_timeout)
    )]
    pub idle_timeout_ms: u64,

    /// After SIGTERM/SIGINT: the listener closes and /readyz answers 503 at once; open connections are kept
    /// up to this long (gateways move their WebSockets away meanwhile), then closed.
    #[arg(long, value_name = "MS", env = "FERRY_DRAIN_MS", default_value_t = ms(balancer().drain))]
    pub drain_ms: u64,
}
