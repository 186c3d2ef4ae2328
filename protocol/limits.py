"""Protocol limits as named constants (SPEC.md §2.5).

These are the *protocol's* bounds: a message outside them is invalid everywhere. A gateway may
configure tighter operational limits (e.g. fewer streams) and announces them in ``welcome``.
"""

from __future__ import annotations

import re
from typing import Final

#: Largest WebSocket frame (one batch of messages) either side must accept, in bytes.
MAX_FRAME_BYTES: Final = 1_048_576
#: Most messages one frame may carry (batching).
MAX_BATCH_MESSAGES: Final = 1024
#: Deepest nesting of containers (objects/maps, arrays) in one message, counted like
#: ``MAX_METADATA_DEPTH``: the message itself is level 1, a container inside a container of level d
#: is level d+1, scalars add no level. Valid messages need at most 9 (a chat's metadata at its own
#: level 8); a deeper one is refused while decoding, before any recursive code sees it. The wide
#: margin keeps that check cheap: the decoder counts container bytes before it walks a value, and
#: a whole batch of ordinary messages stays under the bound at once.
MAX_NESTING_DEPTH: Final = 64
#: Default cap on the bytes the gateway packs into one outbound batched frame.
DEFAULT_BATCH_BYTES: Final = 65_536
#: Default concurrent streams per connection.
DEFAULT_MAX_STREAMS: Final = 64

#: ``request_id``: 1-128 characters of ``[A-Za-z0-9._:-]``.
MAX_REQUEST_ID_LENGTH: Final = 128
REQUEST_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
#: ``user_id``: 1-128 characters of ``[A-Za-z0-9._:@-]`` (header-safe, log-safe).
MAX_USER_ID_LENGTH: Final = 128
USER_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9._:@\-]{1,128}")

#: ``chat.message`` and each ``messages[].content``, in characters.
MAX_MESSAGE_CHARS: Final = 262_144
#: Entries in ``chat.messages``.
MAX_MESSAGES: Final = 512
#: ``chat.metadata`` re-encoded as compact JSON, in bytes; and its nesting depth.
MAX_METADATA_BYTES: Final = 16_384
MAX_METADATA_DEPTH: Final = 8
#: ``chat.timeout_ms`` upper bound (one hour); a gateway may announce a lower one.
MAX_TIMEOUT_MS: Final = 3_600_000

#: ``chat.grace_ms`` upper bound (one hour): how long a resumable request may outlive its
#: connection (SPEC.md §5.8); a gateway caps it lower and says so in ``resumable.grace_ms``.
MAX_GRACE_MS: Final = 3_600_000
#: ``epoch`` (``resumable``, ``resume``): 1-64 characters of ``[A-Za-z0-9._:-]``.
EPOCH_PATTERN: Final = re.compile(r"[A-Za-z0-9._:\-]{1,64}")

#: ``hello.token`` and ``hello.client_key``, in characters.
MAX_TOKEN_CHARS: Final = 8192
MAX_CLIENT_KEY_CHARS: Final = 256
#: ``cancel.reason``, ``error.message``, ``ping.id`` (string form), ``connection_id``.
MAX_REASON_CHARS: Final = 256
MAX_ERROR_MESSAGE_CHARS: Final = 1024
MAX_PING_ID_CHARS: Final = 128
MAX_CONNECTION_ID_CHARS: Final = 128
#: Error codes are short snake_case words; unknown ones are accepted (forward compatibility).
ERROR_CODE_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]{0,63}")

#: ``step.kind``: a short snake_case word, open like error codes (``plan``, ``llm``, ``llm_stream``,
#: ``tool``, ``agent`` today; clients accept kinds they do not know). ``step.name``, in characters.
STEP_KIND_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
MAX_STEP_NAME_CHARS: Final = 128

#: Integers on the wire stay within what JavaScript numbers represent exactly.
MAX_SAFE_INTEGER: Final = 2**53 - 1
