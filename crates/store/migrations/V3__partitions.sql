-- `jobs` and `job_events` partitioned by time: by range of the job's UUIDv7 id, whose top 48 bits are its
-- creation millisecond. A job and all its events live in partitions of the same time slot (daily by default),
-- so retention drops a slot's two partitions whole instead of deleting rows (docs/store.md, "Partitions and
-- retention"). The columns, checks and indexes are those of V1; the primary keys include the partition key as
-- PostgreSQL requires, so lookups by id, the recorder's upserts and its duplicate checks each touch one partition.
--
-- The default partitions catch what no slot covers: the jobs retention keeps past their slot (unfinished, or
-- finished less than the retention ago) and ids outside every slot. Partitions are created ahead of need by
-- `ferry_create_partitions`, called here and by every worker's maintenance task (crates/store/src/maintenance.rs).

ALTER TABLE jobs RENAME TO jobs_v2;
ALTER INDEX jobs_pkey RENAME TO jobs_v2_pkey;
ALTER INDEX jobs_queue_id RENAME TO jobs_v2_queue_id;
ALTER INDEX jobs_owner_id RENAME TO jobs_v2_owner_id;
ALTER INDEX jobs_tenant_id RENAME TO jobs_v2_tenant_id;
ALTER TABLE job_events RENAME TO job_events_v2;
ALTER INDEX job_events_pkey RENAME TO job_events_v2_pkey;
ALTER INDEX job_events_at RENAME TO job_events_v2_at;

CREATE TABLE jobs (LIKE jobs_v2 INCLUDING DEFAULTS INCLUDING CONSTRAINTS, PRIMARY KEY (id))
    PARTITION BY RANGE (id);
CREATE INDEX jobs_queue_id ON jobs (queue, id DESC);
CREATE INDEX jobs_owner_id ON jobs (owner, id DESC);
CREATE INDEX jobs_tenant_id ON jobs (tenant, id DESC);
-- Storage parameters belong to partitions (a partitioned table has no storage): fillfactor 50 keeps a job's
-- updates HOT (V1).
CREATE TABLE jobs_default PARTITION OF jobs DEFAULT WITH (fillfactor = 50);

CREATE TABLE job_events (LIKE job_events_v2 INCLUDING DEFAULTS INCLUDING CONSTRAINTS, PRIMARY KEY (job_id, id))
    PARTITION BY RANGE (job_id);
CREATE INDEX job_events_at ON job_events USING brin (at);
CREATE TABLE job_events_default PARTITION OF job_events DEFAULT;

-- The smallest UUIDv7 of a time's millisecond (what a slot's bound is), and the millisecond inside a UUIDv7.
CREATE FUNCTION ferry_uuid_floor(t timestamptz) RETURNS uuid
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT (lpad(to_hex(floor(extract(epoch FROM t) * 1000)::bigint), 12, '0') || repeat('0', 20))::uuid
$$;

CREATE FUNCTION ferry_uuid_time(u uuid) RETURNS timestamptz
LANGUAGE sql IMMUTABLE STRICT AS $$
    SELECT to_timestamp(('x' || left(replace(u::text, '-', ''), 12))::bit(48)::bigint / 1000.0)
$$;

-- The time slots of `parent`'s partitions, read from the catalog (the default partition has none).
CREATE FUNCTION ferry_partitions(parent regclass)
RETURNS TABLE (name text, lower timestamptz, upper timestamptz)
LANGUAGE sql STABLE AS $$
    SELECT c.relname::text, ferry_uuid_time(b[1]::uuid), ferry_uuid_time(b[2]::uuid)
    FROM pg_inherits i
    JOIN pg_class c ON c.oid = i.inhrelid
    CROSS JOIN LATERAL regexp_match(pg_get_expr(c.relpartbound, c.oid),
                                    $re$FROM \('([0-9a-f-]+)'\) TO \('([0-9a-f-]+)'\)$re$) AS b
    WHERE i.inhparent = parent AND b IS NOT NULL
    ORDER BY 2
$$;

-- Create the partitions of every slot of `width` (aligned to the Unix epoch, so daily slots are UTC days) that
-- meets [since, upto) and no existing partition overlaps, for both tables. Rows the default partitions hold in a
-- new slot's range (a slot created late) move into it in the same transaction. Returns how many slots were
-- created. Only one caller at a time does the work (a transaction-scoped advisory lock); the others return 0.
CREATE FUNCTION ferry_create_partitions(since timestamptz, upto timestamptz, width interval DEFAULT '1 day')
RETURNS int
LANGUAGE plpgsql AS $$
DECLARE
    lo timestamptz := date_bin(width, since, timestamptz '1970-01-01 00:00:00+00');
    hi timestamptz;
    lo_id uuid;
    hi_id uuid;
    suffix text;
    made int := 0;
    moved int;
BEGIN
    IF width < interval '1 hour' THEN
        RAISE EXCEPTION 'partition width % is under an hour', width;
    END IF;
    IF NOT pg_try_advisory_xact_lock(7306086213373765740) THEN
        RETURN 0;
    END IF;
    WHILE lo < upto LOOP
        hi := lo + width;
        IF NOT EXISTS (SELECT 1 FROM ferry_partitions('jobs') p WHERE p.lower < hi AND p.upper > lo) THEN
            lo_id := ferry_uuid_floor(lo);
            hi_id := ferry_uuid_floor(hi);
            suffix := CASE WHEN lo = date_trunc('day', lo, 'UTC')
                           THEN to_char(lo AT TIME ZONE 'UTC', '"p"YYYYMMDD')
                           ELSE to_char(lo AT TIME ZONE 'UTC', '"p"YYYYMMDD"t"HH24MISS') END;
            moved := 0;
            IF EXISTS (SELECT 1 FROM jobs_default WHERE id >= lo_id AND id < hi_id)
               OR EXISTS (SELECT 1 FROM job_events_default WHERE job_id >= lo_id AND job_id < hi_id) THEN
                EXECUTE 'CREATE TEMP TABLE ferry_moving_jobs (LIKE jobs) ON COMMIT DROP';
                EXECUTE 'CREATE TEMP TABLE ferry_moving_events (LIKE job_events) ON COMMIT DROP';
                EXECUTE 'WITH m AS (DELETE FROM jobs_default WHERE id >= $1 AND id < $2 RETURNING *) '
                        'INSERT INTO ferry_moving_jobs SELECT * FROM m' USING lo_id, hi_id;
                EXECUTE 'WITH m AS (DELETE FROM job_events_default WHERE job_id >= $1 AND job_id < $2 RETURNING *) '
                        'INSERT INTO ferry_moving_events SELECT * FROM m' USING lo_id, hi_id;
                moved := 1;
            END IF;
            EXECUTE format('CREATE TABLE %I PARTITION OF jobs FOR VALUES FROM (%L) TO (%L) WITH (fillfactor = 50)',
                           'jobs_' || suffix, lo_id, hi_id);
            EXECUTE format('CREATE TABLE %I PARTITION OF job_events FOR VALUES FROM (%L) TO (%L)',
                           'job_events_' || suffix, lo_id, hi_id);
            IF moved = 1 THEN
                EXECUTE 'INSERT INTO jobs SELECT * FROM ferry_moving_jobs';
                EXECUTE 'INSERT INTO job_events SELECT * FROM ferry_moving_events';
                EXECUTE 'DROP TABLE ferry_moving_jobs, ferry_moving_events';
            END IF;
            made := made + 1;
        END IF;
        lo := hi;
    END LOOP;
    RETURN made;
END
$$;

-- Retention of one slot: detach its two partitions (events first, the order the recorder locks the tables in),
-- copy the jobs to keep and their events back into the tables, which puts them in the default partitions (their
-- slot is gone), and drop the two partitions. The jobs kept are those in `keep` (the caller's list of the slot's
-- jobs open or finished within the retention, read before this transaction) and every job of the slot open now
-- (`jobs_open`, kept by the recorder in the same statement as `jobs`, so it is exact under the lock). Only index
-- lookups run under the exclusive lock this takes: nothing scans the slot. Returns the jobs kept, or NULL when
-- no such partition exists or another caller holds the maintenance lock. Run it in a transaction of its own
-- with a short lock_timeout: the lock is held until that transaction ends.
CREATE FUNCTION ferry_drop_partition(jobs_partition text, keep uuid[]) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    j regclass := to_regclass(quote_ident(jobs_partition));
    e regclass := to_regclass(quote_ident('job_events_' || substr(jobs_partition, length('jobs_') + 1)));
    lo timestamptz;
    hi timestamptz;
    ids uuid[];
    kept bigint;
BEGIN
    IF j IS NULL OR NOT pg_try_advisory_xact_lock(7306086213373765740) THEN
        RETURN NULL;
    END IF;
    SELECT p.lower, p.upper INTO lo, hi FROM ferry_partitions('jobs') p WHERE p.name = jobs_partition;
    IF e IS NOT NULL THEN
        EXECUTE format('ALTER TABLE job_events DETACH PARTITION %s', e);
    END IF;
    EXECUTE format('ALTER TABLE jobs DETACH PARTITION %s', j);
    ids := array(SELECT unnest(keep)
                 UNION
                 SELECT o.id FROM jobs_open o WHERE o.id >= ferry_uuid_floor(lo) AND o.id < ferry_uuid_floor(hi));
    EXECUTE format('INSERT INTO jobs SELECT * FROM %s WHERE id = ANY($1)', j) USING ids;
    GET DIAGNOSTICS kept = ROW_COUNT;
    IF e IS NOT NULL THEN
        IF kept > 0 THEN
            EXECUTE format('INSERT INTO job_events SELECT * FROM %s WHERE job_id = ANY($1)', e) USING ids;
        END IF;
        EXECUTE format('DROP TABLE %s', e);
    END IF;
    EXECUTE format('DROP TABLE %s', j);
    RETURN kept;
END
$$;

-- The existing record moves into the new tables: slots from its oldest job (at most 400 days back; older rows,
-- and ids that are not UUIDv7, land in the default partitions) to three days ahead.
SELECT ferry_create_partitions(
    least(ferry_uuid_time(least(
        (SELECT id FROM jobs_v2 WHERE id >= ferry_uuid_floor(now() - interval '400 days') ORDER BY id LIMIT 1),
        (SELECT job_id FROM job_events_v2 WHERE job_id >= ferry_uuid_floor(now() - interval '400 days')
         ORDER BY job_id LIMIT 1))),
          now()),
    now() + interval '3 days');
INSERT INTO jobs SELECT * FROM jobs_v2;
INSERT INTO job_events SELECT * FROM job_events_v2;
DROP TABLE jobs_v2, job_events_v2;
