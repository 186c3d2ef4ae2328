"""Hypothesis strategies for protocol messages, valid by construction.

Every strategy here produces values the protocol accepts: constructing the message must not
raise, and encoding it with either codec must succeed. The bounds come from
:mod:`protocol.limits`, so a change of a limit changes what is generated.
"""

from __future__ import annotations

import string
from typing import Any

import orjson
from hypothesis import strategies as st

from protocol import (
    Cancel,
    CancelReason,
    CancelResult,
    CancelStatus,
    Chat,
    ChatMessage,
    Chunk,
    Error,
    ErrorCode,
    ErrorInfo,
    Halt,
    HaltState,
    Hello,
    Limits,
    Message,
    Ping,
    Pong,
    Response,
    ResponseStatus,
    Role,
    Sender,
    Step,
    StepInfo,
    StepState,
    Usage,
    UsageReport,
    Welcome,
    limits,
)
from protocol.messages import USAGE_FIGURES

REQUEST_ID_ALPHABET = string.ascii_letters + string.digits + "._:-"
USER_ID_ALPHABET = REQUEST_ID_ALPHABET + "@"
SAFE_INT = limits.MAX_SAFE_INTEGER

# --- scalars ------------------------------------------------------------------------------------

request_ids = st.text(REQUEST_ID_ALPHABET, min_size=1, max_size=limits.MAX_REQUEST_ID_LENGTH)
user_ids = st.text(USER_ID_ALPHABET, min_size=1, max_size=limits.MAX_USER_ID_LENGTH)

#: Any character UTF-8 can encode: unicode of every plane, controls, ``\n`` (JSON escapes it),
#: but no lone surrogate (not encodable, see test_messages).
characters = st.characters(codec="utf-8")


def texts(*, min_size: int = 0, max_size: int = 64) -> st.SearchStrategy[str]:
    return st.text(characters, min_size=min_size, max_size=max_size)


safe_ints = st.integers(-SAFE_INT, SAFE_INT)
non_negative_safe_ints = st.integers(0, SAFE_INT)
finite_floats = st.floats(allow_nan=False, allow_infinity=False)
error_codes = st.from_regex(limits.ERROR_CODE_PATTERN, fullmatch=True) | st.sampled_from(
    list(ErrorCode)
)
ping_ids = st.none() | texts(max_size=limits.MAX_PING_ID_CHARS) | safe_ints


# --- metadata (plain JSON, bounded) -------------------------------------------------------------


def json_depth(value: Any) -> int:
    """Nesting depth as the protocol counts it: containers count, scalars do not."""
    if isinstance(value, dict):
        return 1 + max((json_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((json_depth(v) for v in value), default=0)
    return 0


json_scalars = st.none() | st.booleans() | safe_ints | finite_floats | texts(max_size=16)
json_keys = texts(max_size=12)

_json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(json_keys, inner, max_size=4),
    max_leaves=16,
)


def _chain(depth: int, leaf: Any, keys: list[str], in_list: list[bool]) -> dict[str, Any]:
    """A dict nested exactly ``depth`` containers deep (alternating dicts and lists)."""
    value = leaf
    for level in range(depth - 1, 0, -1):
        value = [value] if in_list[level] else {keys[level]: value}
    return {keys[0]: value}


_deep_metadata = st.builds(
    _chain,
    st.integers(1, limits.MAX_METADATA_DEPTH),
    json_scalars,
    st.lists(json_keys, min_size=limits.MAX_METADATA_DEPTH, max_size=limits.MAX_METADATA_DEPTH),
    st.lists(st.booleans(), min_size=limits.MAX_METADATA_DEPTH, max_size=limits.MAX_METADATA_DEPTH),
)


def _within_limits(value: dict[str, Any]) -> bool:
    return (
        json_depth(value) <= limits.MAX_METADATA_DEPTH
        and len(orjson.dumps(value)) <= limits.MAX_METADATA_BYTES
    )


metadata = (st.dictionaries(json_keys, _json_values, max_size=6) | _deep_metadata).filter(
    _within_limits
)

# --- nested values ------------------------------------------------------------------------------

usages = st.builds(
    Usage,
    input_tokens=non_negative_safe_ints,
    output_tokens=non_negative_safe_ints,
    saved_tokens=non_negative_safe_ints,
    final=st.booleans(),
    estimated=st.none() | st.lists(st.sampled_from(USAGE_FIGURES), unique=True).map(tuple),
)
final_usages = usages.map(
    lambda u: Usage(
        input_tokens=u.input_tokens,
        output_tokens=u.output_tokens,
        saved_tokens=u.saved_tokens,
        final=True,
        estimated=u.estimated,
    )
)
chat_messages = st.builds(ChatMessage, role=st.sampled_from(list(Role)), content=texts())
error_infos = st.builds(
    ErrorInfo, code=error_codes, message=texts(max_size=limits.MAX_ERROR_MESSAGE_CHARS)
)
limits_values = st.builds(
    Limits,
    max_streams=st.integers(1, 1_000_000),
    max_frame_bytes=st.integers(1024, limits.MAX_FRAME_BYTES),
    max_batch_messages=st.integers(1, limits.MAX_BATCH_MESSAGES),
    max_timeout_ms=st.integers(1, limits.MAX_TIMEOUT_MS),
)

# --- client -> gateway --------------------------------------------------------------------------

hellos = st.builds(
    Hello,
    token=st.none() | texts(max_size=200),
    client_key=st.none() | texts(max_size=limits.MAX_CLIENT_KEY_CHARS),
    user_id=st.none() | user_ids,
)


@st.composite
def chats(draw: st.DrawFn) -> Chat:
    if draw(st.booleans()):
        body: dict[str, Any] = {"message": draw(texts(max_size=200))}
    else:
        body = {"messages": tuple(draw(st.lists(chat_messages, min_size=1, max_size=5)))}
    return Chat(
        request_id=draw(request_ids),
        stream=draw(st.booleans()),
        user_id=draw(st.none() | user_ids),
        timeout_ms=draw(st.none() | st.integers(1, limits.MAX_TIMEOUT_MS)),
        metadata=draw(st.none() | metadata),
        steps=draw(st.booleans()),
        **body,
    )


cancels = st.builds(
    Cancel,
    request_id=request_ids,
    user_id=st.none() | user_ids,
    reason=st.none() | texts(max_size=limits.MAX_REASON_CHARS),
)
pings = st.builds(Ping, id=ping_ids)

# --- gateway -> client --------------------------------------------------------------------------

welcomes = st.builds(
    Welcome,
    connection_id=texts(min_size=1, max_size=limits.MAX_CONNECTION_ID_CHARS),
    user_id=st.none() | user_ids,
    limits=limits_values,
)
chunks = st.builds(
    Chunk, request_id=request_ids, seq=non_negative_safe_ints, text=texts(min_size=1)
)


step_kinds = st.from_regex(limits.STEP_KIND_PATTERN, fullmatch=True) | st.sampled_from(
    ["plan", "llm", "llm_stream", "tool", "agent"]
)
step_names = texts(min_size=1, max_size=limits.MAX_STEP_NAME_CHARS)
steps = st.builds(
    Step,
    request_id=request_ids,
    index=non_negative_safe_ints,
    kind=step_kinds,
    name=step_names,
    state=st.sampled_from(list(StepState)),
)
step_infos = st.builds(StepInfo, index=non_negative_safe_ints, kind=step_kinds, name=step_names)


@st.composite
def halts(draw: st.DrawFn, state: HaltState) -> Halt:
    step = draw(st.none() | step_infos)
    aborted = state is HaltState.HALTED and step is not None and draw(st.booleans())
    return Halt(state=state, step=step, aborted=aborted)


@st.composite
def responses(draw: st.DrawFn, status: ResponseStatus | None = None) -> Response:
    """A response obeying the rules: content only when completed, reason iff cancelled,
    error iff failed, usage.final false only when cancelled."""
    if status is None:
        status = draw(st.sampled_from(list(ResponseStatus)))
    request_id = draw(request_ids)
    if status is ResponseStatus.COMPLETED:
        return Response(
            request_id=request_id,
            status=status,
            content=draw(texts(max_size=200)),
            usage=draw(final_usages),
        )
    if status is ResponseStatus.CANCELLED:
        usage = draw(usages)
        halt_states = [HaltState.HALTED] if usage.final else list(HaltState)
        return Response(
            request_id=request_id,
            status=status,
            reason=draw(st.sampled_from(list(CancelReason))),
            usage=usage,
            halt=draw(st.none() | st.sampled_from(halt_states).flatmap(halts)),
        )
    return Response(
        request_id=request_id, status=status, error=draw(error_infos), usage=draw(final_usages)
    )


usage_reports = st.builds(
    UsageReport,
    request_id=request_ids,
    usage=final_usages,
    halt=st.none() | halts(HaltState.HALTED),
)
cancel_results = st.builds(
    CancelResult, request_id=request_ids, status=st.sampled_from(list(CancelStatus))
)
errors = st.builds(
    Error,
    code=error_codes,
    message=texts(max_size=limits.MAX_ERROR_MESSAGE_CHARS),
    request_id=st.none() | request_ids,
)
pongs = st.builds(Pong, id=ping_ids)

# --- by type ------------------------------------------------------------------------------------

#: Message class -> (strategy, the sender that may send it).
MESSAGE_STRATEGIES: dict[type, tuple[st.SearchStrategy[Any], Sender]] = {
    Hello: (hellos, Sender.CLIENT),
    Chat: (chats(), Sender.CLIENT),
    Cancel: (cancels, Sender.CLIENT),
    Ping: (pings, Sender.CLIENT),
    Welcome: (welcomes, Sender.GATEWAY),
    Chunk: (chunks, Sender.GATEWAY),
    Step: (steps, Sender.GATEWAY),
    Response: (responses(), Sender.GATEWAY),
    UsageReport: (usage_reports, Sender.GATEWAY),
    CancelResult: (cancel_results, Sender.GATEWAY),
    Error: (errors, Sender.GATEWAY),
    Pong: (pongs, Sender.GATEWAY),
}

client_messages: st.SearchStrategy[Message] = st.one_of(
    [s for s, sender in MESSAGE_STRATEGIES.values() if sender is Sender.CLIENT]
)
gateway_messages: st.SearchStrategy[Message] = st.one_of(
    [s for s, sender in MESSAGE_STRATEGIES.values() if sender is Sender.GATEWAY]
)
MESSAGES_BY_SENDER: dict[Sender, st.SearchStrategy[Message]] = {
    Sender.CLIENT: client_messages,
    Sender.GATEWAY: gateway_messages,
}
