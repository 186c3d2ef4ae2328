package protocol

import "math"

// Kind is the type of a decoded Value: exactly the JSON data model, plus msgpack's bin and ext,
// which the protocol refuses wherever it expects a value but ignores in unknown fields.
type Kind uint8

// The kinds of Value.
const (
	KindNull Kind = iota
	KindBool
	KindInt
	KindFloat
	KindString
	KindArray
	KindObject
	KindBin
	KindExt
)

// Value is one decoded JSON or msgpack value. Integers and floats are distinct (SPEC.md §3.1:
// "an integer is not a float"); an integer outside int64 has Overflow set.
type Value struct {
	Kind     Kind
	Bool     bool
	Int      int64
	Overflow bool
	Float    float64
	Str      string
	Array    []Value
	Object   *Object
}

// Member is one key of an Object. BinKey marks a msgpack bin key, which is not a field name.
type Member struct {
	Key    string
	BinKey bool
	Value  Value
}

// Object is an ordered map: metadata keeps the order the application gave (SPEC.md §9).
// A duplicate key keeps its first position and its last value (SPEC.md §2.3: last wins).
type Object struct {
	Members []Member
	index   map[string]int
}

// NewObject returns an empty object.
func NewObject() *Object { return &Object{} }

// Set adds key or replaces its value in place.
func (o *Object) Set(key string, v Value) { o.set(key, false, v) }

func (o *Object) set(key string, bin bool, v Value) {
	if i, ok := o.find(key, bin); ok {
		o.Members[i].Value = v
		return
	}
	o.Members = append(o.Members, Member{Key: key, BinKey: bin, Value: v})
	if o.index != nil && !bin {
		o.index[key] = len(o.Members) - 1
	}
}

func (o *Object) find(key string, bin bool) (int, bool) {
	if !bin && len(o.Members) >= 16 {
		if o.index == nil {
			o.index = make(map[string]int, len(o.Members))
			for i, m := range o.Members {
				if !m.BinKey {
					o.index[m.Key] = i
				}
			}
		}
		i, ok := o.index[key]
		return i, ok
	}
	for i := range o.Members {
		if o.Members[i].Key == key && o.Members[i].BinKey == bin {
			return i, true
		}
	}
	return 0, false
}

// Get returns the value of a string key.
func (o *Object) Get(key string) (Value, bool) {
	if o == nil {
		return Value{}, false
	}
	if i, ok := o.find(key, false); ok {
		return o.Members[i].Value, true
	}
	return Value{}, false
}

// Len is the number of keys.
func (o *Object) Len() int {
	if o == nil {
		return 0
	}
	return len(o.Members)
}

// Constructors, for building metadata and wire maps.

// Null is the JSON null.
func Null() Value { return Value{Kind: KindNull} }

// Bool is a boolean value.
func Bool(b bool) Value { return Value{Kind: KindBool, Bool: b} }

// Int is an integer value.
func Int(i int64) Value { return Value{Kind: KindInt, Int: i} }

// Float is a float value.
func Float(f float64) Value { return Value{Kind: KindFloat, Float: f} }

// String is a string value.
func String(s string) Value { return Value{Kind: KindString, Str: s} }

// Array is an array value.
func Array(items ...Value) Value { return Value{Kind: KindArray, Array: items} }

// ObjectValue wraps an object.
func ObjectValue(o *Object) Value { return Value{Kind: KindObject, Object: o} }

// Equal reports whether two values are the same JSON value of the same kinds, objects
// compared key by key in order.
func Equal(a, b Value) bool {
	if a.Kind != b.Kind {
		return false
	}
	switch a.Kind {
	case KindNull:
		return true
	case KindBool:
		return a.Bool == b.Bool
	case KindInt:
		return a.Int == b.Int && a.Overflow == b.Overflow
	case KindFloat:
		return a.Float == b.Float || math.IsNaN(a.Float) && math.IsNaN(b.Float)
	case KindString, KindBin:
		return a.Str == b.Str
	case KindArray:
		if len(a.Array) != len(b.Array) {
			return false
		}
		for i := range a.Array {
			if !Equal(a.Array[i], b.Array[i]) {
				return false
			}
		}
		return true
	case KindObject:
		if a.Object.Len() != b.Object.Len() {
			return false
		}
		for i := range a.Object.Members {
			x, y := a.Object.Members[i], b.Object.Members[i]
			if x.Key != y.Key || x.BinKey != y.BinKey || !Equal(x.Value, y.Value) {
				return false
			}
		}
		return true
	}
	return true
}
