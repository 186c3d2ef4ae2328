package protocol

import (
	"bytes"
	"errors"
	"math"
	"unicode/utf8"

	"github.com/vmihailenco/msgpack/v5"
	"github.com/vmihailenco/msgpack/v5/msgpcode"
)

// msgpack: github.com/vmihailenco/msgpack/v5 reads and writes the tokens; the structure is
// walked here, so that a str is told from a bin, a map key of another kind is refused, and
// integer widths are free on input but minimal on output (SPEC.md §9).

var errMsgpack = errors.New("invalid msgpack")

// errTooDeep: a message nested deeper than MaxNestingDepth (SPEC.md §2.3), in either codec.
var errTooDeep = errors.New("nested deeper than 64 levels")

// msgpackReader walks concatenated msgpack objects in one frame.
type msgpackReader struct {
	r *bytes.Reader
	d *msgpack.Decoder
}

func newMsgpackReader(b []byte) *msgpackReader {
	r := bytes.NewReader(b)
	return &msgpackReader{r: r, d: msgpack.NewDecoder(r)} // *bytes.Reader: no read-ahead
}

func (m *msgpackReader) more() bool { return m.r.Len() > 0 }

// next reads one object; an error means the object was malformed and the frame is over
// (SPEC.md §2.4: there is no resynchronisation point).
func (m *msgpackReader) next() (Value, error) { return m.value(0) }

func (m *msgpackReader) str() (string, error) {
	s, err := m.d.DecodeString()
	if err != nil {
		return "", err
	}
	if !utf8.ValidString(s) {
		return "", errMsgpack
	}
	return s, nil
}

// value reads one value; depth is the number of containers around it (0 for a message).
func (m *msgpackReader) value(depth int) (Value, error) {
	d := m.d
	c, err := d.PeekCode()
	if err != nil {
		return Value{}, err
	}
	switch {
	case c == msgpcode.Uint64:
		u, err := d.DecodeUint64()
		if err != nil {
			return Value{}, err
		}
		if u > math.MaxInt64 {
			return Value{Kind: KindInt, Overflow: true}, nil
		}
		return Int(int64(u)), nil
	case msgpcode.IsFixedNum(c) || c >= msgpcode.Uint8 && c <= msgpcode.Int64:
		i, err := d.DecodeInt64()
		return Int(i), err
	case c == msgpcode.Nil:
		return Null(), d.DecodeNil()
	case c == msgpcode.True || c == msgpcode.False:
		b, err := d.DecodeBool()
		return Bool(b), err
	case c == msgpcode.Float || c == msgpcode.Double:
		f, err := d.DecodeFloat64()
		return Float(f), err
	case msgpcode.IsString(c):
		s, err := m.str()
		return String(s), err
	case msgpcode.IsBin(c):
		b, err := d.DecodeBytes()
		return Value{Kind: KindBin, Str: string(b)}, err
	case msgpcode.IsExt(c):
		return Value{Kind: KindExt}, d.Skip()
	case msgpcode.IsFixedArray(c) || c == msgpcode.Array16 || c == msgpcode.Array32:
		if depth >= MaxNestingDepth { // SPEC.md §2.3: this container would be level depth+1
			return Value{}, errTooDeep
		}
		n, err := d.DecodeArrayLen()
		if err != nil {
			return Value{}, err
		}
		items := make([]Value, 0, min(n, m.r.Len()))
		for range n {
			v, err := m.value(depth + 1)
			if err != nil {
				return Value{}, err
			}
			items = append(items, v)
		}
		return Array(items...), nil
	case msgpcode.IsFixedMap(c) || c == msgpcode.Map16 || c == msgpcode.Map32:
		if depth >= MaxNestingDepth {
			return Value{}, errTooDeep
		}
		n, err := d.DecodeMapLen()
		if err != nil {
			return Value{}, err
		}
		o := &Object{Members: make([]Member, 0, min(n, m.r.Len()/2))}
		for range n {
			kc, err := d.PeekCode()
			if err != nil {
				return Value{}, err
			}
			var key string
			bin := msgpcode.IsBin(kc)
			switch {
			case msgpcode.IsString(kc):
				key, err = m.str()
			case bin:
				var kb []byte
				kb, err = d.DecodeBytes()
				key = string(kb)
			default:
				return Value{}, errMsgpack // SPEC.md §2.3: a key neither str nor bin
			}
			if err != nil {
				return Value{}, err
			}
			v, err := m.value(depth + 1)
			if err != nil {
				return Value{}, err
			}
			o.set(key, bin, v)
		}
		return ObjectValue(o), nil
	}
	return Value{}, errMsgpack // 0xc1, never used
}

// AppendMsgpack appends the canonical msgpack of v (SPEC.md §9): smallest headers and
// integers, float64 only, str only.
func AppendMsgpack(b []byte, v Value) []byte {
	buf := bytes.NewBuffer(b)
	enc := msgpack.GetEncoder()
	enc.Reset(buf)
	writeMsgpack(enc, v)
	msgpack.PutEncoder(enc)
	return buf.Bytes()
}

// writeMsgpack ignores errors: a bytes.Buffer never fails to write.
func writeMsgpack(e *msgpack.Encoder, v Value) {
	switch v.Kind {
	case KindNull:
		_ = e.EncodeNil()
	case KindBool:
		_ = e.EncodeBool(v.Bool)
	case KindInt:
		_ = e.EncodeInt(v.Int)
	case KindFloat:
		_ = e.EncodeFloat64(v.Float)
	case KindString, KindBin:
		_ = e.EncodeString(v.Str)
	case KindArray:
		_ = e.EncodeArrayLen(len(v.Array))
		for _, item := range v.Array {
			writeMsgpack(e, item)
		}
	case KindObject:
		n := 0
		for _, m := range v.Object.Members {
			if !m.BinKey {
				n++
			}
		}
		_ = e.EncodeMapLen(n)
		for _, m := range v.Object.Members {
			if !m.BinKey {
				_ = e.EncodeString(m.Key)
				writeMsgpack(e, m.Value)
			}
		}
	default:
		_ = e.EncodeNil()
	}
}
