package protocol

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// The shared vectors of protocol/vectors/ (README.md there): every implementation decodes and
// re-encodes them byte for byte and refuses the invalid ones with the same codes.

var vectorsDir = filepath.Join("..", "..", "protocol", "vectors")

type outcome struct {
	Message   json.RawMessage `json:"message"`
	Error     string          `json:"error"`
	RequestID *string         `json:"request_id"`
}

type frameVector struct {
	Name     string    `json:"name"`
	Sender   string    `json:"sender"`
	Codec    string    `json:"codec"`
	Input    *string   `json:"input"`
	InputHex *string   `json:"input_hex"`
	Expected []outcome `json:"expected"`
	// decode_only
	Message             json.RawMessage `json:"message"`
	CanonicalJSON       string          `json:"canonical_json"`
	CanonicalMsgpackHex string          `json:"canonical_msgpack_hex"`
}

type messageVector struct {
	Name       string          `json:"name"`
	Sender     string          `json:"sender"`
	Message    json.RawMessage `json:"message"`
	JSON       string          `json:"json"`
	MsgpackHex string          `json:"msgpack_hex"`
}

func load(t *testing.T, name string, into any) {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(vectorsDir, name))
	if err != nil {
		t.Fatalf("read vectors: %v", err)
	}
	var version struct {
		Version int `json:"version"`
	}
	if err := json.Unmarshal(data, &version); err != nil || version.Version != 1 {
		t.Fatalf("%s: unsupported version %d (%v)", name, version.Version, err)
	}
	if err := json.Unmarshal(data, into); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
}

func sender(t *testing.T, s string) Sender {
	switch s {
	case "client":
		return SenderClient
	case "gateway":
		return SenderGateway
	}
	t.Fatalf("unknown sender %q", s)
	return 0
}

func codec(t *testing.T, s string) Codec {
	switch s {
	case "json":
		return JSON
	case "msgpack":
		return Msgpack
	}
	t.Fatalf("unknown codec %q", s)
	return 0
}

func mustHex(t *testing.T, s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		t.Fatalf("bad hex: %v", err)
	}
	return b
}

// canonical parses a canonical message of a vector file with our own JSON parser (which keeps
// key order and integer/float kinds).
func canonical(t *testing.T, raw json.RawMessage) Value {
	t.Helper()
	var buf bytes.Buffer
	if err := json.Compact(&buf, raw); err != nil {
		t.Fatal(err)
	}
	v, err := ParseJSON(buf.Bytes())
	if err != nil {
		t.Fatalf("vector message does not parse: %v", err)
	}
	return v
}

func show(v Value) string { return string(AppendJSON(nil, v)) }

func checkMessage(t *testing.T, got Message, want Value, s Sender) {
	t.Helper()
	if wire := ObjectValue(got.Wire()); !Equal(wire, want) {
		t.Fatalf("decoded as\n%s\nwant\n%s", show(wire), show(want))
	}
	built, err := ParseMessage(want, s)
	if err != nil {
		t.Fatalf("the vector's message does not build: %v", err)
	}
	if !reflect.DeepEqual(normalise(built), normalise(got)) {
		t.Fatalf("built %#v, decoded %#v", built, got)
	}
}

// normalise drops the lazily built index of objects, which is not part of a message's value.
func normalise(m Message) string { return show(ObjectValue(m.Wire())) + fmt.Sprintf("%T", m) }

func decodeOne(t *testing.T, frame []byte, c Codec, s Sender) Message {
	t.Helper()
	results := Decode(frame, c, s)
	if len(results) != 1 {
		t.Fatalf("%d results, want 1", len(results))
	}
	if results[0].Err != nil {
		t.Fatalf("refused: %v", results[0].Err)
	}
	return results[0].Message
}

func TestVectorMessages(t *testing.T) {
	var file struct {
		Messages   []messageVector `json:"messages"`
		DecodeOnly []frameVector   `json:"decode_only"`
	}
	load(t, "messages.json", &file)
	if len(file.Messages) < 90 || len(file.DecodeOnly) < 40 {
		t.Fatalf("too few vectors: %d, %d", len(file.Messages), len(file.DecodeOnly))
	}
	for _, v := range file.Messages {
		t.Run(v.Name, func(t *testing.T) {
			s := sender(t, v.Sender)
			want := canonical(t, v.Message)
			fromJSON := decodeOne(t, []byte(v.JSON), JSON, s)
			fromMsgpack := decodeOne(t, mustHex(t, v.MsgpackHex), Msgpack, s)
			checkMessage(t, fromJSON, want, s)
			checkMessage(t, fromMsgpack, want, s)
			for _, m := range []Message{fromJSON, fromMsgpack} {
				j, err := Encode(m, JSON)
				if err != nil {
					t.Fatal(err)
				}
				if string(j) != v.JSON {
					t.Fatalf("JSON\n got %s\nwant %s", j, v.JSON)
				}
				mp, err := Encode(m, Msgpack)
				if err != nil {
					t.Fatal(err)
				}
				if hex.EncodeToString(mp) != v.MsgpackHex {
					t.Fatalf("msgpack\n got %x\nwant %s", mp, v.MsgpackHex)
				}
			}
		})
	}
	for _, v := range file.DecodeOnly {
		t.Run(v.Name, func(t *testing.T) {
			s := sender(t, v.Sender)
			m := decodeOne(t, input(t, v), codec(t, v.Codec), s)
			checkMessage(t, m, canonical(t, v.Message), s)
			j, _ := Encode(m, JSON)
			if string(j) != v.CanonicalJSON {
				t.Fatalf("JSON\n got %s\nwant %s", j, v.CanonicalJSON)
			}
			mp, _ := Encode(m, Msgpack)
			if hex.EncodeToString(mp) != v.CanonicalMsgpackHex {
				t.Fatalf("msgpack\n got %x\nwant %s", mp, v.CanonicalMsgpackHex)
			}
		})
	}
}

func input(t *testing.T, v frameVector) []byte {
	switch {
	case v.Input != nil:
		return []byte(*v.Input)
	case v.InputHex != nil:
		return mustHex(t, *v.InputHex)
	}
	t.Fatalf("%s: no input", v.Name)
	return nil
}

func checkOutcomes(t *testing.T, v frameVector) {
	t.Helper()
	s := sender(t, v.Sender)
	results := Decode(input(t, v), codec(t, v.Codec), s)
	if len(results) != len(v.Expected) {
		t.Fatalf("%d results, want %d: %+v", len(results), len(v.Expected), results)
	}
	for i, want := range v.Expected {
		got := results[i]
		if want.Error != "" {
			if got.Err == nil {
				t.Fatalf("#%d decoded as %s, want error %s", i, show(ObjectValue(got.Message.Wire())), want.Error)
			}
			if got.Err.Code != want.Error {
				t.Fatalf("#%d error %s (%s), want %s", i, got.Err.Code, got.Err.Message, want.Error)
			}
			wantID := ""
			if want.RequestID != nil {
				wantID = *want.RequestID
			}
			if got.Err.RequestID != wantID {
				t.Fatalf("#%d error request_id %q, want %q", i, got.Err.RequestID, wantID)
			}
			continue
		}
		if got.Err != nil {
			t.Fatalf("#%d refused with %v, want a message", i, got.Err)
		}
		if wire, w := ObjectValue(got.Message.Wire()), canonical(t, want.Message); !Equal(wire, w) {
			t.Fatalf("#%d decoded as %s, want %s", i, show(wire), show(w))
		}
	}
}

func TestVectorBatches(t *testing.T) {
	var file struct {
		Batches []frameVector `json:"batches"`
	}
	load(t, "batches.json", &file)
	if len(file.Batches) < 20 {
		t.Fatalf("too few vectors: %d", len(file.Batches))
	}
	for _, v := range file.Batches {
		t.Run(v.Name, func(t *testing.T) { checkOutcomes(t, v) })
	}
}

func TestVectorInvalid(t *testing.T) {
	var file struct {
		Invalid []frameVector `json:"invalid"`
	}
	load(t, "invalid.json", &file)
	if len(file.Invalid) < 400 {
		t.Fatalf("too few vectors: %d", len(file.Invalid))
	}
	for _, v := range file.Invalid {
		t.Run(v.Name, func(t *testing.T) { checkOutcomes(t, v) })
	}
}

// Cases too large for a data file, built here as tests/protocol/test_vectors.py does.
func TestFrameSizeBoundaries(t *testing.T) {
	for _, c := range []Codec{JSON, Msgpack} {
		t.Run(c.String(), func(t *testing.T) {
			ping := EncodeUnchecked(&Ping{ID: PingID{Set: true, IsInt: true, Int: 1}}, c)
			pings := func(n int) []byte {
				parts := make([][]byte, n)
				for i := range parts {
					parts[i] = ping
				}
				return JoinBatch(parts, c)
			}
			if r := Decode(pings(1024), c, SenderClient); len(r) != 1024 || r[1023].Err != nil {
				t.Fatalf("1024 pings: %d results", len(r))
			}
			if r := Decode(pings(1025), c, SenderClient); len(r) != 1 || r[0].Err.Code != CodeFrameTooLarge {
				t.Fatalf("1025 pings: %+v", r)
			}
			exact := chatOfSize(t, c, MaxFrameBytes)
			if r := Decode(exact, c, SenderGateway); len(r) != 1 || r[0].Err != nil {
				t.Fatalf("frame of exactly %d bytes refused: %+v", MaxFrameBytes, r[0].Err)
			}
			over := chatOfSize(t, c, MaxFrameBytes+1)
			if r := Decode(over, c, SenderGateway); len(r) != 1 || r[0].Err == nil || r[0].Err.Code != CodeFrameTooLarge {
				t.Fatalf("frame of %d bytes: %+v", MaxFrameBytes+1, r)
			}
		})
	}
	// A text frame is measured in UTF-8 bytes: fewer characters than the limit can be too large.
	text := "x" + strings.Repeat("é", MaxFrameBytes/2)
	frame := []byte(`{"type":"ping","id":"` + text + `"}`)
	if r := Decode(frame, JSON, SenderClient); r[0].Err == nil || r[0].Err.Code != CodeFrameTooLarge {
		t.Fatalf("multi-byte text frame over the limit: %+v", r)
	}
}

// chatOfSize builds a chunk whose encoding is exactly size bytes.
func chatOfSize(t *testing.T, c Codec, size int) []byte {
	t.Helper()
	m := &Chunk{RequestID: "r1", Seq: 0, Text: "x"}
	base := len(EncodeUnchecked(m, c))
	for pad := size - base; pad > 0; pad-- {
		m.Text = strings.Repeat("x", 1+pad)
		if n := len(EncodeUnchecked(m, c)); n == size {
			return EncodeUnchecked(m, c)
		} else if n < size {
			break
		}
	}
	t.Fatalf("cannot build a %d-byte frame", size)
	return nil
}

// SPEC.md §9: U+2028 and U+2029 are written raw (encoding/json would escape them), and the
// only escapes are the ones JSON requires.
func TestCanonicalJSONStrings(t *testing.T) {
	m := &Chunk{RequestID: "r1", Seq: 3, Text: "line 1\nline 2\t\"quoted\" é \x1f end \u2028"}
	got := string(EncodeUnchecked(m, JSON))
	want := `{"type":"chunk","request_id":"r1","seq":3,"text":"line 1\nline 2\t\"quoted\" é \u001f end ` + "\u2028" + `"}`
	if got != want {
		t.Fatalf("got  %s\nwant %s", got, want)
	}
	if r := Decode([]byte(`{"type":"ping","id":"\ud800"}`), JSON, SenderClient); r[0].Err == nil || r[0].Err.Code != CodeBadFrame {
		t.Fatalf("a lone surrogate must be bad_frame: %+v", r)
	}
	if r := Decode([]byte(`{"type":"ping","id":1e400}`), JSON, SenderClient); r[0].Err == nil || r[0].Err.Code != CodeBadFrame {
		t.Fatalf("a number overflowing a double must be bad_frame: %+v", r)
	}
}
