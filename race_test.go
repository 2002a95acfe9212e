//go:build race

package jobwatch_test

const raceEnabled = true
