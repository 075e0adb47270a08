-- The listing indexes of `jobs`, ascending and, for owner and tenant, only where the column is set; and
-- `jobs_open` rid of finished jobs.
--
-- V1 declared them `(column, id DESC)`. Ids are UUIDv7s, so every new job's id is the greatest so far: in a
-- descending index it goes to the left end of its column's run of entries. B-tree page splits keep the pages
-- right of the new entry half empty for good, and each insert descends from the root. An ascending index takes
-- new ids at the right end of the run: PostgreSQL fills those pages before it splits them and, where the run is
-- the last one in the index, skips the descent. A listing (`ORDER BY id DESC LIMIT n`) walks it backward, as
-- fast. Measured on 200,000 jobs of one queue (docs/store.md, "Indexes"): each of these indexes takes 994 pages
-- instead of 1,788.
--
-- Jobs without an owner (enqueued by the library or `ferry enqueue`, not through the gateway) or without a
-- tenant had index entries no listing can read: every listing that uses these indexes filters on `owner = $1` or
-- `tenant = $1`, which PostgreSQL knows implies `IS NOT NULL`.
--
-- Each index is rebuilt on every partition, under a lock that blocks the recorder's writes until it is done.
DROP INDEX jobs_queue_id;
CREATE INDEX jobs_queue_id ON jobs (queue, id);
DROP INDEX jobs_owner_id;
CREATE INDEX jobs_owner_id ON jobs (owner, id) WHERE owner IS NOT NULL;
DROP INDEX jobs_tenant_id;
CREATE INDEX jobs_tenant_id ON jobs (tenant, id) WHERE tenant IS NOT NULL;

-- Entries of finished jobs left in `jobs_open` by a race in the recorder's upsert before this version (a batch
-- that made a job final while the batch recording its first event committed; crates/store/src/pg.rs,
-- `UPSERT_JOBS_AND_OPEN`). They held nothing up, since the reconciler joins `jobs` and skips finished jobs, but
-- retention kept their jobs as if open.
DELETE FROM jobs_open o USING jobs j WHERE j.id = o.id AND j.finished_at IS NOT NULL;
