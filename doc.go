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
// Where each concern lives: names.go reads table names, derives the
// names of channels, functions, triggers and lock keys, and quotes what
// goes into SQL; schema.go holds the job table's SQL facts; triggers.sql
// is the install script, the function bodies and the one query that says
// what is installed, which triggers.go renders and install.go runs and
// keeps installed; gate.go is the notify gate's watching side; payload.go
// is the format of notifications; listener.go, listener_conn.go (the
// connection loop, the one writer of its state) and subscription.go make
// the Listener, delivery.go its end-to-end check and the per-pool state
// it keeps for the watches; schedule.go decides when a poller polls and
// poll.go runs it; watch.go ties them together; channel.go puts messages
// on the caller's channel; doctor.go is Diagnose; problems.go turns
// lasting problems into few log lines; stats.go, options.go and errors.go
// are what their names say.
package jobwatch
