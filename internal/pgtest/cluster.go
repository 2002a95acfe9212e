package pgtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"
)

// startEphemeral makes a throwaway cluster from locally installed binaries,
// shared by every test of the process, and returns its connection string.
// Main (or Stop) stops it and removes its directory.
func startEphemeral() (string, error) {
	if !withMain() {
		return "", errors.New("an ephemeral cluster needs TestMain to call jobwatchtest.Main(m) (or Stop) so that it is removed at the end")
	}
	c, err := NewCluster("fsync=off", "synchronous_commit=off", "full_page_writes=off", "max_connections=300")
	if err != nil {
		return "", err
	}
	RegisterStop(c.Remove)
	return c.URL("postgres"), nil
}

// Cluster is a scratch PostgreSQL cluster: a data directory in a temporary
// directory, a free port on 127.0.0.1, trust authentication, run as the
// postgres (or nobody) user when this process is root, since initdb and
// postgres refuse to run as root.
type Cluster struct {
	Port int

	bindir   string
	dir      string
	data     string
	as       runAs
	settings []string

	mu     sync.Mutex
	proc   *exec.Cmd
	exited chan struct{}
	log    *os.File
}

// NewCluster runs initdb and starts the server with the given settings
// ("name=value", passed as -c). Remove it when done.
func NewCluster(settings ...string) (*Cluster, error) {
	c, err := newClusterDir(settings)
	if err != nil {
		return nil, err
	}
	initdb := exec.Command(filepath.Join(c.bindir, "initdb"), "-D", c.data, "-U", "postgres",
		"--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C")
	if err := c.run(initdb); err != nil {
		c.Remove()
		return nil, fmt.Errorf("initdb: %w", err)
	}
	if err := c.Start(); err != nil {
		c.Remove()
		return nil, err
	}
	return c, nil
}

func newClusterDir(settings []string) (*Cluster, error) {
	bindir, err := findBindir()
	if err != nil {
		return nil, err
	}
	dir, as, port, err := scratch("jobwatchtest-pg-")
	if err != nil {
		return nil, err
	}
	return &Cluster{Port: port, bindir: bindir, dir: dir, data: filepath.Join(dir, "data"), as: as, settings: settings}, nil
}

// scratch makes a temporary directory for a server the tests start, owned
// by the user it will run as (see clusterUser), and finds it a free port.
func scratch(prefix string) (dir string, as runAs, port int, err error) {
	dir, err = os.MkdirTemp("", prefix)
	if err != nil {
		return "", as, 0, err
	}
	if as, err = clusterUser(dir); err == nil {
		port, err = FreePort()
	}
	if err != nil {
		_ = os.RemoveAll(dir)
		return "", as, 0, err
	}
	return dir, as, port, nil
}

// run runs a tool of the cluster's binaries as the cluster's user.
func (c *Cluster) run(cmd *exec.Cmd) error {
	cmd.SysProcAttr = procAttr(c.as, false)
	cmd.Dir = c.dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%v: %s", err, strings.TrimSpace(string(out)))
	}
	return nil
}

// URL returns the connection string of database db as user postgres.
func (c *Cluster) URL(db string) string {
	return fmt.Sprintf("postgres://postgres@127.0.0.1:%d/%s?sslmode=disable", c.Port, db)
}

// Start starts the server and waits until it answers.
func (c *Cluster) Start() error {
	logFile, err := os.OpenFile(filepath.Join(c.dir, "postgres.log"), os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o644)
	if err != nil {
		return err
	}
	args := []string{"-D", c.data, "-p", strconv.Itoa(c.Port), "-k", c.dir, "-c", "listen_addresses=127.0.0.1"}
	for _, s := range c.settings {
		args = append(args, "-c", s)
	}
	srv := exec.Command(filepath.Join(c.bindir, "postgres"), args...)
	srv.SysProcAttr = procAttr(c.as, true)
	srv.Stdout, srv.Stderr = logFile, logFile
	srv.Dir = c.dir
	if err := srv.Start(); err != nil {
		logFile.Close()
		return fmt.Errorf("start postgres: %w", err)
	}
	exited := make(chan struct{})
	go func() { _ = srv.Wait(); close(exited) }()
	c.mu.Lock()
	c.proc, c.exited, c.log = srv, exited, logFile
	c.mu.Unlock()
	if err := waitReady("postgres", exited, 60*time.Second, c.answers, c.Log); err != nil {
		c.Stop()
		return err
	}
	return nil
}

// waitReady calls ready until it succeeds, or the process ends (exited is
// closed), or within has passed; the error then carries the process's
// log.
func waitReady(what string, exited <-chan struct{}, within time.Duration, ready func() error, log func() string) error {
	deadline := time.Now().Add(within)
	for {
		err := ready()
		if err == nil {
			return nil
		}
		select {
		case <-exited:
			return fmt.Errorf("%s exited: %s", what, log())
		default:
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready within %v: %v: %s", what, within, err, log())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// answers checks that the server accepts connections (a standby too).
func (c *Cluster) answers() error {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
	defer cancel()
	conn, err := pgx.Connect(ctx, c.URL("postgres"))
	if err != nil {
		return err
	}
	return conn.Close(ctx)
}

// Stop shuts the server down fast (SIGINT) and waits for it.
func (c *Cluster) Stop() {
	c.mu.Lock()
	proc, exited := c.proc, c.exited
	c.mu.Unlock()
	if proc == nil {
		return
	}
	interrupt(proc.Process)
	select {
	case <-exited:
	case <-time.After(30 * time.Second):
		killGroup(proc.Process)
		<-exited
	}
	c.closeLog()
}

// Kill kills the server and its backends at once (SIGKILL), as a crash of
// its machine would.
func (c *Cluster) Kill() {
	c.mu.Lock()
	proc, exited := c.proc, c.exited
	c.mu.Unlock()
	if proc == nil {
		return
	}
	killGroup(proc.Process)
	<-exited
	c.closeLog()
}

func (c *Cluster) closeLog() {
	c.mu.Lock()
	if c.log != nil {
		c.log.Close()
		c.log = nil
	}
	c.proc = nil
	c.mu.Unlock()
}

// Remove stops the server if it runs and removes its directory.
func (c *Cluster) Remove() {
	c.Stop()
	_ = os.RemoveAll(c.dir)
}

// Log returns what the server has logged.
func (c *Cluster) Log() string {
	b, _ := os.ReadFile(filepath.Join(c.dir, "postgres.log"))
	return strings.TrimSpace(string(b))
}

// Standby makes a streaming standby of c with pg_basebackup and starts it
// with the given settings.
func (c *Cluster) Standby(settings ...string) (*Cluster, error) {
	s, err := newClusterDir(settings)
	if err != nil {
		return nil, err
	}
	backup := exec.Command(filepath.Join(c.bindir, "pg_basebackup"), "-D", s.data, "-h", "127.0.0.1",
		"-p", strconv.Itoa(c.Port), "-U", "postgres", "-R", "-X", "stream", "--no-sync")
	if err := s.run(backup); err != nil {
		s.Remove()
		return nil, fmt.Errorf("pg_basebackup: %w", err)
	}
	if err := s.Start(); err != nil {
		s.Remove()
		return nil, err
	}
	return s, nil
}

// findBindir returns the directory holding initdb and postgres.
func findBindir() (string, error) {
	var candidates []string
	if out, err := exec.CommandContext(context.Background(), "pg_config", "--bindir").Output(); err == nil {
		candidates = append(candidates, strings.TrimSpace(string(out)))
	}
	versions, _ := filepath.Glob("/usr/lib/postgresql/*/bin")
	sort.Slice(versions, func(i, j int) bool { return versionOf(versions[i]) > versionOf(versions[j]) })
	candidates = append(candidates, versions...)
	if p, err := exec.LookPath("initdb"); err == nil {
		candidates = append(candidates, filepath.Dir(p))
	}
	for _, dir := range candidates {
		if isExec(filepath.Join(dir, "initdb")) && isExec(filepath.Join(dir, "postgres")) {
			return dir, nil
		}
	}
	return "", errors.New("no initdb and postgres binaries (looked at pg_config --bindir, /usr/lib/postgresql/*/bin and PATH); install PostgreSQL (apt-get install postgresql)")
}

func versionOf(bindir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(bindir)))
	return v
}

func isExec(path string) bool {
	st, err := os.Stat(path)
	return err == nil && !st.IsDir() && st.Mode()&0o111 != 0
}

// FreePort returns a TCP port on 127.0.0.1 that nothing listens on now.
func FreePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
