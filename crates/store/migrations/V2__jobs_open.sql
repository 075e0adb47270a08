-- The reconciler's candidates (jobs not final: scheduled, queued, active, retrying) without scanning the table:
-- a partial index of ids, walked in id order. Its predicate column changes once in a job's life (finished_at is
-- set by the final transition), so that one update of each job is not a HOT update; the others stay HOT.
CREATE INDEX jobs_open ON jobs (id) WHERE finished_at IS NULL;
