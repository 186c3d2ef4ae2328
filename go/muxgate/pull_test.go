package muxgate_test

import (
	"iter"

	"github.com/muxgate/muxgate/go/muxgate"
)

func iterPull(seq iter.Seq2[muxgate.Chunk, error]) (func() (muxgate.Chunk, error, bool), func()) {
	return iter.Pull2(seq)
}
