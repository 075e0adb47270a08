-- The reconciler's candidates without scanning `jobs`: the ids of jobs that are not final (scheduled, queued,
-- active, retrying), kept by the recorder in the same statement as its `jobs` upsert (an id goes in when its job
-- is recorded open and leaves when the job becomes final). A separate table rather than a partial index on
-- `jobs`: an index whose predicate reads `finished_at` would make every job's final update a non-HOT update that
-- rewrites all of `jobs`' indexes (docs/store.md).
CREATE TABLE jobs_open (
    id uuid PRIMARY KEY
);

INSERT INTO jobs_open (id) SELECT id FROM jobs WHERE finished_at IS NULL;
