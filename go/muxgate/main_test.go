package muxgate_test

import (
	"fmt"
	"os"
	"syscall"
	"testing"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) {
	g, err := startGateway(nil)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	shared = g
	code := m.Run()
	g.stop(syscall.SIGTERM)
	if code == 0 {
		// No goroutine of the SDK (reader, writer, dialer, task, AfterFunc) outlives its Client.
		if err := goleak.Find(); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}
