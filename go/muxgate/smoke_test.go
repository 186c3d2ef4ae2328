package muxgate_test

import (
	"testing"
	"time"

	"github.com/muxgate/muxgate/go/muxgate"
)

func TestSmoke(t *testing.T) {
	for _, codec := range []muxgate.Codec{muxgate.JSON, muxgate.Msgpack} {
		c := muxgate.NewClient(muxgate.WithURL(shared.URL), muxgate.WithCodec(codec))
		ctx := ctxT(t, 10*time.Second)
		resp, err := c.Chat(ctx, &muxgate.ChatRequest{Message: "hello", Metadata: map[string]any{"tokens": 5, "token_delay_ms": 0, "plan_ms": 0, "tool_ms": 0}})
		if err != nil {
			t.Fatal(err)
		}
		t.Logf("%+v", resp)
		n := 0
		for chunk, err := range c.ChatStream(ctx, &muxgate.ChatRequest{Message: "hello", Metadata: map[string]any{"tokens": 5, "token_delay_ms": 0, "plan_ms": 0, "tool_ms": 0}}) {
			if err != nil {
				t.Fatal(err)
			}
			n++
			t.Logf("chunk %+v", chunk)
		}
		c.Close()
	}
}
