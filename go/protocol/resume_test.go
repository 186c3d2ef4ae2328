package protocol

import (
	"errors"
	"testing"
)

// Resumable requests (SPEC.md §3.3, §3.4, §3.13, §9) through the typed API; the shared vectors
// pin the same bytes from the wire side.

func TestChatResumableEncoding(t *testing.T) {
	hi := "hi"
	for _, c := range []struct {
		name string
		chat Chat
		want string
	}{
		{"absent when false", Chat{RequestID: "r1", Message: &hi, Stream: true},
			`{"type":"chat","request_id":"r1","message":"hi","stream":true}`},
		{"resumable, gateway's grace", Chat{RequestID: "r1", Message: &hi, Stream: true, Resumable: true},
			`{"type":"chat","request_id":"r1","message":"hi","stream":true,"resumable":true}`},
		{"after steps, then grace_ms", Chat{RequestID: "r1", Message: &hi, Steps: true, Resumable: true, GraceMs: MaxGraceMs},
			`{"type":"chat","request_id":"r1","message":"hi","stream":false,"steps":true,"resumable":true,"grace_ms":3600000}`},
	} {
		t.Run(c.name, func(t *testing.T) {
			got, err := Encode(&c.chat, JSON)
			if err != nil || string(got) != c.want {
				t.Fatalf("got %s, %v\nwant %s", got, err, c.want)
			}
			r := Decode(got, JSON, SenderClient)
			if r[0].Err != nil {
				t.Fatal(r[0].Err)
			}
			back := r[0].Message.(*Chat)
			if back.Resumable != c.chat.Resumable || back.GraceMs != c.chat.GraceMs {
				t.Fatalf("decoded resumable %v grace %d", back.Resumable, back.GraceMs)
			}
		})
	}
	for _, c := range []struct {
		name string
		chat Chat
	}{
		{"grace without resumable", Chat{RequestID: "r1", Message: &hi, GraceMs: 1000}},
		{"grace above the maximum", Chat{RequestID: "r1", Message: &hi, Resumable: true, GraceMs: MaxGraceMs + 1}},
		{"negative grace", Chat{RequestID: "r1", Message: &hi, Resumable: true, GraceMs: -1}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var pe *ProtocolError
			if got, err := Encode(&c.chat, JSON); !errors.As(err, &pe) || pe.Code != CodeInvalidField {
				t.Fatalf("encoded %s, %v; want invalid_field", got, err)
			}
		})
	}
}

func TestResumeEncoding(t *testing.T) {
	zero, big := int64(0), int64(MaxSafeInteger)
	for _, c := range []struct {
		m    Message
		want string
	}{
		{&Resume{RequestID: "r9", Epoch: "g7f3a.12"}, `{"type":"resume","request_id":"r9","epoch":"g7f3a.12"}`},
		{&Resume{RequestID: "r9", Epoch: "e", AfterSeq: &zero, UserID: "u1"}, `{"type":"resume","request_id":"r9","epoch":"e","after_seq":0,"user_id":"u1"}`},
		{&Resume{RequestID: "r9", Epoch: "e", AfterSeq: &big}, `{"type":"resume","request_id":"r9","epoch":"e","after_seq":9007199254740991}`},
		{&Resumable{RequestID: "r9", Epoch: "g7f3a.12", GraceMs: 60000}, `{"type":"resumable","request_id":"r9","epoch":"g7f3a.12","grace_ms":60000}`},
		{&ResumeResult{RequestID: "r9", Status: ResumeResumed}, `{"type":"resume_result","request_id":"r9","status":"resumed"}`},
		{&Moved{RequestID: "r9"}, `{"type":"moved","request_id":"r9"}`},
	} {
		got, err := Encode(c.m, JSON)
		if err != nil || string(got) != c.want {
			t.Fatalf("got %s, %v\nwant %s", got, err, c.want)
		}
	}
	negative := int64(-1)
	for _, m := range []Message{
		&Resume{RequestID: "r9", Epoch: ""},
		&Resume{RequestID: "r9", Epoch: "a/b"},
		&Resume{RequestID: "r9", Epoch: string(make([]byte, MaxEpochLength+1))},
		&Resume{RequestID: "r9", Epoch: "e", AfterSeq: &negative},
		&Resumable{RequestID: "r9", Epoch: "e", GraceMs: 0},
		&ResumeResult{RequestID: "r9", Status: "gone"},
		&Moved{},
	} {
		if got, err := Encode(m, JSON); err == nil {
			t.Fatalf("%#v encoded as %s; want invalid_field", m, got)
		}
	}
	if !ValidEpoch("A-z_0:9.x") || ValidEpoch("é") {
		t.Fatal("EPOCH_PATTERN")
	}
}
