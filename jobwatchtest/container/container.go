// Package container makes jobwatchtest start PostgreSQL in a container
// with testcontainers-go when no other server answers (TEST_DATABASE_URL,
// pgx's defaults, local binaries). Import it for its effect, in the test
// package whose TestMain calls jobwatchtest.Main:
//
//	import _ "github.com/jobwatch-go/jobwatch/jobwatchtest/container"
//
// It is a module of its own, so that neither jobwatch nor jobwatchtest
// depends on testcontainers-go.
//
// The container is as Docker makes it by default: the image
// postgres:16-alpine on the default bridge network, its port published on
// a free one of the host. Two variables change that: JOBWATCHTEST_IMAGE
// names another image (one that honours POSTGRES_USER, POSTGRES_PASSWORD
// and POSTGRES_DB, as the official one does), and JOBWATCHTEST_NETWORK=host
// runs it on the host's network, listening on a free port of 127.0.0.1,
// for a Docker engine that has no bridge: testcontainers-go then uses a
// runtime of this package's whose default network is the host's, so that
// it creates no bridge network of its own either. testcontainers-go's own
// settings (DOCKER_HOST, TESTCONTAINERS_RYUK_DISABLED, ...) apply as
// usual.
package container

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"strconv"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jobwatch-go/jobwatch/jobwatchtest"
	"github.com/moby/moby/api/types/container"
	"github.com/testcontainers/testcontainers-go"
	"github.com/testcontainers/testcontainers-go/wait"
)

// The variables that change the container.
const (
	ImageEnvVar   = "JOBWATCHTEST_IMAGE"
	NetworkEnvVar = "JOBWATCHTEST_NETWORK"
)

// DefaultImage is the image started unless ImageEnvVar names another.
const DefaultImage = "postgres:16-alpine"

// hostRuntime is the testcontainers-go runtime for JOBWATCHTEST_NETWORK=host:
// Docker found as usual, containers on the host's network by default and
// reached at 127.0.0.1, so that testcontainers-go creates no bridge network
// and dials no gateway.
const hostRuntime = "jobwatchtest-host"

type hostProvider struct{}

func (hostProvider) Initialize(context.Context) (testcontainers.RuntimeConfig, error) {
	return testcontainers.RuntimeConfig{PublishedHost: "127.0.0.1", DefaultBridgeNetwork: "host"}, nil
}

func init() {
	jobwatchtest.UseContainer(Start)
	_ = testcontainers.RegisterProvider(hostRuntime, func() testcontainers.RuntimeProvider { return hostProvider{} })
	if os.Getenv(NetworkEnvVar) == "host" && os.Getenv("TESTCONTAINERS_PROVIDER") == "" {
		_ = os.Setenv("TESTCONTAINERS_PROVIDER", hostRuntime)
	}
}

// Start starts a PostgreSQL container, waits until it answers, and returns
// its connection string (user postgres, password postgres, database
// postgres) and a function that removes it.
func Start(ctx context.Context) (connString string, stop func(), err error) {
	defer func() {
		// testcontainers panics in some set-ups without a Docker engine.
		if r := recover(); r != nil {
			err = fmt.Errorf("testcontainers: %v", r)
		}
	}()
	image := os.Getenv(ImageEnvVar)
	if image == "" {
		image = DefaultImage
	}
	req := testcontainers.ContainerRequest{
		Image: image,
		Env:   map[string]string{"POSTGRES_USER": "postgres", "POSTGRES_PASSWORD": "postgres", "POSTGRES_DB": "postgres"},
	}
	var port int
	switch network := os.Getenv(NetworkEnvVar); network {
	case "":
		req.ExposedPorts = []string{"5432/tcp"}
		req.WaitingFor = wait.ForListeningPort("5432/tcp").WithStartupTimeout(time.Minute)
	case "host":
		if port, err = freePort(); err != nil {
			return "", nil, err
		}
		// Arguments of the image's postgres, as for the official image.
		req.Cmd = []string{"-c", "port=" + strconv.Itoa(port), "-c", "listen_addresses=127.0.0.1"}
		req.HostConfigModifier = func(hc *container.HostConfig) { hc.NetworkMode = "host" }
	default:
		return "", nil, fmt.Errorf("%s=%q: want host, or nothing for Docker's default network", NetworkEnvVar, network)
	}
	c, err := testcontainers.GenericContainer(ctx, testcontainers.GenericContainerRequest{ContainerRequest: req, Started: true})
	stop = func() {
		if c != nil {
			_ = testcontainers.TerminateContainer(c)
		}
	}
	if err != nil {
		stop()
		return "", nil, fmt.Errorf("no Docker engine answered or the container failed: %w", err)
	}
	host := "127.0.0.1"
	if port == 0 {
		if host, err = c.Host(ctx); err == nil {
			var p interface{ Num() uint16 }
			if p, err = c.MappedPort(ctx, "5432/tcp"); err == nil {
				port = int(p.Num())
			}
		}
		if err != nil {
			stop()
			return "", nil, fmt.Errorf("container address: %w", err)
		}
	}
	u := (&url.URL{Scheme: "postgres", User: url.UserPassword("postgres", "postgres"),
		Host: net.JoinHostPort(host, strconv.Itoa(port)), Path: "/postgres", RawQuery: "sslmode=disable"}).String()
	if err := waitReady(ctx, u); err != nil {
		stop()
		return "", nil, err
	}
	return u, stop, nil
}

// waitReady waits until the server answers a query: an image may start a
// server for its initialisation first, and restart it.
func waitReady(ctx context.Context, u string) error {
	var last error
	for {
		conn, err := pgx.Connect(ctx, u)
		if err == nil {
			err = conn.Ping(ctx)
			_ = conn.Close(context.Background())
			if err == nil {
				return nil
			}
		}
		last = err
		select {
		case <-ctx.Done():
			return fmt.Errorf("the container's server did not answer: %w", errors.Join(last, ctx.Err()))
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}
