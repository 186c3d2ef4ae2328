package muxgate_test

// The ```go blocks of README.md's Go SDK section, and those of go/README.md between its
// go:examples markers, are complete programs: each is compiled in a module of its own (pointing
// at this one with a replace directive) and run against a live gateway, found through
// MUXGATE_URL as a user's would be.

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// readmeGoBlocks returns the ```go blocks of file (relative to the repository root) between
// its markers <!-- name:start --> and <!-- name:end -->.
func readmeGoBlocks(t *testing.T, file, name string) []string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(repoRoot, file))
	if err != nil {
		t.Fatal(err)
	}
	text := string(raw)
	start := strings.Index(text, "<!-- "+name+":start -->")
	end := strings.Index(text, "<!-- "+name+":end -->")
	if start < 0 || end < start {
		t.Fatalf("%s has no %s markers", file, name)
	}
	var blocks []string
	lines := strings.Split(text[start:end], "\n")
	for i := 0; i < len(lines); i++ {
		if strings.TrimSpace(lines[i]) != "```go" {
			continue
		}
		var b strings.Builder
		for i++; i < len(lines) && strings.TrimSpace(lines[i]) != "```"; i++ {
			b.WriteString(lines[i] + "\n")
		}
		blocks = append(blocks, b.String())
	}
	return blocks
}

func TestReadmeGoExamples(t *testing.T) {
	blocks := readmeGoBlocks(t, "README.md", "section:go")
	if len(blocks) < 2 {
		t.Fatalf("expected the README's Go examples, found %d blocks", len(blocks))
	}
	sdk := readmeGoBlocks(t, filepath.Join("go", "README.md"), "go:examples")
	if len(sdk) < 1 {
		t.Fatal("expected go/README.md's examples (steps and halts)")
	}
	blocks = append(blocks, sdk...)
	goDir := filepath.Join(repoRoot, "go")
	dir := t.TempDir()
	gomod := fmt.Sprintf("module readmeexamples\n\ngo 1.23\n\nrequire github.com/muxgate/muxgate/go v0.0.0\n\nreplace github.com/muxgate/muxgate/go => %s\n", goDir)
	sum, err := os.ReadFile(filepath.Join(goDir, "go.sum"))
	if err != nil {
		t.Fatal(err)
	}
	must(t, os.WriteFile(filepath.Join(dir, "go.mod"), []byte(gomod), 0o644))
	must(t, os.WriteFile(filepath.Join(dir, "go.sum"), sum, 0o644))
	for i, block := range blocks {
		if !strings.HasPrefix(block, "package main\n") {
			t.Fatalf("README Go block %d is not a complete program", i+1)
		}
		sub := filepath.Join(dir, fmt.Sprintf("example%d", i+1))
		must(t, os.MkdirAll(sub, 0o755))
		must(t, os.WriteFile(filepath.Join(sub, "main.go"), []byte(block), 0o644))
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	bin := filepath.Join(dir, "bin")
	build := exec.CommandContext(ctx, "go", "build", "-mod=mod", "-o", bin+string(filepath.Separator), "./...")
	build.Dir = dir
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("README examples do not build: %v\n%s", err, out)
	}
	for i := range blocks {
		name := fmt.Sprintf("example%d", i+1)
		t.Run(name, func(t *testing.T) {
			run := exec.CommandContext(ctx, filepath.Join(bin, name))
			for _, kv := range os.Environ() {
				if !strings.HasPrefix(kv, "MUXGATE_") {
					run.Env = append(run.Env, kv)
				}
			}
			run.Env = append(run.Env, "MUXGATE_URL="+strings.TrimSuffix(shared.URL, "/v1/ws"))
			out, err := run.CombinedOutput()
			if err != nil {
				t.Fatalf("README example %d failed: %v\n%s", i+1, err, out)
			}
			t.Logf("%s", out)
		})
	}
}

func must(t *testing.T, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}
