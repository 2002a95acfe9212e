package jobwatchtest

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
	"time"
)

// startEphemeral makes a throwaway cluster from locally installed binaries
// and returns its connection string. Main (or Stop) stops it and removes
// its directory.
func startEphemeral() (string, error) {
	bindir, err := findBindir()
	if err != nil {
		return "", err
	}
	mainMu.Lock()
	withMain := mainCalled
	mainMu.Unlock()
	if !withMain {
		return "", errors.New("binaries found in " + bindir +
			", but an ephemeral cluster needs TestMain to call jobwatchtest.Main(m) (or Stop) so it is removed at the end")
	}

	dir, err := os.MkdirTemp("", "jobwatchtest-pg-")
	if err != nil {
		return "", err
	}
	cleanupDir := func() { _ = os.RemoveAll(dir) }
	// initdb refuses to run as root: then the cluster runs as an
	// unprivileged user, who must own its directory.
	as, err := clusterUser(dir)
	if err != nil {
		cleanupDir()
		return "", err
	}
	data := filepath.Join(dir, "data")
	initdb := exec.Command(filepath.Join(bindir, "initdb"), "-D", data, "-U", "postgres",
		"--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C")
	initdb.SysProcAttr = procAttr(as, false)
	initdb.Dir = dir
	if out, err := initdb.CombinedOutput(); err != nil {
		cleanupDir()
		return "", fmt.Errorf("initdb: %v: %s", err, strings.TrimSpace(string(out)))
	}
	port, err := freePort()
	if err != nil {
		cleanupDir()
		return "", err
	}
	logFile, err := os.Create(filepath.Join(dir, "postgres.log"))
	if err != nil {
		cleanupDir()
		return "", err
	}
	srv := exec.Command(filepath.Join(bindir, "postgres"), "-D", data,
		"-p", strconv.Itoa(port), "-k", dir, "-c", "listen_addresses=127.0.0.1",
		"-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
		"-c", "max_connections=300")
	srv.SysProcAttr = procAttr(as, true)
	srv.Stdout, srv.Stderr = logFile, logFile
	srv.Dir = dir
	if err := srv.Start(); err != nil {
		logFile.Close()
		cleanupDir()
		return "", fmt.Errorf("start postgres: %w", err)
	}
	exited := make(chan struct{})
	go func() { _ = srv.Wait(); close(exited) }()
	stop := func() {
		interrupt(srv.Process) // fast shutdown
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			killGroup(srv.Process)
			<-exited
		}
		logFile.Close()
		cleanupDir()
	}
	u := fmt.Sprintf("postgres://postgres@127.0.0.1:%d/postgres?sslmode=disable", port)
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := ping(u)
		if err == nil {
			break
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(filepath.Join(dir, "postgres.log"))
			cleanupDir()
			return "", fmt.Errorf("postgres exited: %s", strings.TrimSpace(string(log)))
		default:
		}
		if time.Now().After(deadline) {
			stop()
			return "", fmt.Errorf("postgres did not answer within 30s: %v", err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	registerStop(stop)
	return u, nil
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
	return "", errors.New("no initdb and postgres binaries (looked at pg_config --bindir, /usr/lib/postgresql/*/bin and PATH)")
}

func versionOf(bindir string) int {
	v, _ := strconv.Atoi(filepath.Base(filepath.Dir(bindir)))
	return v
}

func isExec(path string) bool {
	st, err := os.Stat(path)
	return err == nil && !st.IsDir() && st.Mode()&0o111 != 0
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
