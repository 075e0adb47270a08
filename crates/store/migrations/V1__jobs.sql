-- The durable record of ferry: every job's current state (`jobs`) and its append-only audit trail
-- (`job_events`). Operators query these tables directly; docs/store.md describes every column and index.

CREATE TABLE jobs (
    id             uuid        PRIMARY KEY,          -- UUIDv7: sorts by creation time
    queue          text        NOT NULL,
    kind           text        NOT NULL,
    state          text        NOT NULL CHECK (state IN
                       ('scheduled', 'queued', 'active', 'retrying', 'completed', 'dead', 'cancelled')),
    attempts       int         NOT NULL,
    -- The spec, NULL until the job.queued / job.scheduled event that carries it is recorded.
    payload        jsonb,                            -- NULL = spec not yet recorded
    priority       text        CHECK (priority IN ('high', 'normal', 'low')),
    max_attempts   int,
    timeout_ms     bigint,
    backoff        jsonb,
    owner          text,
    tenant         text,
    correlation_id text,
    -- The outcome, as of the newest event.
    result         jsonb,                            -- job.completed data
    error          text,                             -- job.retrying / job.dead error text
    run_at         timestamptz,                      -- when a scheduled / retrying job becomes due
    created_at     timestamptz NOT NULL,             -- the millisecond inside the UUIDv7 id
    updated_at     timestamptz NOT NULL,             -- `at` of the newest event
    finished_at    timestamptz,                      -- `at` of the newest event when it is final
    -- The order key (`<ms>-<seq>/<n>` of the event id) of the event that set the state: the record only ever
    -- moves to an event with a greater key.
    ord_ms         bigint      NOT NULL,
    ord_seq        bigint      NOT NULL,
    ord_n          int         NOT NULL
) WITH (fillfactor = 50);
-- A job's row is updated two or three times in its life (active, then completed). No index covers a column
-- those updates change (state, attempts, result, times, order key), and the fillfactor leaves room on each page,
-- so PostgreSQL makes them HOT updates: no index is written again, which is most of the recorder's cost.

-- Listings are `ORDER BY id DESC LIMIT n` with equality filters; each index below lets one common filter walk
-- its rows newest-first and stop after a page. Listings by kind or by a creation-time range alone use the
-- primary key (created_after / created_before become id bounds).
-- State is deliberately not indexed (see above): a state filter rides on one of these or on the primary key.
CREATE INDEX jobs_queue_id ON jobs (queue, id DESC);   -- admin: a queue's jobs
CREATE INDEX jobs_owner_id ON jobs (owner, id DESC);   -- every non-admin listing is scoped to its owner
CREATE INDEX jobs_tenant_id ON jobs (tenant, id DESC); -- tenant-scoped listings

CREATE TABLE job_events (
    id             text        NOT NULL,             -- `<stream entry id>/<n>`, unique within a shard
    job_id         uuid        NOT NULL,             -- no foreign key: events may be recorded before the job
    type           text        NOT NULL,
    state          text        NOT NULL CHECK (state IN
                       ('scheduled', 'queued', 'active', 'retrying', 'completed', 'dead', 'cancelled')),
    attempt        int         NOT NULL,
    at             timestamptz NOT NULL,             -- when the transition happened
    correlation_id text,
    actor          text,
    data           jsonb,
    recorded_at    timestamptz NOT NULL DEFAULT clock_timestamp(), -- when the row was written
    ord_ms         bigint      NOT NULL,
    ord_seq        bigint      NOT NULL,
    ord_n          int         NOT NULL,
    -- Stream entry ids are unique per shard only (two shards may both write entry `<ms>-0` in the same
    -- millisecond), but all events of one job come from one shard: (job_id, id) identifies an event.
    PRIMARY KEY (job_id, id)
);

-- A job's trail comes from the primary key (job_id, id): a handful of rows, sorted by the order key in memory.
-- Events by time (operators: what happened in the last hour; retention): BRIN, because rows arrive roughly in
-- `at` order, and a BRIN index is a few pages that cost next to nothing per insert.
CREATE INDEX job_events_at ON job_events USING brin (at);
