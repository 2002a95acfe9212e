{{/*
The install script of CreateNotificationTriggerSQL, the function bodies it
installs, and the one query that says what of it is in place (stateSQL),
which the script and the Go code both read. Rendered by triggers.go.

Two rules hold everywhere below:
  - The function bodies run inside other sessions' INSERTs, as their roles,
    with their search_path. Every function, operator and type in them is
    named with its schema (pg_catalog), so that nothing another role
    creates in a schema on that path can run there, and the objects of
    jobwatch's own they use are named with the table's schema.
  - The script itself runs as the table's owner or a superuser. Once it
    has looked the table up as the caller means it, it pins search_path to
    pg_catalog for its own statements, and puts the caller's back at the
    end, with the caller's lock_timeout.
*/}}

{{- define "look"}}{{if .Custom}}{{template "look_custom" .}}{{else}}
        -- status::text: the column may be IHP's job_status enum, text or a
        -- domain over text, and comparing as text cannot fail on an enum
        -- that lacks a label. A job scheduled at 'infinity' is never due.
        SELECT pg_catalog.count(*) FILTER (WHERE j.run_at OPERATOR(pg_catalog.<=) pg_catalog.now()),
               pg_catalog.min(j.run_at) FILTER (WHERE j.run_at OPERATOR(pg_catalog.>) pg_catalog.now() AND pg_catalog.isfinite(j.run_at))
          INTO due, next_at
          FROM {{.TransitionTable}} j
         WHERE j.status::pg_catalog.text OPERATOR(pg_catalog.=) ANY ({{.PendingArray}});{{end}}
{{- end}}

{{- define "look_custom"}}
        -- The rows this statement left pending, by queue: how many are
        -- due, and the earliest due later. The condition below is
        -- PostgreSQL's reading of JobTable.Pending.
        SELECT coalesce(pg_catalog.sum(g.due), 0)::pg_catalog.int8, pg_catalog.min(g.next_at),
               pg_catalog.array_agg(g.queue), pg_catalog.array_agg(g.due), pg_catalog.array_agg(g.next_at)
          INTO due, next_at, queues, dues, nexts
          FROM (SELECT {{.QueueExpr}} AS queue,
                       pg_catalog.count(*) FILTER (WHERE {{.DueNow}}) AS due,
                       pg_catalog.min({{.DueAt}}) FILTER (WHERE {{.DueLater}}) AS next_at
                  FROM {{.TransitionTable}} j
                 WHERE %2$s
                 GROUP BY 1) g;
{{- end}}

{{- define "announce_custom"}}
    -- What this transaction has announced on the channel so far, as for
    -- IHP's table; each queue's jobs are announced with " q:<queue>"
    -- after the payload (a queue name too long for that: "poll").
    DECLARE
        state pg_catalog.text := pg_catalog.current_setting({{.SettingFmt}}, true);
        sent pg_catalog.int4 := 0;
        announce pg_catalog.text[] := '{}';
        payload pg_catalog.text;
        tag pg_catalog.text;
    BEGIN
        IF state <> '' THEN
            sent := pg_catalog.split_part(state, ' ', 1)::pg_catalog.int4;
        END IF;
        FOR i IN 1 .. coalesce(pg_catalog.array_length(queues, 1), 0) LOOP
            tag := CASE WHEN queues[i] IS NULL THEN ''
                        WHEN pg_catalog.octet_length(queues[i]) <= {{.MaxQueueTag}} THEN pg_catalog.concat(' q:', queues[i]) END;
            IF tag IS NULL THEN
                IF dues[i] > 0 OR nexts[i] IS NOT NULL THEN
                    announce := pg_catalog.array_append(announce, '{{.PayloadPoll}}'::pg_catalog.text);
                END IF;
                CONTINUE;
            END IF;
            IF dues[i] = 1 AND tag = '' THEN
                -- Merged with the transaction's other ones: not counted.
                announce := pg_catalog.array_append(announce, ''::pg_catalog.text);
            ELSIF dues[i] > 0 THEN
                announce := pg_catalog.array_append(announce, pg_catalog.concat('{{.PayloadDue}}', LEAST(dues[i], {{.MaxDue}}), tag));
            END IF;
            IF nexts[i] IS NOT NULL THEN
                announce := pg_catalog.array_append(announce, pg_catalog.concat('{{.PayloadAt}}', EXTRACT(epoch FROM nexts[i]), tag));
            END IF;
        END LOOP;
        FOREACH payload IN ARRAY announce LOOP
            IF payload NOT IN ('', '{{.PayloadPoll}}') THEN
                IF sent >= {{.Bound}} THEN
                    payload := '{{.PayloadPoll}}';
                END IF;
                sent := sent + 1;
            END IF;
            PERFORM pg_catalog.pg_notify({{.ChannelFmt}}, pg_catalog.concat({{.Prefix}}, payload));
            EXIT WHEN payload = '{{.PayloadPoll}}'; -- every watch looks at the table
        END LOOP;
        PERFORM pg_catalog.set_config({{.SettingFmt}}, pg_catalog.concat(sent, ' NaN'), true);
    END;
{{- end}}

{{- define "describe"}}
    -- The description of the table's rows (WithJobTable), read by the
    -- server on the pinned search_path: Pending as the predicate of an
    -- index on an empty temporary copy of the table, which accepts only
    -- the row's own columns, immutable functions and operators, no
    -- subquery and no aggregate; then printed back by PostgreSQL, every
    -- name outside pg_catalog qualified. That reading is what the trigger
    -- function and the polls run, on the same pinned search_path.
    DECLARE
        typ pg_catalog.text;
        category pg_catalog."char";
        -- The reading must mean the same in every session: its literals
        -- are printed with these settings, the caller's put back after.
        settings pg_catalog.text[] := '{DateStyle,IntervalStyle,TimeZone,bytea_output,extra_float_digits}';
        pinned pg_catalog.text[] := '{"ISO, MDY",postgres,UTC,hex,1}';
        saved pg_catalog.text[];
    BEGIN
    SELECT pg_catalog.array_agg(pg_catalog.current_setting(n) ORDER BY i) INTO saved FROM pg_catalog.unnest(settings) WITH ORDINALITY AS x(n, i);
    PERFORM pg_catalog.set_config(settings[i], pinned[i], true) FROM pg_catalog.generate_subscripts(settings, 1) AS i;
{{- if .PendingText}}
    IF NOT pg_catalog.has_database_privilege(pg_catalog.current_database(), 'TEMPORARY') THEN
        RAISE EXCEPTION 'jobwatch: role % may not create temporary tables in this database, which reading JobTable.Pending needs: GRANT TEMPORARY ON DATABASE to it',
            current_user USING ERRCODE = '42501';
    END IF;
    BEGIN
        EXECUTE pg_catalog.format('CREATE TEMPORARY TABLE jobwatch_describe (LIKE %s)', tbl);
        EXECUTE 'CREATE INDEX ON pg_temp.jobwatch_describe ((1)) WHERE (' || {{lit .PendingText}} || ')';
        SELECT pg_catalog.pg_get_expr(i.indpred, i.indrelid) INTO pred FROM pg_catalog.pg_index i
         WHERE i.indrelid = 'pg_temp.jobwatch_describe'::pg_catalog.regclass;
        DROP TABLE pg_temp.jobwatch_describe;
    EXCEPTION WHEN syntax_error_or_access_rule_violation OR feature_not_supported OR data_exception THEN
        RAISE EXCEPTION 'jobwatch: table %: Pending % cannot be watched: %', {{lit .Raw}}, {{lit .PendingText}}, SQLERRM USING ERRCODE = '{{.InvalidCode}}';
    END;
{{- end}}
    pred := coalesce(pred, 'true');
    IF pg_catalog.strpos(pred, E'\\') > 0 THEN
        -- A backslash in a literal reads differently where
        -- standard_conforming_strings is off.
        RAISE EXCEPTION 'jobwatch: table %: Pending % cannot be watched: its reading % holds a backslash', {{lit .Raw}}, {{lit .PendingText}}, pred
            USING ERRCODE = '{{.InvalidCode}}';
    END IF;
{{- range .DescColumns}}
    SELECT pg_catalog.format_type(a.atttypid, NULL), t.typcategory INTO typ, category
      FROM pg_catalog.pg_attribute a JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
     WHERE a.attrelid = tbl AND a.attname = {{lit .Name}} AND a.attnum > 0 AND NOT a.attisdropped;
    IF typ IS NULL THEN
        RAISE EXCEPTION 'jobwatch: table % has no column % (JobTable.{{.Field}})', {{lit $.Raw}}, {{lit .Name}} USING ERRCODE = '{{$.InvalidCode}}';
    ELSIF NOT ({{.Check}}) THEN
        RAISE EXCEPTION 'jobwatch: column % of table % is %: JobTable.{{.Field}} must be {{.Want}}', {{lit .Name}}, {{lit $.Raw}}, typ USING ERRCODE = '{{$.InvalidCode}}';
    END IF;
{{- end}}
{{- if .ZoneText}}
    BEGIN
        PERFORM pg_catalog.timezone({{lit .ZoneText}}, pg_catalog.now());
    EXCEPTION WHEN data_exception THEN
        RAISE EXCEPTION 'jobwatch: table %: JobTable.RunAtTimeZone: %', {{lit .Raw}}, SQLERRM USING ERRCODE = '{{.InvalidCode}}';
    END;
{{- end}}
    described := pg_catalog.json_build_object('pending', pred, 'run_at', {{.RunAtLit}}, 'run_at_time_zone', {{.ZoneLit}}, 'queue', {{.QueueLit}})::pg_catalog.text;
    PERFORM pg_catalog.set_config(settings[i], saved[i], true) FROM pg_catalog.generate_subscripts(settings, 1) AS i;
    END;
{{- end}}

{{- define "describe_only"}}
DECLARE
    tbl pg_catalog.regclass := pg_catalog.to_regclass({{lit .TableQuoted}});
    pred pg_catalog.text;
    described pg_catalog.text;
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'jobwatch: table % does not exist', {{lit .Raw}} USING ERRCODE = '42P01';
    END IF;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);{{template "describe" .}}
    PERFORM pg_catalog.set_config({{lit .DescribedSetting}} || '_pred', pred, true),
            pg_catalog.set_config({{lit .DescribedSetting}} || '_record', described, true),
            pg_catalog.set_config({{lit .DescribedSetting}} || '_table', tbl::pg_catalog.text, true);
END
{{end}}

{{- define "stmt_body"}}{{if .Custom}}
-- Written by jobwatch (CreateNotificationTriggerSQLFor): tells the workers of
-- {{.TableFmt}} about the jobs a statement left pending, for the job table
-- description below. It runs on a pinned search_path.
-- jobwatch job table: %3$s
#variable_conflict use_column
{{- else}}
-- Written by jobwatch (CreateNotificationTriggerSQL): tells the workers of
-- {{.TableFmt}} about the jobs a statement left pending. Every name below is
-- schema-qualified: the inserting session's search_path changes nothing.
{{- end}}
DECLARE
    -- A skipping INSERT (the notify gate) uses these alone: the notifying
    -- part's variables are in its own block, so that a skipper does not
    -- pay for their initialization.
    due pg_catalog.int8;
    next_at pg_catalog.timestamptz;
    counter pg_catalog.regclass;
    skips pg_catalog.int8;
{{- if .Custom}}
    queues pg_catalog.text[];
    dues pg_catalog.int8[];
    nexts pg_catalog.timestamptz[];
{{- end}}
BEGIN
{{- if .Gate}}
    -- An UPDATE rarely leaves a job pending (a fetch or a completion does
    -- not): it looks first, and only then takes part in the gate.
    IF TG_OP OPERATOR(pg_catalog.=) 'UPDATE' THEN{{template "look" .}}
        IF due OPERATOR(pg_catalog.=) 0 AND next_at IS NULL THEN
            RETURN NULL;
        END IF;
    END IF;
    -- The notify gate: when another open transaction holds the notify key,
    -- it notifies when it ends, so this one may skip its NOTIFY, provided
    -- the skip can be seen: the skip key, held shared until this
    -- transaction ends, and the skip counter. Neither is waited for: when
    -- someone else holds the skip key (a watch does for an instant) or the
    -- counter cannot be used, this transaction notifies itself.
    IF NOT pg_catalog.pg_try_advisory_xact_lock({{.NotifyKey}}) THEN
        IF pg_catalog.pg_try_advisory_xact_lock_shared({{.SkipKey}}) THEN
            counter := pg_catalog.to_regclass(%1$L);
            IF pg_catalog.has_sequence_privilege(counter, 'USAGE') THEN
                skips := pg_catalog.nextval(counter);
                RETURN NULL;
            END IF;
        END IF;
    END IF;
    IF TG_OP OPERATOR(pg_catalog.=) 'INSERT' THEN{{template "look" .}}
    END IF;
{{- else}}{{template "look" .}}
{{- end}}
{{- if .Custom}}{{template "announce_custom" .}}
{{- else}}
    -- What this transaction has announced on the channel so far: how many
    -- counts and times, and the earliest time. PostgreSQL merges identical
    -- notifications of a transaction, but not these, so past {{.Bound}} the
    -- transaction sends "poll" (merged into one), and each watch then
    -- reads the count and the time from the table itself.
    DECLARE
        state pg_catalog.text := pg_catalog.current_setting({{.SettingFmt}}, true);
        sent pg_catalog.int4 := 0;
        announced pg_catalog.numeric := 'NaN'; -- the earliest time announced; NaN: none
        announce pg_catalog.text[] := '{}';
        payload pg_catalog.text;
    BEGIN
        IF state OPERATOR(pg_catalog.<>) '' THEN
            sent := pg_catalog.split_part(state, ' ', 1)::pg_catalog.int4;
            announced := pg_catalog.split_part(state, ' ', 2)::pg_catalog.numeric;
        END IF;
        IF due OPERATOR(pg_catalog.=) 1 THEN
            -- Merged with the transaction's other ones: not counted.
            announce := pg_catalog.array_append(announce, ''::pg_catalog.text);
        ELSIF due OPERATOR(pg_catalog.>) 1 THEN
            announce := pg_catalog.array_append(announce, pg_catalog.concat('{{.PayloadDue}}', LEAST(due, {{.MaxDue}})));
        END IF;
        -- The time is absolute, on the server's clock: the notification is
        -- delivered at commit, however long after this statement that is.
        IF next_at IS NOT NULL AND EXTRACT(epoch FROM next_at) OPERATOR(pg_catalog.<) announced THEN
            announced := EXTRACT(epoch FROM next_at);
            announce := pg_catalog.array_append(announce, pg_catalog.concat('{{.PayloadAt}}', announced));
        END IF;
        FOREACH payload IN ARRAY announce LOOP
            IF payload OPERATOR(pg_catalog.<>) '' THEN
                IF sent OPERATOR(pg_catalog.>=) {{.Bound}} THEN
                    payload := '{{.PayloadPoll}}';
                END IF;
                sent := sent OPERATOR(pg_catalog.+) 1;
            END IF;
            PERFORM pg_catalog.pg_notify({{.ChannelFmt}}, pg_catalog.concat({{.Prefix}}, payload));
        END LOOP;
        PERFORM pg_catalog.set_config({{.SettingFmt}}, pg_catalog.concat(sent, ' ', announced), true);
    END;
{{- end}}
    RETURN NULL;
END
{{end}}

{{- define "row_body"}}
-- Written by jobwatch: the row trigger of a partitioned table, which fires
-- only on a partition that lacks its own statement triggers.
BEGIN
    -- One "poll" per row; PostgreSQL merges them into one per transaction.
    PERFORM pg_catalog.pg_notify({{.ChannelFmt}}, '{{.PayloadPoll}}');
    RETURN NULL;
END
{{end}}

{{- define "columns"}}{{if .Custom}}
SELECT NULL::text AS missing, NULL::text AS run_at_type
{{- else}}
SELECT (SELECT string_agg(col, ', ') FROM unnest(ARRAY['status', 'run_at', 'locked_by']) AS col
         WHERE NOT EXISTS (SELECT 1 FROM pg_attribute a
                            WHERE a.attrelid = {{.Tbl}} AND a.attname = col AND a.attnum > 0 AND NOT a.attisdropped)) AS missing,
       (SELECT format_type(a.atttypid, NULL) FROM pg_attribute a
         WHERE a.attrelid = {{.Tbl}} AND a.attname = 'run_at' AND a.attnum > 0 AND NOT a.attisdropped) AS run_at_type
{{- end}}
{{- end}}

{{- define "parts"}}
SELECT p.relid, pc.relkind = 'r' AS leaf,
       coalesce(bool_or(g.tgname = {{lit .PartInsertTrigger}}), false) AS has_insert,
       coalesce(bool_or(g.tgname = {{lit .PartInsertTrigger}} AND g.tgenabled IN ('O', 'A')), false) AS insert_fires,
       coalesce(bool_or(g.tgname = {{lit .PartUpdateTrigger}}), false) AS has_update,
       coalesce(bool_or(g.tgname = {{lit .PartUpdateTrigger}} AND g.tgenabled IN ('O', 'A')), false) AS update_fires,
       coalesce(bool_or(g.tgname = {{lit .RowTrigger}} AND g.tgenabled IN ('O', 'A')), false) AS row_fires
  FROM pg_partition_tree({{.Tbl}}) p
  JOIN pg_class pc ON pc.oid = p.relid
  LEFT JOIN pg_trigger g ON g.tgrelid = p.relid
       AND g.tgname IN ({{lit .PartInsertTrigger}}, {{lit .PartUpdateTrigger}}, {{lit .RowTrigger}})
 WHERE p.relid <> {{.Tbl}} AND pc.relkind IN ('r', 'p')
 GROUP BY p.relid, pc.relkind
{{- end}}

{{- /*
state: one row when the table exists, none otherwise. "healthy" (every
statement that leaves a pending job notifies) and "current" (nothing for
the script to do) are defined here and nowhere else. A trigger counts
when it fires in a normal session: enabled ('O') or always ('A'), not
disabled ('D') nor replica-only ('R').
*/}}
{{- define "state"}}
WITH t AS (
    SELECT c.oid, c.relkind = 'p' AS partitioned, c.relowner, c.relnamespace, n.nspname::text AS nsp,
           format('%I.%I', n.nspname, {{lit .Counter}}) AS counter
      FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
     WHERE c.oid = {{.Tbl}}
), trig AS (
    SELECT g.tgname::text AS name, g.tgenabled IN ('O', 'A') AS fires
      FROM t JOIN pg_trigger g ON g.tgrelid = t.oid
     WHERE g.tgname IN ({{lit .InsertTrigger}}, {{lit .UpdateTrigger}}, {{lit .RowTrigger}})
), parts AS ({{template "parts" .}}
), obj AS (
    -- What exists under jobwatch's own names in the table's schema.
    SELECT 'function' AS kind, p.proname::text AS name, p.proowner AS owner, p.prosrc AS body
      FROM t JOIN pg_proc p ON p.pronamespace = t.relnamespace
     WHERE p.proname IN ({{lit .Function}}, {{lit .RowFunction}}) AND p.pronargs = 0
    UNION ALL
    SELECT CASE c.relkind WHEN 'S' THEN 'sequence' ELSE 'relation' END, c.relname::text, c.relowner, NULL
      FROM t JOIN pg_class c ON c.relnamespace = t.relnamespace
     WHERE c.relname = {{lit .Counter}}
), s AS (
    SELECT t.nsp, pg_get_userbyid(t.relowner) AS owner, t.counter, t.partitioned, cols.missing, cols.run_at_type,
           EXISTS (SELECT 1 FROM trig WHERE name = {{lit .InsertTrigger}}) AS has_insert,
           EXISTS (SELECT 1 FROM trig WHERE name = {{lit .InsertTrigger}} AND fires) AS insert_fires,
           EXISTS (SELECT 1 FROM trig WHERE name = {{lit .UpdateTrigger}}) AS has_update,
           EXISTS (SELECT 1 FROM trig WHERE name = {{lit .UpdateTrigger}} AND fires) AS update_fires,
           EXISTS (SELECT 1 FROM trig WHERE name = {{lit .RowTrigger}}) AS has_row,
           EXISTS (SELECT 1 FROM trig WHERE name = {{lit .RowTrigger}} AND fires) AS row_fires,
           -- partitions whose statements notify nobody, and those the script has work on
           (SELECT count(*)::int FROM parts WHERE NOT (insert_fires AND update_fires) AND NOT (leaf AND row_fires)) AS uncovered,
           (SELECT count(*)::int FROM parts WHERE NOT (insert_fires AND update_fires) OR (leaf AND row_fires)) AS incomplete,
           EXISTS (SELECT 1 FROM obj WHERE kind = 'function' AND name = {{lit .Function}}
                      AND body IS DISTINCT FROM format({{.StmtBody}}, t.counter{{if .Custom}}, {{.Pred}}, {{.Record}}{{end}})
                      OR kind = 'function' AND name = {{lit .RowFunction}}
                      AND body IS DISTINCT FROM format({{.RowBody}}, t.counter)) AS stale,
           EXISTS (SELECT 1 FROM obj WHERE kind = 'sequence') AS has_counter,
           coalesce((SELECT has_sequence_privilege('public', c.oid, 'UPDATE') FROM pg_class c
                      WHERE c.relnamespace = t.relnamespace AND c.relname = {{lit .Counter}} AND c.relkind = 'S'), false) AS counter_writable,
           -- Objects under jobwatch's names that another role could change:
           -- owned by neither the table's owner nor a superuser, or a
           -- relation that is not a sequence.
           (SELECT string_agg(format('%s %I.%I (owned by %I)', o.kind, t.nsp, o.name, pg_get_userbyid(o.owner)), ', ')
              FROM obj o JOIN pg_roles r ON r.oid = o.owner
             WHERE o.kind = 'relation' OR (o.owner <> t.relowner AND NOT r.rolsuper)) AS foreign_objects
      FROM t, ({{template "columns" .}}) cols
)
SELECT nsp, owner, counter, partitioned, missing, run_at_type,
       has_insert, insert_fires, has_update, update_fires, has_row, row_fires,
       uncovered, incomplete, stale, has_counter, counter_writable, foreign_objects,
       insert_fires AND update_fires AND (NOT partitioned OR (row_fires AND uncovered = 0)) AS healthy,
       insert_fires AND update_fires AND NOT stale AND foreign_objects IS NULL
{{- if .Gate}} AND has_counter AND NOT counter_writable{{end}}
       AND (NOT partitioned OR (row_fires AND incomplete = 0)) AS current
  FROM s
{{- end}}

{{- define "script"}}
DECLARE
    -- An unqualified table name is looked up on the caller's search_path,
    -- as the caller means it; so is IHP's installation lock key.
    tbl pg_catalog.regclass := pg_catalog.to_regclass({{lit .TableQuoted}});
    ihp_schema pg_catalog.text := {{.IHPSchemaKey}};
    caller_search_path pg_catalog.text := pg_catalog.current_setting('search_path');
    caller_lock_timeout pg_catalog.text := pg_catalog.current_setting('lock_timeout');
    -- The function bodies; %1$L stands for the skip counter's name.
    stmt_body pg_catalog.text := {{.StmtBodyQuoted}};
    row_body pg_catalog.text := {{.RowBodyQuoted}};
    ihp_body pg_catalog.text := {{.IHPBodyQuoted}};
    st record;
    locked boolean := false;
    part record;
{{- if .Custom}}
    pred pg_catalog.text;
    described pg_catalog.text;
{{- end}}
BEGIN
    IF tbl IS NULL THEN
        RAISE EXCEPTION 'jobwatch: table % does not exist', {{lit .Raw}} USING ERRCODE = '42P01';
    END IF;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
{{- if .Custom}}{{template "describe" .}}{{end}}
    -- Read what is in place; when something is missing, take the
    -- installation lock (IHP's key, so that Go and IHP installers never
    -- collide) and read again: another installer may just have finished.
    -- The others wait, at most lock_timeout: an install takes
    -- milliseconds, and a migration must not fail because a worker tries
    -- at the same moment. The wait holds no table lock.
    LOOP
        SELECT * INTO st FROM ({{template "state" .}}) s;
        IF st.missing IS NOT NULL THEN
            RAISE EXCEPTION 'jobwatch: table % lacks column(s) %', {{lit .Raw}}, st.missing USING ERRCODE = '42703';
        END IF;
        IF st.run_at_type NOT IN ({{.RunAtTypes}}) THEN
            RAISE EXCEPTION 'jobwatch: column run_at of table % must be a timestamp, not %', {{lit .Raw}}, st.run_at_type USING ERRCODE = '42804';
        END IF;
        IF st.foreign_objects IS NOT NULL THEN
            RAISE EXCEPTION 'jobwatch: % exists under a name jobwatch needs for table %, owned by a role other than the table''s owner %: drop it (its owner could change what every INSERT runs)',
                st.foreign_objects, {{lit .Raw}}, st.owner USING ERRCODE = '42710';
        END IF;
{{- if not .MayPartition}}
        IF st.partitioned THEN
            RAISE EXCEPTION 'jobwatch: table % became partitioned; retry', {{lit .Raw}} USING ERRCODE = '55P03';
        END IF;
{{- end}}
        IF st.current THEN
            PERFORM pg_catalog.set_config('search_path', caller_search_path, true);
            PERFORM pg_catalog.set_config('lock_timeout', caller_lock_timeout, true);
            RETURN;
        END IF;
        -- Installing needs the owner's rights (a superuser has them): a
        -- role without them stops here, before it takes any lock.
        IF NOT pg_catalog.pg_has_role(st.owner, 'USAGE') THEN
            RAISE EXCEPTION 'jobwatch: role % may not install the notification triggers of %: run this as the table''s owner % (or a member of it, or a superuser)',
                current_user, {{lit .Raw}}, st.owner USING ERRCODE = '42501';
        END IF;
        EXIT WHEN locked;
        PERFORM pg_catalog.set_config('lock_timeout', '1s', true);
        BEGIN
            PERFORM pg_advisory_xact_lock(hashtext(ihp_schema), hashtext({{lit .IHPFunction}}::name::text));
        EXCEPTION WHEN lock_not_available THEN
            RAISE EXCEPTION 'jobwatch: notification trigger installation already in progress for %', {{lit .Raw}} USING ERRCODE = '55P03';
        END;
        locked := true;
    END LOOP;
{{- if .Gate}}
    -- The notify gate's skip counter: every producer may bump it (USAGE),
    -- every watch read it (SELECT); only its owner may set it.
    IF NOT st.has_counter THEN
        EXECUTE format('CREATE SEQUENCE %s CYCLE', st.counter);
        IF current_user <> st.owner THEN
            EXECUTE format('ALTER SEQUENCE %s OWNER TO %I', st.counter, st.owner);
        END IF;
{{- if .Custom}}
        -- Dropped with the table: owned by its first column.
        EXECUTE format('ALTER SEQUENCE %s OWNED BY %s.%I', st.counter, tbl,
                       (SELECT a.attname FROM pg_attribute a WHERE a.attrelid = tbl AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum LIMIT 1));
{{- else}}
        EXECUTE format('ALTER SEQUENCE %s OWNED BY %s.run_at', st.counter, tbl);
{{- end}}
        EXECUTE format('GRANT USAGE, SELECT ON SEQUENCE %s TO PUBLIC', st.counter);
    ELSIF st.counter_writable THEN
        EXECUTE format('REVOKE UPDATE ON SEQUENCE %s FROM PUBLIC', st.counter);
    END IF;
{{- end}}
    IF st.stale OR to_regprocedure(format('%I.%I()', st.nsp, {{lit .Function}})) IS NULL THEN
{{- if .Custom}}
        EXECUTE format('CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS %L',
                       st.nsp, {{lit .Function}}, format(stmt_body, st.counter, pred, described));
{{- else}}
        EXECUTE format('CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger LANGUAGE plpgsql AS %L',
                       st.nsp, {{lit .Function}}, format(stmt_body, st.counter));
{{- end}}
        IF current_user <> st.owner THEN
            EXECUTE format('ALTER FUNCTION %I.%I() OWNER TO %I', st.nsp, {{lit .Function}}, st.owner);
        END IF;
    END IF;
{{- if .MayPartition}}
    IF st.partitioned AND (st.stale OR to_regprocedure(format('%I.%I()', st.nsp, {{lit .RowFunction}})) IS NULL) THEN
        EXECUTE format('CREATE OR REPLACE FUNCTION %I.%I() RETURNS trigger LANGUAGE plpgsql AS %L',
                       st.nsp, {{lit .RowFunction}}, format(row_body, st.counter));
        IF current_user <> st.owner THEN
            EXECUTE format('ALTER FUNCTION %I.%I() OWNER TO %I', st.nsp, {{lit .RowFunction}}, st.owner);
        END IF;
    END IF;
{{- end}}
    -- Triggers are created when missing and enabled when disabled, never
    -- dropped, after taking the table lock with NOWAIT: the script never
    -- queues behind a writer, nor makes later writers queue behind it.
    IF NOT st.insert_fires OR NOT st.update_fires
{{- if .MayPartition}} OR (st.partitioned AND NOT st.row_fires){{end}} THEN
{{- if .OwnsIHPFunction}}
        -- IHP's function, for IHP's per-row triggers, when it is missing;
        -- never replaced.
        IF to_regprocedure(format('%I.%I()', st.nsp, {{lit .IHPFunction}})) IS NULL THEN
            EXECUTE format('CREATE FUNCTION %I.%I() RETURNS trigger LANGUAGE plpgsql AS %L', st.nsp, {{lit .IHPFunction}}, ihp_body);
            IF current_user <> st.owner THEN
                EXECUTE format('ALTER FUNCTION %I.%I() OWNER TO %I', st.nsp, {{lit .IHPFunction}}, st.owner);
            END IF;
        END IF;
{{- end}}
        -- The row trigger is cloned onto every partition: lock them all.
        IF st.partitioned AND NOT st.row_fires THEN
            EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE NOWAIT', tbl);
        ELSE
            EXECUTE format('LOCK TABLE ONLY %s IN SHARE ROW EXCLUSIVE MODE NOWAIT', tbl);
        END IF;
    END IF;
    IF NOT st.has_insert THEN
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS {{.TransitionTable}} FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()',
                       {{lit .InsertTrigger}}, tbl, st.nsp, {{lit .Function}});
    ELSIF NOT st.insert_fires THEN
        EXECUTE format('ALTER TABLE ONLY %s ENABLE TRIGGER %I', tbl, {{lit .InsertTrigger}});
    END IF;
    IF NOT st.has_update THEN
        EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s REFERENCING NEW TABLE AS {{.TransitionTable}} FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()',
                       {{lit .UpdateTrigger}}, tbl, st.nsp, {{lit .Function}});
    ELSIF NOT st.update_fires THEN
        EXECUTE format('ALTER TABLE ONLY %s ENABLE TRIGGER %I', tbl, {{lit .UpdateTrigger}});
    END IF;
{{- if .MayPartition}}
    IF st.partitioned AND NOT st.has_row THEN
        EXECUTE format('CREATE TRIGGER %I AFTER INSERT OR UPDATE ON %s FOR EACH ROW{{if not .Custom}} WHEN (NEW.status::text IN ({{.PendingStatusesInLiteral}})){{end}} EXECUTE FUNCTION %I.%I()',
                       {{lit .RowTrigger}}, tbl, st.nsp, {{lit .RowFunction}});
    ELSIF st.partitioned AND NOT st.row_fires THEN
        EXECUTE format('ALTER TABLE ONLY %s ENABLE TRIGGER %I', tbl, {{lit .RowTrigger}});
    END IF;
    IF st.partitioned THEN
        -- Statement triggers on each partition, then its clone of the row
        -- trigger off. Only a leaf's clone: one on a partitioned partition
        -- is what PostgreSQL copies onto the partitions created under it.
        FOR part IN {{template "parts" .}} LOOP
            CONTINUE WHEN part.insert_fires AND part.update_fires AND NOT (part.leaf AND part.row_fires);
            EXECUTE format('LOCK TABLE ONLY %s IN SHARE ROW EXCLUSIVE MODE NOWAIT', part.relid::regclass);
            IF NOT part.has_insert THEN
                EXECUTE format('CREATE TRIGGER %I AFTER INSERT ON %s REFERENCING NEW TABLE AS {{.TransitionTable}} FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()',
                               {{lit .PartInsertTrigger}}, part.relid::regclass, st.nsp, {{lit .Function}});
            ELSIF NOT part.insert_fires THEN
                EXECUTE format('ALTER TABLE ONLY %s ENABLE TRIGGER %I', part.relid::regclass, {{lit .PartInsertTrigger}});
            END IF;
            IF NOT part.has_update THEN
                EXECUTE format('CREATE TRIGGER %I AFTER UPDATE ON %s REFERENCING NEW TABLE AS {{.TransitionTable}} FOR EACH STATEMENT EXECUTE FUNCTION %I.%I()',
                               {{lit .PartUpdateTrigger}}, part.relid::regclass, st.nsp, {{lit .Function}});
            ELSIF NOT part.update_fires THEN
                EXECUTE format('ALTER TABLE ONLY %s ENABLE TRIGGER %I', part.relid::regclass, {{lit .PartUpdateTrigger}});
            END IF;
            IF part.leaf AND part.row_fires THEN
                EXECUTE format('ALTER TABLE ONLY %s DISABLE TRIGGER %I', part.relid::regclass, {{lit .RowTrigger}});
            END IF;
        END LOOP;
    END IF;
{{- end}}
    -- A migration tool may run this inside its own transaction: leave its
    -- settings as they were.
    PERFORM pg_catalog.set_config('search_path', caller_search_path, true);
    PERFORM pg_catalog.set_config('lock_timeout', caller_lock_timeout, true);
END
{{end}}

{{- define "drop"}}
DECLARE
    tbl pg_catalog.regclass := pg_catalog.to_regclass({{lit .TableQuoted}});
    nsp pg_catalog.text := {{.IHPSchemaKey}};
    caller_search_path pg_catalog.text := pg_catalog.current_setting('search_path');
    ihp_body pg_catalog.text := {{.IHPBodyQuoted}};
    ihp pg_catalog.oid;
BEGIN
    IF tbl IS NOT NULL THEN
        nsp := (SELECT n.nspname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
                 WHERE c.oid OPERATOR(pg_catalog.=) tbl);
    END IF;
    PERFORM pg_catalog.set_config('search_path', 'pg_catalog, pg_temp', true);
    -- jobwatch's functions, and with them every trigger that calls them.
    EXECUTE format('DROP FUNCTION IF EXISTS %I.%I() CASCADE', nsp, {{lit .Function}});
    EXECUTE format('DROP FUNCTION IF EXISTS %I.%I() CASCADE', nsp, {{lit .RowFunction}});
    EXECUTE format('DROP SEQUENCE IF EXISTS %I.%I', nsp, {{lit .Counter}});
{{- if .OwnsIHPFunction}}
    -- IHP's function as jobwatch creates it (IHP's body), when no trigger
    -- calls it any more; IHP's own triggers keep theirs.
    ihp := to_regprocedure(format('%I.%I()', nsp, {{lit .IHPFunction}}));
    IF ihp IS NOT NULL AND (SELECT prosrc FROM pg_proc WHERE oid = ihp) = ihp_body
       AND NOT EXISTS (SELECT 1 FROM pg_trigger WHERE tgfoid = ihp) THEN
        EXECUTE format('DROP FUNCTION %s', ihp::regprocedure);
    END IF;
{{- end}}
    PERFORM pg_catalog.set_config('search_path', caller_search_path, true);
END
{{end}}
