package runner

import (
	"context"
	"fmt"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/jobwatch-go/jobwatch"
)

// CreateTable creates the job table if it is missing. Workers started
// together would race on CREATE TYPE / CREATE TABLE IF NOT EXISTS (which can
// fail with a duplicate key), so creation runs under an advisory lock.
func CreateTable(ctx context.Context, pool *pgxpool.Pool, table string) error {
	err := pgx.BeginFunc(ctx, pool, func(tx pgx.Tx) error {
		if _, err := tx.Exec(ctx, "SELECT pg_advisory_xact_lock(hashtext('jobwatch runner: create job table'))"); err != nil {
			return err
		}
		_, err := tx.Exec(ctx, jobwatch.CreateJobTableSQL(table))
		return err
	})
	if err != nil {
		return fmt.Errorf("create job table: %w", err)
	}
	return nil
}

// queries holds the worker's SQL for one table.
type queries struct {
	fetch, succeed, fail, touch, release, unlockStale, insertNow, insertLater, busy string
}

func newQueries(table string) (queries, error) {
	ident, err := jobwatch.QuoteTableName(table)
	if err != nil {
		return queries{}, err
	}
	return queries{
		// The standard fetch: lock up to $2 due jobs, skipping those other
		// workers hold, and mark them running in the same statement. It
		// also records the jobs $3 that finished since the last fetch: one
		// commit, one disk flush, for both. Neither part waits for a row
		// lock (SKIP LOCKED), so two fetches cannot deadlock; a finished
		// job skipped now (another fetch's SKIP LOCKED may hold it for a
		// moment) is recorded by a later one. The rows say which part
		// each comes from.
		fetch: `WITH done AS (UPDATE ` + ident + ` SET status = 'job_status_succeeded', updated_at = now()
				WHERE id IN (SELECT id FROM ` + ident + ` WHERE id = ANY($3) AND locked_by = $1 FOR UPDATE SKIP LOCKED)
				RETURNING id),
			fetched AS (UPDATE ` + ident + ` SET status = 'job_status_running', locked_at = now(), locked_by = $1,
				attempts_count = attempts_count + 1, updated_at = now()
			WHERE id IN (SELECT id FROM ` + ident + `
				WHERE status IN ('job_status_not_started', 'job_status_retry') AND locked_by IS NULL AND run_at <= now()
				ORDER BY run_at LIMIT $2 FOR UPDATE SKIP LOCKED)
			RETURNING id, attempts_count)
			SELECT id, attempts_count, false FROM fetched UNION ALL SELECT id, 0, true FROM done`,
		// As IHP does, a finished job keeps locked_at and locked_by: they
		// say when and by whom it was run.
		succeed: `UPDATE ` + ident + ` SET status = 'job_status_succeeded', updated_at = now()
			WHERE id = ANY($1) AND locked_by = $2`,
		// A failed job is retried with a backoff until max attempts. The
		// status is a parameter so that its type is the column's (enum or text).
		fail: `UPDATE ` + ident + ` SET status = $3, last_error = $4, locked_by = NULL, locked_at = NULL, updated_at = now(),
				run_at = now() + make_interval(secs => power(2, attempts_count))
			WHERE id = $1 AND locked_by = $2`,
		// A job read ahead (see readAhead) that waited long is locked
		// afresh before it starts, if it is still this worker's.
		touch: `UPDATE ` + ident + ` SET locked_at = now()
			WHERE id = $1 AND locked_by = $2 AND status = 'job_status_running'`,
		// Jobs read ahead and not started at shutdown go back in the
		// queue, their attempt not counted.
		release: `UPDATE ` + ident + ` SET status = 'job_status_retry', locked_by = NULL, locked_at = NULL,
				attempts_count = attempts_count - 1, updated_at = now()
			WHERE id = ANY($1) AND locked_by = $2 AND status = 'job_status_running'`,
		// IHP's staleJobTimeout: a job running longer than that lost its
		// worker (killed, crashed); put it back in the queue.
		unlockStale: `UPDATE ` + ident + ` SET status = 'job_status_retry', locked_by = NULL, locked_at = NULL, updated_at = now()
			WHERE status = 'job_status_running' AND locked_at < now() - $1::interval`,
		insertNow:   `INSERT INTO ` + ident + ` SELECT FROM generate_series(1, $1::int)`,
		insertLater: `INSERT INTO ` + ident + ` (run_at) SELECT now() + make_interval(secs => 1 + random() * 4) FROM generate_series(1, $1::int)`,
		busy: `SELECT EXISTS (SELECT 1 FROM ` + ident + `
			WHERE status IN ('job_status_not_started', 'job_status_retry', 'job_status_running'))`,
	}, nil
}

// Enqueue inserts now jobs due at once and later jobs due 1 to 5 s ahead.
func Enqueue(ctx context.Context, pool *pgxpool.Pool, table string, now, later int) error {
	q, err := newQueries(table)
	if err != nil {
		return err
	}
	if now > 0 {
		if _, err := pool.Exec(ctx, q.insertNow, now); err != nil {
			return fmt.Errorf("enqueue: %w", err)
		}
	}
	if later > 0 {
		if _, err := pool.Exec(ctx, q.insertLater, later); err != nil {
			return fmt.Errorf("enqueue: %w", err)
		}
	}
	return nil
}
