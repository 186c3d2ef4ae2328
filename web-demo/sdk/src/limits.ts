/**
 * Protocol limits (SPEC.md §2.5). Character counts are Unicode code points, never UTF-16 code
 * units: use {@link charCount}, not `String.length`.
 */

export const MAX_FRAME_BYTES = 1_048_576;
export const MAX_BATCH_MESSAGES = 1024;
/** Deepest nesting of objects and arrays in one message; the message itself is level 1 (SPEC.md §2.3). */
export const MAX_NESTING_DEPTH = 64;
export const DEFAULT_MAX_STREAMS = 64;
export const REQUEST_ID_PATTERN = /^[A-Za-z0-9._:-]{1,128}$/;
export const USER_ID_PATTERN = /^[A-Za-z0-9._:@-]{1,128}$/;
export const MAX_MESSAGE_CHARS = 262_144;
export const MAX_MESSAGES = 512;
export const MAX_METADATA_BYTES = 16_384;
export const MAX_METADATA_DEPTH = 8;
export const MAX_TIMEOUT_MS = 3_600_000;
/** Largest `chat.grace_ms` and `resumable.grace_ms` (one hour): how long a resumable request
 * may outlive its connection (SPEC.md §5.8). */
export const MAX_GRACE_MS = 3_600_000;
/** An `epoch` (`resumable`, `resume`, SPEC.md §3.13) matches this in full. */
export const EPOCH_PATTERN = /^[A-Za-z0-9._:-]{1,64}$/;
export const MAX_TOKEN_CHARS = 8192;
export const MAX_CLIENT_KEY_CHARS = 256;
export const MAX_REASON_CHARS = 256;
export const MAX_ERROR_MESSAGE_CHARS = 1024;
export const MAX_PING_ID_CHARS = 128;
export const MAX_CONNECTION_ID_CHARS = 128;
export const ERROR_CODE_PATTERN = /^[a-z][a-z0-9_]{0,63}$/;
/** `step.kind` and `halt.step.kind` (SPEC.md §3.12): open, like error codes. */
export const STEP_KIND_PATTERN = /^[a-z][a-z0-9_]{0,31}$/;
/** Longest `step.name` / `halt.step.name`, in characters (at least 1). */
export const MAX_STEP_NAME_CHARS = 128;
export const MAX_SAFE_INTEGER = Number.MAX_SAFE_INTEGER;

/** Code points in `s` (SPEC.md §1: a "character" is a code point). */
export function charCount(s: string): number {
  // Fast path: every UTF-16 unit is at least one code point's worth, and at most two units make one.
  let surrogates = 0;
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c >= 0xdc00 && c <= 0xdfff) surrogates++;
  }
  return s.length - surrogates;
}
