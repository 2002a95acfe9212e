//go:build !unix

package pgtest

import (
	"os"
	"syscall"
)

// runAs is unused where there is no setuid: the cluster runs as this
// process's user.
type runAs = struct{}

func clusterUser(string) (runAs, error) { return runAs{}, nil }

func procAttr(runAs, bool) *syscall.SysProcAttr { return nil }

func interrupt(p *os.Process) { _ = p.Kill() }

func killGroup(p *os.Process) { _ = p.Kill() }

func terminate(p *os.Process) { _ = p.Kill() }
