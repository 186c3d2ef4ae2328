package protocol

import (
	"errors"
	"math"
	"strconv"
	"unicode/utf16"
	"unicode/utf8"
)

// A strict JSON parser (RFC 8259, SPEC.md §2.3): one value per line, valid UTF-8, no lone
// surrogates, no NaN, no numbers overflowing a double, integers kept apart from floats.

var errJSON = errors.New("invalid JSON")

type jsonParser struct {
	b   []byte
	pos int
}

// ParseJSON parses exactly one JSON value (surrounding JSON whitespace allowed).
func ParseJSON(b []byte) (Value, error) {
	if !utf8.Valid(b) {
		return Value{}, errJSON
	}
	p := jsonParser{b: b}
	p.ws()
	v, err := p.value(0)
	if err != nil {
		return Value{}, err
	}
	p.ws()
	if p.pos != len(p.b) {
		return Value{}, errJSON
	}
	return v, nil
}

func (p *jsonParser) ws() {
	for p.pos < len(p.b) {
		switch p.b[p.pos] {
		case ' ', '\t', '\n', '\r':
			p.pos++
		default:
			return
		}
	}
}

func (p *jsonParser) lit(word string, v Value) (Value, error) {
	if len(p.b)-p.pos >= len(word) && string(p.b[p.pos:p.pos+len(word)]) == word {
		p.pos += len(word)
		return v, nil
	}
	return Value{}, errJSON
}

func (p *jsonParser) value(depth int) (Value, error) {
	if p.pos >= len(p.b) {
		return Value{}, errJSON
	}
	switch c := p.b[p.pos]; {
	case c == '{':
		return p.object(depth + 1)
	case c == '[':
		return p.array(depth + 1)
	case c == '"':
		s, err := p.str()
		return String(s), err
	case c == 't':
		return p.lit("true", Bool(true))
	case c == 'f':
		return p.lit("false", Bool(false))
	case c == 'n':
		return p.lit("null", Null())
	case c == '-' || c >= '0' && c <= '9':
		return p.number()
	}
	return Value{}, errJSON
}

func (p *jsonParser) object(depth int) (Value, error) {
	if depth > MaxNestingDepth { // SPEC.md §2.3: depth is this container's level
		return Value{}, errTooDeep
	}
	p.pos++ // {
	o := NewObject()
	p.ws()
	if p.pos < len(p.b) && p.b[p.pos] == '}' {
		p.pos++
		return ObjectValue(o), nil
	}
	for {
		p.ws()
		if p.pos >= len(p.b) || p.b[p.pos] != '"' {
			return Value{}, errJSON
		}
		key, err := p.str()
		if err != nil {
			return Value{}, err
		}
		p.ws()
		if p.pos >= len(p.b) || p.b[p.pos] != ':' {
			return Value{}, errJSON
		}
		p.pos++
		p.ws()
		v, err := p.value(depth)
		if err != nil {
			return Value{}, err
		}
		o.Set(key, v)
		p.ws()
		if p.pos >= len(p.b) {
			return Value{}, errJSON
		}
		switch p.b[p.pos] {
		case ',':
			p.pos++
		case '}':
			p.pos++
			return ObjectValue(o), nil
		default:
			return Value{}, errJSON
		}
	}
}

func (p *jsonParser) array(depth int) (Value, error) {
	if depth > MaxNestingDepth {
		return Value{}, errTooDeep
	}
	p.pos++ // [
	items := []Value{}
	p.ws()
	if p.pos < len(p.b) && p.b[p.pos] == ']' {
		p.pos++
		return Array(items...), nil
	}
	for {
		p.ws()
		v, err := p.value(depth)
		if err != nil {
			return Value{}, err
		}
		items = append(items, v)
		p.ws()
		if p.pos >= len(p.b) {
			return Value{}, errJSON
		}
		switch p.b[p.pos] {
		case ',':
			p.pos++
		case ']':
			p.pos++
			return Array(items...), nil
		default:
			return Value{}, errJSON
		}
	}
}

func hex4(b []byte) (rune, bool) {
	if len(b) < 4 {
		return 0, false
	}
	var r rune
	for _, c := range b[:4] {
		r <<= 4
		switch {
		case c >= '0' && c <= '9':
			r |= rune(c - '0')
		case c >= 'a' && c <= 'f':
			r |= rune(c - 'a' + 10)
		case c >= 'A' && c <= 'F':
			r |= rune(c - 'A' + 10)
		default:
			return 0, false
		}
	}
	return r, true
}

func (p *jsonParser) str() (string, error) {
	p.pos++ // opening quote
	start := p.pos
	// Fast path: no escapes.
	for p.pos < len(p.b) {
		c := p.b[p.pos]
		if c == '"' {
			s := string(p.b[start:p.pos])
			p.pos++
			return s, nil
		}
		if c == '\\' {
			break
		}
		if c < 0x20 {
			return "", errJSON
		}
		p.pos++
	}
	out := append([]byte(nil), p.b[start:p.pos]...)
	for p.pos < len(p.b) {
		c := p.b[p.pos]
		switch {
		case c == '"':
			p.pos++
			return string(out), nil
		case c < 0x20:
			return "", errJSON
		case c != '\\':
			out = append(out, c)
			p.pos++
			continue
		}
		if p.pos+1 >= len(p.b) {
			return "", errJSON
		}
		e := p.b[p.pos+1]
		p.pos += 2
		switch e {
		case '"', '\\', '/':
			out = append(out, e)
		case 'b':
			out = append(out, '\b')
		case 'f':
			out = append(out, '\f')
		case 'n':
			out = append(out, '\n')
		case 'r':
			out = append(out, '\r')
		case 't':
			out = append(out, '\t')
		case 'u':
			r, ok := hex4(p.b[p.pos:])
			if !ok {
				return "", errJSON
			}
			p.pos += 4
			if utf16.IsSurrogate(r) {
				// Only a high surrogate followed by an escaped low one is a character.
				if r >= 0xdc00 || p.pos+6 > len(p.b) || p.b[p.pos] != '\\' || p.b[p.pos+1] != 'u' {
					return "", errJSON
				}
				lo, ok := hex4(p.b[p.pos+2:])
				if !ok || lo < 0xdc00 || lo > 0xdfff {
					return "", errJSON
				}
				p.pos += 6
				r = utf16.DecodeRune(r, lo)
			}
			out = utf8.AppendRune(out, r)
		default:
			return "", errJSON
		}
	}
	return "", errJSON
}

func (p *jsonParser) number() (Value, error) {
	start := p.pos
	isInt := true
	if p.b[p.pos] == '-' {
		p.pos++
	}
	digits := func() int {
		n := 0
		for p.pos < len(p.b) && p.b[p.pos] >= '0' && p.b[p.pos] <= '9' {
			p.pos++
			n++
		}
		return n
	}
	if p.pos < len(p.b) && p.b[p.pos] == '0' {
		p.pos++
	} else if digits() == 0 {
		return Value{}, errJSON
	}
	if p.pos < len(p.b) && p.b[p.pos] == '.' {
		p.pos++
		isInt = false
		if digits() == 0 {
			return Value{}, errJSON
		}
	}
	if p.pos < len(p.b) && (p.b[p.pos] == 'e' || p.b[p.pos] == 'E') {
		p.pos++
		isInt = false
		if p.pos < len(p.b) && (p.b[p.pos] == '+' || p.b[p.pos] == '-') {
			p.pos++
		}
		if digits() == 0 {
			return Value{}, errJSON
		}
	}
	text := string(p.b[start:p.pos])
	if isInt {
		i, err := strconv.ParseInt(text, 10, 64)
		if err != nil { // beyond int64: an integer, but out of every protocol range
			return Value{Kind: KindInt, Overflow: true}, nil
		}
		return Int(i), nil
	}
	f, err := strconv.ParseFloat(text, 64)
	if err != nil || math.IsInf(f, 0) {
		return Value{}, errJSON // SPEC.md §2.3: a number overflowing a double is bad_frame
	}
	return Float(f), nil
}

// AppendJSON appends the canonical compact JSON of v (SPEC.md §9).
func AppendJSON(b []byte, v Value) []byte {
	switch v.Kind {
	case KindNull:
		return append(b, "null"...)
	case KindBool:
		if v.Bool {
			return append(b, "true"...)
		}
		return append(b, "false"...)
	case KindInt:
		return strconv.AppendInt(b, v.Int, 10)
	case KindFloat:
		return appendFloat(b, v.Float)
	case KindString, KindBin:
		return appendJSONString(b, v.Str)
	case KindArray:
		b = append(b, '[')
		for i, item := range v.Array {
			if i > 0 {
				b = append(b, ',')
			}
			b = AppendJSON(b, item)
		}
		return append(b, ']')
	case KindObject:
		b = append(b, '{')
		first := true
		for _, m := range v.Object.Members {
			if m.BinKey {
				continue
			}
			if !first {
				b = append(b, ',')
			}
			first = false
			b = appendJSONString(b, m.Key)
			b = append(b, ':')
			b = AppendJSON(b, m.Value)
		}
		return append(b, '}')
	}
	return append(b, "null"...)
}

// appendFloat writes the shortest decimal that round-trips; inside 1e-5 <= |x| < 1e16, which
// the vectors use, every SDK writes the same bytes (SPEC.md §9). An integral value keeps a
// ".0" so that it decodes as a float again, as the reference writes it.
func appendFloat(b []byte, f float64) []byte {
	abs := math.Abs(f)
	format := byte('f')
	if abs != 0 && (abs < 1e-6 || abs >= 1e21) {
		format = 'e'
	}
	start := len(b)
	b = strconv.AppendFloat(b, f, format, -1, 64)
	if format == 'e' {
		// clean up e-09 to e-9, as encoding/json does
		n := len(b) - start
		if n >= 4 && b[len(b)-4] == 'e' && b[len(b)-3] == '-' && b[len(b)-2] == '0' {
			b[len(b)-2] = b[len(b)-1]
			b = b[:len(b)-1]
		}
		return b
	}
	for _, c := range b[start:] {
		if c == '.' {
			return b
		}
	}
	return append(b, ".0"...)
}

const hexDigits = "0123456789abcdef"

// appendJSONString escapes exactly what JSON requires (SPEC.md §9): ", \, and the controls
// below U+0020 (\b \t \n \f \r by name, the others as lowercase \u00xx). Everything else,
// including <, >, &, U+007F, U+2028 and U+2029, is written raw.
func appendJSONString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x20 && c != '"' && c != '\\' {
			continue
		}
		b = append(b, s[start:i]...)
		switch c {
		case '"':
			b = append(b, '\\', '"')
		case '\\':
			b = append(b, '\\', '\\')
		case '\b':
			b = append(b, '\\', 'b')
		case '\t':
			b = append(b, '\\', 't')
		case '\n':
			b = append(b, '\\', 'n')
		case '\f':
			b = append(b, '\\', 'f')
		case '\r':
			b = append(b, '\\', 'r')
		default:
			b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
		}
		start = i + 1
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}
