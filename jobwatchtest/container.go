package jobwatchtest

import (
	"context"
	"fmt"
	"time"

	"github.com/testcontainers/testcontainers-go"
	tcpostgres "github.com/testcontainers/testcontainers-go/modules/postgres"

	"github.com/jobwatch-go/jobwatch/internal/pgtest"
)

// containerImage is the image started when a Docker engine answers.
const containerImage = "postgres:16-alpine"

// startContainer starts a PostgreSQL container and returns its connection
// string; Main (or Stop) removes it.
func startContainer() (u string, err error) {
	defer func() {
		// testcontainers panics in some set-ups without a Docker engine.
		if r := recover(); r != nil {
			err = fmt.Errorf("testcontainers: %v", r)
		}
	}()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c, err := tcpostgres.Run(ctx, containerImage,
		tcpostgres.WithDatabase("postgres"),
		tcpostgres.WithUsername("postgres"),
		tcpostgres.WithPassword("postgres"),
		tcpostgres.BasicWaitStrategies(),
	)
	if err != nil {
		if c != nil {
			_ = testcontainers.TerminateContainer(c)
		}
		return "", fmt.Errorf("no Docker engine answered or the container failed: %w", err)
	}
	u, err = c.ConnectionString(ctx, "sslmode=disable")
	if err != nil {
		_ = testcontainers.TerminateContainer(c)
		return "", err
	}
	pgtest.RegisterStop(func() { _ = testcontainers.TerminateContainer(c) })
	return u, nil
}
