// Package protocol is the muxgate v1 wire protocol in Go, sans I/O: typed messages validated
// as SPEC.md §3 says, the two codecs (muxgate.v1.json text frames and muxgate.v1.msgpack binary
// frames) with batching (§2.4), and the canonical encoding (§9) that every implementation
// writes byte for byte. It owns no socket and starts no goroutine; package muxgate is the I/O
// glue. It mirrors the Python reference package protocol/ and passes the shared vectors in
// protocol/vectors/.
//
// Theory of operation:
//
//	frame bytes --Decode--> []Result   one Result per message: a Message, or the *ProtocolError
//	                                   that refuses it (bad_frame, unknown_type, invalid_field,
//	                                   frame_too_large), in order (G6: one bad message never
//	                                   hides the good ones around it)
//	Message --Encode--> bytes          validated first; canonical field order; JoinBatch packs
//	                                   several encoded messages into one frame
//
// Decoding goes through a small ordered value tree (Value): JSON is parsed by a strict parser
// of our own (encoding/json silently repairs invalid UTF-8 and lone surrogates, which SPEC.md
// §2.3 refuses), msgpack is tokenised by github.com/vmihailenco/msgpack/v5 and walked here so
// that str and bin, map key kinds and integer widths stay visible.
package protocol
