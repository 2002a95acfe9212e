package jobwatch_test

import (
	"io/fs"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

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
		if !d.IsDir() && d.Name() == "go.mod" && path != "go.mod" {
			dirs = append(dirs, filepath.Dir(path))
		}
		return nil
	})
	require.NoError(t, err)
	require.NotEmpty(t, dirs, "no nested module found: jobwatchtest is one")
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
