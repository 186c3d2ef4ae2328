package protocol

import (
	"errors"
	"reflect"
	"testing"
)

// usage.estimated (SPEC.md §3.8): optional, distinct known names, canonical order on the wire.
func TestUsageEstimated(t *testing.T) {
	resp := func(estimated []string) *Response {
		return &Response{RequestID: "r1", Status: StatusCompleted, Usage: Usage{InputTokens: 1, OutputTokens: 2, Final: true, Estimated: estimated}}
	}
	for _, c := range []struct {
		name      string
		estimated []string
		json      string
	}{
		{"absent", nil, `"final":true}}`},
		{"empty", []string{}, `"final":true,"estimated":[]}}`},
		{"reordered", []string{"saved_tokens", "input_tokens"}, `"final":true,"estimated":["input_tokens","saved_tokens"]}}`},
	} {
		t.Run(c.name, func(t *testing.T) {
			frame, err := Encode(resp(c.estimated), JSON)
			if err != nil {
				t.Fatal(err)
			}
			if got := string(frame); len(got) < len(c.json) || got[len(got)-len(c.json):] != c.json {
				t.Fatalf("encoded %s, want it to end with %s", got, c.json)
			}
			results := Decode(frame, JSON, SenderGateway)
			if len(results) != 1 || results[0].Err != nil {
				t.Fatalf("decode: %+v", results)
			}
			got := results[0].Message.(*Response).Usage.Estimated
			want, _ := canonicalEstimated(c.estimated)
			if (got == nil) != (c.estimated == nil) || !reflect.DeepEqual(append([]string{}, got...), append([]string{}, want...)) {
				t.Fatalf("decoded %#v, want %#v", got, want)
			}
		})
	}
	for _, bad := range [][]string{{"cached_tokens"}, {"final"}, {"output_tokens", "output_tokens"}, {""}} {
		_, err := Encode(resp(bad), JSON)
		var pe *ProtocolError
		if !errors.As(err, &pe) || pe.Code != "invalid_field" {
			t.Fatalf("Encode with estimated %q: %v, want invalid_field", bad, err)
		}
	}
}
