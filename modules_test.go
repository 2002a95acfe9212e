package jobwatch_test

import (
	"errors"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// TestNestedModules runs the tests of the repository's other modules (those
// with a go.mod below the root, such as jobwatchtest), with this run's race
// setting, so that `go test ./...` at the root covers every module.
func TestNestedModules(t *testing.T) {
	t.Parallel()
	var dirs []string
	err := filepath.WalkDir(".", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == "testdata" || strings.HasPrefix(d.Name(), ".")) && path != "." {
			return filepath.SkipDir
		}
		// The container module needs a Docker engine: .ci/run starts one
		// and runs its tests.
		if !d.IsDir() && d.Name() == "go.mod" && path != "go.mod" && filepath.Dir(path) != filepath.Join("jobwatchtest", "container") {
			dirs = append(dirs, filepath.Dir(path))
		}
		return nil
	})
	require.NoError(t, err)
	require.NotEmpty(t, dirs, "no nested module found: bench is one")
	for _, dir := range dirs {
		t.Run(dir, func(t *testing.T) {
			t.Parallel()
			args := []string{"test", "-count=1"}
			if raceEnabled {
				args = append(args, "-race")
			}
			cmd := exec.Command("go", append(args, "./...")...)
			cmd.Dir = dir
			out, err := cmd.CombinedOutput()
			t.Logf("go %s in %s:\n%s", strings.Join(args, " "), dir, out)
			require.NoError(t, err)
		})
	}
}

// TestReleasedModules: each module resolves on its own at a tag, as a user
// gets it once it is published, without the replace directives this
// repository uses. The working tree is committed to a scratch repository
// tagged v0.1.0 (and <module>/v0.1.0 for the nested ones); git serves it
// under the module's real path; a fresh module outside this repository
// requires the library and the container module at v0.1.0, builds, runs a
// jobwatchtest test, and installs the command, whose version says v0.1.0.
// Other modules come from this machine's module cache (else its GOPROXY),
// and a module cache of the test's own keeps the scratch v0.1.0 out of the
// real one.
func TestReleasedModules(t *testing.T) {
	t.Parallel()
	root, err := os.Getwd()
	require.NoError(t, err)
	tmp := t.TempDir()
	repo, consumer := filepath.Join(tmp, "repo"), filepath.Join(tmp, "consumer")
	run := func(dir string, env []string, name string, args ...string) string {
		t.Helper()
		cmd := exec.Command(name, args...)
		cmd.Dir = dir
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		require.NoError(t, err, "%s %s in %s:\n%s", name, strings.Join(args, " "), dir, out)
		return string(out)
	}
	files := strings.Fields(run(root, nil, "git", "ls-files", "-co", "--exclude-standard"))
	for _, f := range files {
		data, err := os.ReadFile(filepath.Join(root, f))
		if errors.Is(err, fs.ErrNotExist) {
			continue // deleted, not yet committed
		}
		require.NoError(t, err)
		require.NoError(t, os.MkdirAll(filepath.Join(repo, filepath.Dir(f)), 0o755))
		require.NoError(t, os.WriteFile(filepath.Join(repo, f), data, 0o644))
	}
	git := []string{"GIT_CONFIG_NOSYSTEM=1", "GIT_CONFIG_GLOBAL=" + filepath.Join(tmp, "gitconfig"),
		"GIT_AUTHOR_NAME=release", "GIT_AUTHOR_EMAIL=release@example.com", "GIT_COMMITTER_NAME=release", "GIT_COMMITTER_EMAIL=release@example.com"}
	require.NoError(t, os.WriteFile(filepath.Join(tmp, "gitconfig"), []byte(
		"[url \"file://"+repo+"\"]\n\tinsteadOf = https://github.com/jobwatch-go/jobwatch\n[protocol \"file\"]\n\tallow = always\n"), 0o644))
	run(repo, git, "git", "init", "-q")
	run(repo, git, "git", "add", "-A")
	run(repo, git, "git", "commit", "-qm", "v0.1.0")
	run(repo, git, "git", "tag", "v0.1.0")
	var nested []string
	for _, f := range files {
		if filepath.Base(f) == "go.mod" && f != "go.mod" && !strings.HasPrefix(f, "bench/") {
			nested = append(nested, filepath.Dir(f))
			run(repo, git, "git", "tag", filepath.Dir(f)+"/v0.1.0")
		}
	}
	require.Contains(t, nested, "jobwatchtest/container")

	require.NoError(t, os.MkdirAll(consumer, 0o755))
	for name, src := range map[string]string{
		"go.mod":  "module example.com/consumer\n\ngo 1.26.0\n",
		"main.go": "package main\n\nimport (\n\t\"fmt\"\n\n\t\"github.com/jobwatch-go/jobwatch\"\n)\n\nfunc main() { fmt.Println(jobwatch.ChannelName(\"jobs\")) }\n",
		"main_test.go": "package main\n\nimport (\n\t\"testing\"\n\n\t\"github.com/jobwatch-go/jobwatch/jobwatchtest\"\n" +
			"\t_ \"github.com/jobwatch-go/jobwatch/jobwatchtest/container\"\n)\n\n" +
			"func TestMain(m *testing.M) { jobwatchtest.Main(m) }\n\n" +
			"func TestJobTable(t *testing.T) { jobwatchtest.CreateJobTable(t, jobwatchtest.NewDatabase(t), \"jobs\") }\n",
	} {
		require.NoError(t, os.WriteFile(filepath.Join(consumer, name), []byte(src), 0o644))
	}
	cache := strings.TrimSpace(run(root, nil, "go", "env", "GOMODCACHE"))
	proxy := strings.TrimSpace(run(root, nil, "go", "env", "GOPROXY"))
	env := append(git, "GOPRIVATE=github.com/jobwatch-go", "GOPROXY=file://"+filepath.Join(cache, "cache", "download")+","+proxy,
		"GOSUMDB=off", "GOFLAGS=-mod=mod", "GOMODCACHE="+filepath.Join(tmp, "modcache"), "GOBIN="+filepath.Join(tmp, "bin"))
	get := []string{"get", "github.com/jobwatch-go/jobwatch@v0.1.0"}
	for _, m := range nested {
		get = append(get, "github.com/jobwatch-go/jobwatch/"+m+"@v0.1.0")
	}
	run(consumer, env, "go", get...)
	run(consumer, env, "go", "vet", "./...")
	run(consumer, env, "go", "test", "-count=1", "./...")
	run(consumer, env, "go", "install", "github.com/jobwatch-go/jobwatch/cmd/jobwatch@v0.1.0")
	assert.Contains(t, run(consumer, env, filepath.Join(tmp, "bin", "jobwatch"), "version"), "jobwatch v0.1.0")
	// The module cache is read-only; let the test's cleanup remove it.
	run(consumer, env, "go", "clean", "-modcache")
}

// TestREADMEUsageBuilds: the README's usage example is a whole program
// that builds against this checkout, as it says.
func TestREADMEUsageBuilds(t *testing.T) {
	t.Parallel()
	readme, err := os.ReadFile("README.md")
	require.NoError(t, err)
	_, usage, ok := strings.Cut(string(readme), "\n## Usage\n")
	require.True(t, ok, "the README has a Usage section")
	_, code, ok := strings.Cut(usage, "```go\n")
	require.True(t, ok, "with a Go example")
	code, _, ok = strings.Cut(code, "```")
	require.True(t, ok)
	root, err := os.Getwd()
	require.NoError(t, err)
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, "main.go"), []byte(code), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "go.mod"), []byte("module example.com/usage\n\ngo 1.25.0\n\n"+
		"require github.com/jobwatch-go/jobwatch v0.1.0\n\nreplace github.com/jobwatch-go/jobwatch => "+root+"\n"), 0o644))
	cmd := exec.Command("go", "build", "-o", os.DevNull, ".")
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOFLAGS=-mod=mod")
	out, err := cmd.CombinedOutput()
	require.NoError(t, err, "the README's example:\n%s\n%s", code, out)
}
