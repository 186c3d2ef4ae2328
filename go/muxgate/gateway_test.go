package muxgate_test

// A real gateway process for the tests: `python3 -m gateway.cli serve` from the repository
// root, on an ephemeral port, over real sockets (no mock of our server).

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

var repoRoot = func() string {
	abs, err := filepath.Abs(filepath.Join("..", ".."))
	if err != nil {
		panic(err)
	}
	return abs
}()

type gateway struct {
	URL  string // ws://127.0.0.1:PORT/v1/ws
	HTTP string // http://127.0.0.1:PORT
	Port string
	args []string
	env  []string
	cmd  *exec.Cmd
	done chan struct{} // closed when stderr is drained (the process ended)
	mu   sync.Mutex
	logs []string
}

// startGateway starts a gateway with extra flags and MUXGATE_* variables; every other
// MUXGATE_* variable of this process is filtered out.
func startGateway(args []string, env ...string) (*gateway, error) {
	g := &gateway{args: args, env: env}
	if err := g.start("0"); err != nil {
		return nil, err
	}
	return g, nil
}

func (g *gateway) start(port string) error {
	argv := append([]string{"-m", "gateway.cli", "serve", "--port", port, "--log-format", "json"}, g.args...)
	cmd := exec.Command("python3", argv...)
	cmd.Dir = repoRoot
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "MUXGATE_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, g.env...)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return err
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start gateway: %w", err)
	}
	started := make(chan map[string]any, 1)
	done := make(chan struct{})
	go func() { // keep draining stderr, or the gateway blocks on its log writes
		defer close(done)
		sc := bufio.NewScanner(stderr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			g.mu.Lock()
			g.logs = append(g.logs, line)
			if len(g.logs) > 20000 { // keep the most recent lines
				g.logs = append(g.logs[:0], g.logs[10000:]...)
			}
			g.mu.Unlock()
			var ev map[string]any
			if json.Unmarshal([]byte(line), &ev) == nil && ev["event"] == "gateway.started" {
				select {
				case started <- ev:
				default:
				}
			}
		}
	}()
	select {
	case ev := <-started:
		g.cmd, g.done = cmd, done
		g.URL, _ = ev["url"].(string)
		g.HTTP, _ = ev["http"].(string)
		u, err := url.Parse(g.HTTP)
		if err != nil {
			return err
		}
		g.Port = u.Port()
		return nil
	case <-done:
		_ = cmd.Wait()
		return fmt.Errorf("gateway exited before starting:\n%s", g.log())
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		<-done
		_ = cmd.Wait()
		return fmt.Errorf("gateway did not start in 30s:\n%s", g.log())
	}
}

func (g *gateway) log() string {
	g.mu.Lock()
	defer g.mu.Unlock()
	return strings.Join(g.logs, "\n")
}

// stop sends sig and waits for the process (SIGKILL after 15s).
func (g *gateway) stop(sig syscall.Signal) {
	if g.cmd == nil {
		return
	}
	_ = g.cmd.Process.Signal(sig)
	select {
	case <-g.done:
	case <-time.After(15 * time.Second):
		_ = g.cmd.Process.Kill()
		<-g.done
	}
	_ = g.cmd.Wait()
	g.cmd = nil
}

// restart starts a new gateway process on the same port.
func (g *gateway) restart() error { return g.start(g.Port) }

func newGateway(t *testing.T, args []string, env ...string) *gateway {
	t.Helper()
	g, err := startGateway(args, env...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.stop(syscall.SIGKILL) })
	return g
}

// shared is the gateway most tests use; started by TestMain.
var shared *gateway

// ctxT is a context bounded by the test's deadline guard.
func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}
