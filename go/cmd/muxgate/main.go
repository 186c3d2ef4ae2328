// Command muxgate streams one answer from a muxgate gateway and cancels it on Ctrl-C.
//
//	go -C go run ./cmd/muxgate "Write a long story"
//	go -C go run ./cmd/muxgate -metadata '{"tokens": 400}' -codec msgpack "Hello"
//	go -C go run ./cmd/muxgate -steps -metadata '{"tool_ms": 3000}' "Find flights to Lisbon"
//
// It reads MUXGATE_URL (default ws://localhost:8001), MUXGATE_CLIENT_KEY or MUXGATE_TOKEN, and
// MUXGATE_USER_ID, like the SDK. Ctrl-C during the answer cancels the request on the gateway
// (the SDK sends the cancel frame when the context ends) and prints what it saved; exit status
// 0 when the answer completed, 130 when cancelled by Ctrl-C, 1 on an error. With -steps it
// prints the pipeline's steps on stderr as they start and end, and after a Ctrl-C where the
// pipeline halted.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/muxgate/muxgate/go/muxgate"
)

func main() { os.Exit(run()) }

func run() int {
	url := flag.String("url", "", "gateway URL (default: MUXGATE_URL or ws://localhost:8001)")
	codec := flag.String("codec", "json", "json or msgpack")
	userID := flag.String("user-id", "", "user to act for (default: MUXGATE_USER_ID)")
	requestID := flag.String("request-id", "", "request id (default: generated)")
	timeout := flag.Duration("timeout", 0, "the gateway's deadline for the request (e.g. 30s)")
	metadata := flag.String("metadata", "", `JSON object for the backend, e.g. '{"tokens": 400}'`)
	steps := flag.Bool("steps", false, "print the pipeline's steps (on stderr) and where it halted")
	flag.Usage = func() {
		fmt.Fprintf(flag.CommandLine.Output(), "usage: muxgate [flags] message...\n")
		flag.PrintDefaults()
	}
	flag.Parse()
	if flag.NArg() == 0 {
		flag.Usage()
		return 2
	}
	opts := []muxgate.Option{}
	if *url != "" {
		opts = append(opts, muxgate.WithURL(*url))
	}
	if *userID != "" {
		opts = append(opts, muxgate.WithUserID(*userID))
	}
	switch *codec {
	case "json":
	case "msgpack":
		opts = append(opts, muxgate.WithCodec(muxgate.Msgpack))
	default:
		fmt.Fprintf(os.Stderr, "muxgate: unknown codec %q\n", *codec)
		return 2
	}
	req := &muxgate.ChatRequest{Message: strings.Join(flag.Args(), " "), RequestID: *requestID, Timeout: *timeout}
	if *steps {
		req.OnStep = func(s muxgate.Step) { // between chunks, in the order the gateway sent them
			fmt.Fprintf(os.Stderr, "\n[step %d · %s %s · %s]\n", s.Index, s.Kind, s.Name, s.State)
		}
	}
	if *metadata != "" {
		if err := json.Unmarshal([]byte(*metadata), &req.Metadata); err != nil {
			fmt.Fprintf(os.Stderr, "muxgate: -metadata: %v\n", err)
			return 2
		}
	}

	client := muxgate.NewClient(opts...)
	defer client.Close()
	// Ctrl-C (or SIGTERM) ends the context: the SDK cancels the request on the gateway at once.
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	for chunk, err := range client.ChatStream(ctx, req) {
		if err != nil {
			return report(client, err)
		}
		fmt.Print(chunk.Text)
	}
	fmt.Println()
	return 0
}

// report prints how the stream ended when it did not complete.
func report(client *muxgate.Client, err error) int {
	fmt.Println()
	var cancelled *muxgate.CancelledError
	if !errors.As(err, &cancelled) {
		fmt.Fprintln(os.Stderr, "muxgate:", err)
		return 1
	}
	line := "[cancelled · " + cancelled.RequestID
	if resp := cancelled.Response; resp != nil {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		if usage, uerr := client.FinalUsage(ctx, resp); uerr == nil {
			line += fmt.Sprintf(" · %d tokens saved · %d in / %d out", usage.SavedTokens, usage.InputTokens, usage.OutputTokens)
		}
		if halt, herr := client.FinalHalt(ctx, resp); herr == nil && halt != nil {
			switch {
			case halt.Step == nil:
				line += " · halted before any step"
			case halt.Aborted:
				line += " · halted inside " + halt.Step.Name
			default:
				line += " · halted after " + halt.Step.Name
			}
		}
		if resp.Reason != "" && resp.Reason != muxgate.ReasonClient {
			line += " · reason " + string(resp.Reason)
		}
	}
	fmt.Println(line + "]")
	if errors.Is(err, context.Canceled) {
		return 130
	}
	return 1
}
