"""The muxgate Python SDK: ``Client`` (blocking) and ``AsyncClient`` (asyncio).

::

    from gateway import AsyncClient, Client

    with Client() as client:                   # MUXGATE_URL or ws://localhost:8001
        print(client.chat("Hello!").content)

One WebSocket per client, multiplexing any number of concurrent requests by ``request_id``;
cancelling is native (a cancelled task, a timeout, leaving a stream loop, Ctrl-C) and sends the
protocol's ``cancel`` frame. See ``protocol/SPEC.md`` for the wire contract and README.md for a
tour. The errors are drawn in ``gateway/client/_errors.py``. ``chat_stream(..., steps=True)``
follows the pipeline's steps (``Step``) and where a cancel halts it (``Halt``), SPEC.md §3.12.
``resumable=True`` (per call or per client) lets requests survive a dropped connection: the
client reconnects and resumes them by itself (SPEC.md §5.8; see ``gateway/client/_async.py``).
"""

from ._async import AsyncChatStream, AsyncClient
from ._errors import (
    ConnectError,
    ConnectionLost,
    Forbidden,
    GatewayShuttingDown,
    InvalidRequest,
    MuxgateError,
    ProtocolViolation,
    RequestFailed,
    RequestMoved,
    RequestRefused,
    ResumeFailed,
    ResumeNotFound,
    TransportError,
    Unauthorized,
)
from ._models import (
    CancelReason,
    CancelResult,
    CancelStatus,
    Chunk,
    ErrorInfo,
    Halt,
    HaltState,
    RequestInfo,
    Response,
    ResponseStatus,
    Step,
    StepInfo,
    StepState,
    Usage,
)
from ._sync import ChatFuture, ChatStream, Client

__all__ = [
    "AsyncChatStream",
    "AsyncClient",
    "CancelReason",
    "CancelResult",
    "CancelStatus",
    "ChatFuture",
    "ChatStream",
    "Chunk",
    "Client",
    "ConnectError",
    "ConnectionLost",
    "ErrorInfo",
    "Forbidden",
    "GatewayShuttingDown",
    "Halt",
    "HaltState",
    "InvalidRequest",
    "MuxgateError",
    "ProtocolViolation",
    "RequestFailed",
    "RequestInfo",
    "RequestMoved",
    "RequestRefused",
    "Response",
    "ResponseStatus",
    "ResumeFailed",
    "ResumeNotFound",
    "Step",
    "StepInfo",
    "StepState",
    "TransportError",
    "Unauthorized",
    "Usage",
]
