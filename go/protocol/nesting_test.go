package protocol

import (
	"strings"
	"testing"

	"github.com/vmihailenco/msgpack/v5"
)

// SPEC.md §2.3: a message nested deeper than MaxNestingDepth is bad_frame, in both codecs;
// the lines around it (JSON) still decode.
func nestedPong(levels int) map[string]any {
	var x any = 1
	for range levels - 1 {
		x = []any{x}
	}
	return map[string]any{"type": "pong", "id": "p", "x": x}
}

func TestNestingJSON(t *testing.T) {
	line := func(levels int) string {
		return `{"type":"pong","id":"p","x":` + strings.Repeat("[", levels-1) + "1" + strings.Repeat("]", levels-1) + "}"
	}
	ok := Decode([]byte(line(MaxNestingDepth)), JSON, SenderGateway)
	if len(ok) != 1 || ok[0].Err != nil {
		t.Fatalf("depth %d refused: %+v", MaxNestingDepth, ok)
	}
	deep := "[" + strings.Repeat("[", 100000) + "12345678901234567890" + strings.Repeat("]", 100000) + "]"
	good := `{"type":"pong","id":"p"}`
	got := Decode([]byte(good+"\n"+line(MaxNestingDepth+1)+"\n"+deep+"\n"+good), JSON, SenderGateway)
	if len(got) != 4 || got[0].Err != nil || got[3].Err != nil {
		t.Fatalf("good lines lost: %+v", got)
	}
	for _, r := range got[1:3] {
		if r.Err == nil || r.Err.Code != CodeBadFrame {
			t.Fatalf("too deep not bad_frame: %+v", r)
		}
	}
}

func TestNestingMsgpack(t *testing.T) {
	enc := func(levels int) []byte {
		b, err := msgpack.Marshal(nestedPong(levels))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if r := Decode(enc(MaxNestingDepth), Msgpack, SenderGateway); len(r) != 1 || r[0].Err != nil {
		t.Fatalf("depth %d refused: %+v", MaxNestingDepth, r)
	}
	r := Decode(enc(MaxNestingDepth+1), Msgpack, SenderGateway)
	if len(r) != 1 || r[0].Err == nil || r[0].Err.Code != CodeBadFrame {
		t.Fatalf("too deep not bad_frame: %+v", r)
	}
}
