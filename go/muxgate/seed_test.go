package muxgate_test

// The Go snippets of the product page (../shared/seed-request-cancellation.md, "Request
// Cancellation"), compiled and run against a real gateway. Only the import line (the package
// is imported under the seed's name muxi) and the construction lines (ctx, client, userID)
// differ; the snippets' own lines are as on the page (gofmt'ed), and the checks come after.

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"

	muxi "github.com/muxgate/muxgate/go/muxgate"
)

// --- seed: "Cancel After Timeout" (Go tab), verbatim ---------------------------------------

var client *muxi.Client // construction: the snippet's free variables
var userID string

func chatWithTimeout(ctx context.Context, message string, timeout time.Duration) (*muxi.Response, error) {
	requestID := fmt.Sprintf("req_%d", time.Now().UnixNano())

	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()

	response, err := client.Chat(ctx, &muxi.ChatRequest{
		Message:   message,
		RequestID: requestID,
	})

	if ctx.Err() == context.DeadlineExceeded {
		client.CancelRequest(context.Background(), requestID, userID)
		return nil, fmt.Errorf("request timed out after %v", timeout)
	}

	return response, err
}

// --- end of the seed's snippet --------------------------------------------------------------

func TestSeedQuickStart(t *testing.T) {
	ctx := context.Background()                        // construction
	client := muxi.NewClient(muxi.WithURL(shared.URL)) // construction
	t.Cleanup(func() { client.Close() })

	// --- seed: "Quick Start" (Go tab), verbatim
	// Start a request
	requestID := "my-request-123"
	task := client.ChatAsync(ctx, &muxi.ChatRequest{
		Message:   "Write a very long story...",
		RequestID: requestID,
		UserID:    "user123",
	})

	// Cancel it
	client.CancelRequest(ctx, requestID, "user123")
	// --- end of the seed's snippet

	response, err := task.Wait()
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := json.Marshal(response)
	var shape struct {
		Content   string `json:"content"`
		Status    string `json:"status"`
		RequestID string `json:"request_id"`
	}
	_ = json.Unmarshal(raw, &shape)
	// The page's "Cancelled Response": {"content": "", "status": "cancelled", "request_id": ...}
	if shape.Content != "" || shape.Status != "cancelled" || shape.RequestID != requestID {
		t.Fatalf("response %s", raw)
	}
	// Idempotent: "subsequent calls return already cancelled".
	if res, err := client.CancelRequest(ctx, requestID, "user123"); err != nil || res != muxi.ResultAlreadyCancelled {
		t.Fatalf("%v %v", res, err)
	}
	if _, err := client.FinalUsage(ctxT(t, 10*time.Second), response); err != nil { // let the id be reused by a rerun
		t.Fatal(err)
	}
}

var seedRequestID = regexp.MustCompile(`^req_[0-9]{16,}$`)

func TestSeedChatWithTimeout(t *testing.T) {
	client = muxi.NewClient(muxi.WithURL(shared.URL)) // construction
	userID = ""                                       // the anonymous user, as the page's calls leave it
	t.Cleanup(func() { client.Close() })

	// The default simulated answer takes about 2 s: 300 ms times out.
	response, err := chatWithTimeout(context.Background(), "Write a very long story...", 300*time.Millisecond)
	if response != nil || err == nil || err.Error() != "request timed out after 300ms" {
		t.Fatalf("%+v %v", response, err)
	}
	// The deadline alone cancelled it on the gateway (reason client, from the SDK's cancel frame);
	// the snippet's own CancelRequest then found it already cancelled. The gateway logs it.
	deadline := time.Now().Add(10 * time.Second)
	for !cancelledByClient(shared.log()) {
		if time.Now().After(deadline) {
			t.Fatal("the gateway logged no request.cancelled with reason client for the seed's request")
		}
		time.Sleep(20 * time.Millisecond) // polling the gateway's log: no event to await
	}

	// And within the timeout, the answer.
	response, err = chatWithTimeout(context.Background(), "Hello", 20*time.Second)
	if err != nil || response.Status != muxi.StatusCompleted || response.Content == "" {
		t.Fatalf("%+v %v", response, err)
	}
}

func cancelledByClient(log string) bool {
	for _, line := range strings.Split(log, "\n") {
		var ev struct {
			Event     string `json:"event"`
			RequestID string `json:"request_id"`
			Reason    string `json:"reason"`
		}
		if json.Unmarshal([]byte(line), &ev) == nil && ev.Event == "request.cancelled" &&
			seedRequestID.MatchString(ev.RequestID) && ev.Reason == "client" {
			return true
		}
	}
	return false
}
