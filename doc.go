// Package jobwatch tells a PostgreSQL-backed job runner when there is work.
//
// It installs statement-level AFTER INSERT and AFTER UPDATE triggers on a
// job table that NOTIFY a per-table channel (through a notify gate that
// keeps concurrent producers from committing in single file, see
// WithNotifyGate), shares one LISTEN connection (a Listener) between every
// table a process watches, and runs a poller
// that finds what notifications cannot: jobs whose run_at passes later,
// and notifications lost while disconnected. Both put non-blocking
// JobAvailable messages on a buffered channel the caller owns; fetching and
// running the jobs stays with the caller.
//
// It is a Go port of IHP's IHP.Job.Queue.Watch and IHP.PGListener. It uses
// IHP's channel and trigger names and keeps IHP's trigger function,
// notify_job_queued_<table>, working for IHP's per-row triggers, so Go and
// IHP workers can share a table; its own statement triggers call
// jobwatch_notify_<table> (see CreateNotificationTriggerSQL).
//
// The files are named after their concern. Two are not Go: triggers.sql
// holds the install script, the trigger function bodies and the one query
// that says what is installed (triggers.go renders them, install.go runs
// them); the Listener (listener.go, listener_conn.go, subscription.go)
// knows nothing of pools and watches: pool_monitor.go serves the watches
// of one Listener and pool, with delivery.go's check and gate.go's.
package jobwatch
