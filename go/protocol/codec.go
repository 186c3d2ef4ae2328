package protocol

import (
	"bytes"
	"errors"
	"fmt"
)

// Codec is a wire encoding, chosen per connection by WebSocket subprotocol (SPEC.md §2.2).
type Codec int

// The two codecs.
const (
	JSON Codec = iota
	Msgpack
)

// Subprotocol names the codec's WebSocket subprotocol.
func (c Codec) Subprotocol() string {
	if c == Msgpack {
		return "muxgate.v1.msgpack"
	}
	return "muxgate.v1.json"
}

// IsText reports whether the codec's frames are WebSocket text frames.
func (c Codec) IsText() bool { return c == JSON }

func (c Codec) String() string {
	if c == Msgpack {
		return "msgpack"
	}
	return "json"
}

// CodecFromSubprotocol maps a negotiated subprotocol to its codec; none means JSON.
func CodecFromSubprotocol(name string) (Codec, bool) {
	switch name {
	case "", "muxgate.v1.json":
		return JSON, true
	case "muxgate.v1.msgpack":
		return Msgpack, true
	}
	return JSON, false
}

// Encode validates m and returns its canonical bytes as one frame's payload. A message that
// breaks the protocol is a local *ProtocolError (invalid_field); nothing is encoded.
func Encode(m Message, c Codec) ([]byte, error) {
	if err := m.Validate(); err != nil {
		return nil, err
	}
	return EncodeUnchecked(m, c), nil
}

// EncodeUnchecked encodes without validating (for messages already known to be valid).
func EncodeUnchecked(m Message, c Codec) []byte {
	v := ObjectValue(m.Wire())
	if c == Msgpack {
		return AppendMsgpack(nil, v)
	}
	return AppendJSON(nil, v)
}

// JoinBatch packs encoded messages into one frame (SPEC.md §2.4): LF-separated JSON lines,
// concatenated msgpack maps.
func JoinBatch(parts [][]byte, c Codec) []byte {
	if c == Msgpack {
		return bytes.Join(parts, nil)
	}
	return bytes.Join(parts, []byte{'\n'})
}

// Result is one decoded message of a frame, or the error that refuses it.
type Result struct {
	Message Message
	Err     *ProtocolError
}

func tooLarge(msg string) []Result {
	return []Result{{Err: &ProtocolError{Code: CodeFrameTooLarge, Message: msg, Remote: true}}}
}

func blank(line []byte) bool {
	for _, c := range line {
		if c != ' ' && c != '\t' && c != '\r' {
			return false
		}
	}
	return true
}

// Decode decodes one frame from sender into its messages, in order (SPEC.md §2.4). It never
// fails as a whole: each refused message is a Result with Err, exactly as the reference does.
func Decode(frame []byte, c Codec, sender Sender) []Result {
	if len(frame) == 0 {
		return []Result{{Err: badFrame("empty frame")}}
	}
	if len(frame) > MaxFrameBytes {
		return tooLarge(fmt.Sprintf("frame exceeds %d bytes", MaxFrameBytes))
	}
	var values []Value
	var errs []*ProtocolError // parallel to values: a decode error in that place
	if c == JSON {
		for _, line := range bytes.Split(frame, []byte{'\n'}) {
			if blank(line) {
				continue
			}
			v, err := ParseJSON(line)
			values = append(values, v)
			if err != nil {
				errs = append(errs, badFrame(decodeFailure(err, "invalid JSON")))
			} else {
				errs = append(errs, nil)
			}
			if len(values) > MaxBatchMessages {
				break
			}
		}
	} else {
		r := newMsgpackReader(frame)
		for r.more() && len(values) <= MaxBatchMessages {
			v, err := r.next()
			values = append(values, v)
			if err != nil {
				errs = append(errs, badFrame(decodeFailure(err, "invalid msgpack")))
				break // no resynchronisation point
			}
			errs = append(errs, nil)
		}
	}
	if len(values) == 0 {
		return []Result{{Err: badFrame("empty frame")}}
	}
	if len(values) > MaxBatchMessages {
		return tooLarge(fmt.Sprintf("frame carries more than %d messages", MaxBatchMessages))
	}
	out := make([]Result, len(values))
	for i, v := range values {
		if errs[i] != nil {
			out[i].Err = errs[i]
			continue
		}
		m, err := ParseMessage(v, sender)
		if err != nil {
			out[i].Err = err.(*ProtocolError)
		} else {
			out[i].Message = m
		}
	}
	return out
}

// decodeFailure is the bad_frame message for a parser's error: the nesting bound is named.
func decodeFailure(err error, otherwise string) string {
	if errors.Is(err, errTooDeep) {
		return "nested deeper than 64 levels"
	}
	return otherwise
}
