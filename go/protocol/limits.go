package protocol

import "unicode/utf8"

// Protocol bounds (SPEC.md §2.5; protocol/limits.py).
const (
	MaxFrameBytes        = 1 << 20
	MaxBatchMessages     = 1024
	MaxNestingDepth      = 64 // objects and arrays in one message; the message is level 1
	DefaultBatchBytes    = 65536
	DefaultMaxStreams    = 64
	MaxRequestIDLength   = 128
	MaxUserIDLength      = 128
	MaxMessageChars      = 262144
	MaxMessages          = 512
	MaxMetadataBytes     = 16384
	MaxMetadataDepth     = 8
	MaxTimeoutMs         = 3600000
	MaxGraceMs           = 3600000 // chat.grace_ms and resumable.grace_ms (SPEC.md §5.8)
	MaxEpochLength       = 64      // EPOCH_PATTERN [A-Za-z0-9._:-]{1,64}
	MaxTokenChars        = 8192
	MaxClientKeyChars    = 256
	MaxReasonChars       = 256
	MaxErrorMessageChars = 1024
	MaxPingIDChars       = 128
	MaxConnectionIDChars = 128
	MaxStepKindLength    = 32  // STEP_KIND_PATTERN [a-z][a-z0-9_]{0,31}
	MaxStepNameChars     = 128 // step.name and halt.step.name, at least 1 character
	MaxSafeInteger       = 1<<53 - 1
	MaxStreamsLimit      = 1000000 // upper bound of welcome.limits.max_streams
	MinFrameBytesLimit   = 1024    // lower bound of welcome.limits.max_frame_bytes
)

// DefaultPort is the gateway's default TCP port; WSPath its WebSocket endpoint (SPEC.md §2.1).
const (
	DefaultPort = 8001
	WSPath      = "/v1/ws"
)

func idChar(c byte, at bool) bool {
	return c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' ||
		c == '.' || c == '_' || c == ':' || c == '-' || at && c == '@'
}

func matchID(s string, at bool) bool { return matchIDLen(s, at, 128) }

func matchIDLen(s string, at bool, maxLen int) bool {
	if len(s) < 1 || len(s) > maxLen {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !idChar(s[i], at) {
			return false
		}
	}
	return true
}

// ValidRequestID reports whether s matches REQUEST_ID_PATTERN [A-Za-z0-9._:-]{1,128}.
func ValidRequestID(s string) bool { return matchID(s, false) }

// ValidUserID reports whether s matches USER_ID_PATTERN [A-Za-z0-9._:@-]{1,128}.
func ValidUserID(s string) bool { return matchID(s, true) }

// ValidEpoch reports whether s matches EPOCH_PATTERN [A-Za-z0-9._:-]{1,64}: the incarnation
// of a resumable request that a resume names (SPEC.md §3.13).
func ValidEpoch(s string) bool { return matchIDLen(s, false, MaxEpochLength) }

// ValidErrorCode reports whether s matches ERROR_CODE_PATTERN [a-z][a-z0-9_]{0,63}.
func ValidErrorCode(s string) bool { return snakeWord(s, 64) }

// ValidStepKind reports whether s matches STEP_KIND_PATTERN [a-z][a-z0-9_]{0,31} (SPEC.md
// §3.12). Kinds are open: any kind matching the pattern is valid, known or not.
func ValidStepKind(s string) bool { return snakeWord(s, MaxStepKindLength) }

// snakeWord reports whether s matches [a-z][a-z0-9_]{0,maxLen-1}.
func snakeWord(s string, maxLen int) bool {
	if len(s) < 1 || len(s) > maxLen || s[0] < 'a' || s[0] > 'z' {
		return false
	}
	for i := 1; i < len(s); i++ {
		c := s[i]
		if !(c >= 'a' && c <= 'z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// chars counts code points, as every "characters" limit of the spec does (not bytes).
func chars(s string) int { return utf8.RuneCountInString(s) }
