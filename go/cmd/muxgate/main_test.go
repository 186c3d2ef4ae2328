package main_test

import (
	"bufio"
	"context"
	"encoding/json"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// The example program against a real gateway: it streams, and Ctrl-C (SIGINT) cancels the
// request on the gateway.
func TestCtrlCCancels(t *testing.T) {
	root, _ := filepath.Abs(filepath.Join("..", "..", ".."))
	bin := filepath.Join(t.TempDir(), "muxgate")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	gw := exec.Command("python3", "-m", "gateway.cli", "serve", "--port", "0", "--log-format", "json")
	gw.Dir = root
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "MUXGATE_") {
			gw.Env = append(gw.Env, kv)
		}
	}
	stderr, _ := gw.StderrPipe()
	if err := gw.Start(); err != nil {
		t.Fatal(err)
	}
	drained := make(chan struct{})
	started := make(chan map[string]any, 1)
	go func() {
		defer close(drained)
		sc := bufio.NewScanner(stderr)
		for sc.Scan() {
			var ev map[string]any
			if json.Unmarshal(sc.Bytes(), &ev) == nil && ev["event"] == "gateway.started" {
				started <- ev
			}
		}
	}()
	t.Cleanup(func() { _ = gw.Process.Kill(); <-drained; _ = gw.Wait() })
	var ev map[string]any
	select {
	case ev = <-started:
	case <-time.After(30 * time.Second):
		t.Fatal("gateway did not start")
	}

	cmd := exec.Command(bin, "-metadata", `{"tokens": 4000, "token_delay_ms": 5, "plan_ms": 0, "tool_ms": 0}`, "-request-id", "ctrl-c-1", "Write a long story")
	cmd.Env = append(os.Environ(), "MUXGATE_URL="+ev["url"].(string))
	stdout, _ := cmd.StdoutPipe()
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	r := bufio.NewReader(stdout)
	if _, err := r.ReadByte(); err != nil { // the answer is streaming
		t.Fatal(err)
	}
	_ = cmd.Process.Signal(syscall.SIGINT)
	rest, _ := readAll(r)
	err := cmd.Wait()
	var exit *exec.ExitError
	if !strings.Contains(rest, "[cancelled · ctrl-c-1 · ") || !strings.Contains(rest, "tokens saved") {
		t.Fatalf("output %q", rest)
	}
	if !asExit(err, &exit) || exit.ExitCode() != 130 {
		t.Fatalf("exit %v", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	req, _ := http.NewRequestWithContext(ctx, "GET", ev["http"].(string)+"/v1/requests/ctrl-c-1", nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var info struct{ Status, Reason string }
	_ = json.NewDecoder(resp.Body).Decode(&info)
	if info.Status != "cancelled" || info.Reason != "client" {
		t.Fatalf("gateway says %+v", info)
	}
}

func readAll(r *bufio.Reader) (string, error) {
	var b strings.Builder
	_, err := r.WriteTo(&b)
	return b.String(), err
}

func asExit(err error, target **exec.ExitError) bool {
	e, ok := err.(*exec.ExitError)
	*target = e
	return ok
}
