package pgtest

import (
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// PgBouncer is a running PgBouncer in front of one database, with one
// entry per pool mode, for tests of jobwatch behind a pooler.
type PgBouncer struct {
	Port int

	dir    string
	as     runAs
	target *pgx.ConnConfig
	proc   *exec.Cmd
	exited chan struct{}
}

// Pool modes, and the database name each entry has in PgBouncer.
const (
	TransactionMode = "txn"
	SessionMode     = "session"
)

// StartPgBouncer starts PgBouncer (Debian's package) on a free port of
// 127.0.0.1 in front of the database of connString, with two entries:
// TransactionMode and SessionMode. PgBouncer refuses to run as root, so
// when this process is root it runs as the postgres (or nobody) user. When
// it is missing and this process is root with apt-get, it is installed.
func StartPgBouncer(connString string) (*PgBouncer, error) {
	bin, err := pgbouncerBinary()
	if err != nil {
		return nil, err
	}
	target, err := pgx.ParseConfig(connString)
	if err != nil {
		return nil, err
	}
	dir, as, port, err := scratch("jobwatchtest-pgbouncer-")
	if err != nil {
		return nil, err
	}
	b := &PgBouncer{Port: port, dir: dir, as: as, target: target}
	if err := b.start(bin, "transaction"); err != nil {
		b.Stop()
		return nil, err
	}
	return b, nil
}

// Restart stops PgBouncer and starts it again on the same port, its
// TransactionMode entry now in mode ("transaction" or "session"): a fixed
// configuration.
func (b *PgBouncer) Restart(mode string) error {
	b.stopProcess()
	bin, err := pgbouncerBinary()
	if err != nil {
		return err
	}
	return b.start(bin, mode)
}

func (b *PgBouncer) start(bin, txnEntryMode string) error {
	t := b.target
	server := fmt.Sprintf("host=%s port=%d dbname=%s user=%s", t.Host, t.Port, t.Database, t.User)
	ini := fmt.Sprintf(`[databases]
%s = %s pool_mode=%s
%s = %s pool_mode=session

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = %d
unix_socket_dir =
auth_type = any
max_client_conn = 500
default_pool_size = 20
ignore_startup_parameters = extra_float_digits,options
logfile = %s
pidfile = %s
`, TransactionMode, server, txnEntryMode, SessionMode, server, b.Port,
		filepath.Join(b.dir, "pgbouncer.log"), filepath.Join(b.dir, "pgbouncer.pid"))
	conf := filepath.Join(b.dir, "pgbouncer.ini")
	if err := os.WriteFile(conf, []byte(ini), 0o644); err != nil {
		return err
	}
	cmd := exec.Command(bin, conf)
	cmd.SysProcAttr = procAttr(b.as, true)
	cmd.Dir = b.dir
	out, err := os.OpenFile(filepath.Join(b.dir, "stderr.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	defer out.Close()
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start pgbouncer: %w", err)
	}
	exited := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exited) }()
	b.proc, b.exited = cmd, exited
	return waitReady("pgbouncer", exited, 20*time.Second, func() error {
		c, err := net.DialTimeout("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(b.Port)), time.Second)
		if err == nil {
			c.Close()
		}
		return err
	}, b.Log)
}

// URL returns the connection string of entry (TransactionMode or
// SessionMode) through PgBouncer.
func (b *PgBouncer) URL(entry string) string {
	return fmt.Sprintf("postgres://%s@127.0.0.1:%d/%s?sslmode=disable", b.target.User, b.Port, entry)
}

// Log returns what PgBouncer has logged.
func (b *PgBouncer) Log() string {
	l, _ := os.ReadFile(filepath.Join(b.dir, "pgbouncer.log"))
	e, _ := os.ReadFile(filepath.Join(b.dir, "stderr.log"))
	return strings.TrimSpace(string(l) + string(e))
}

func (b *PgBouncer) stopProcess() {
	if b.proc == nil {
		return
	}
	terminate(b.proc.Process)
	select {
	case <-b.exited:
	case <-time.After(10 * time.Second):
		killGroup(b.proc.Process)
		<-b.exited
	}
	b.proc = nil
}

// Stop stops PgBouncer and removes its directory.
func (b *PgBouncer) Stop() {
	b.stopProcess()
	_ = os.RemoveAll(b.dir)
}

var installPgBouncer sync.Once

// pgbouncerBinary finds PgBouncer, installing Debian's package when it is
// missing and this process may (root, apt-get).
func pgbouncerBinary() (string, error) {
	find := func() (string, error) {
		if p, err := exec.LookPath("pgbouncer"); err == nil {
			return p, nil
		}
		if isExec("/usr/sbin/pgbouncer") {
			return "/usr/sbin/pgbouncer", nil
		}
		return "", errors.New("not found")
	}
	if p, err := find(); err == nil {
		return p, nil
	}
	var installErr error
	installPgBouncer.Do(func() {
		if os.Geteuid() != 0 {
			installErr = errors.New("not root")
			return
		}
		apt, err := exec.LookPath("apt-get")
		if err != nil {
			installErr = err
			return
		}
		cmd := exec.Command(apt, "install", "-y", "-qq", "pgbouncer")
		cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive")
		if out, err := cmd.CombinedOutput(); err != nil {
			installErr = fmt.Errorf("%v: %s", err, out)
		}
	})
	if p, err := find(); err == nil {
		return p, nil
	}
	return "", fmt.Errorf("these tests need PgBouncer, which is not installed and could not be (%v): install it (apt-get install pgbouncer)", installErr)
}
