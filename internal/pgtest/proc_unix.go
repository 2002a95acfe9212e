//go:build unix

package pgtest

import (
	"errors"
	"os"
	"os/user"
	"strconv"
	"syscall"
)

// runAs is the user an ephemeral cluster runs as; nil means this process's.
type runAs = *syscall.Credential

// clusterUser returns nil unless this process is root; then it returns the
// postgres user, or nobody, and gives dir to that user.
func clusterUser(dir string) (runAs, error) {
	if os.Geteuid() != 0 {
		return nil, nil
	}
	for _, name := range []string{"postgres", "nobody"} {
		u, err := user.Lookup(name)
		if err != nil {
			continue
		}
		uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
		gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
		if err1 != nil || err2 != nil || uid == 0 {
			continue
		}
		if err := os.Chown(dir, int(uid), int(gid)); err != nil {
			return nil, err
		}
		return &syscall.Credential{Uid: uint32(uid), Gid: uint32(gid), NoSetGroups: true}, nil
	}
	return nil, errors.New("running as root and found no unprivileged user (postgres or nobody) for initdb")
}

// procAttr runs a command as the user, in a process group of its own when
// group is set (so the server and its children can be killed together).
func procAttr(as runAs, group bool) *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Credential: as, Setpgid: group}
}

func interrupt(p *os.Process) { _ = p.Signal(os.Interrupt) }

func killGroup(p *os.Process) { _ = syscall.Kill(-p.Pid, syscall.SIGKILL) }

func terminate(p *os.Process) { _ = p.Signal(syscall.SIGTERM) }
