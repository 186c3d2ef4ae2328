"""``muxgate chat`` and ``muxgate cancel``: the SDK on the terminal.

``muxgate chat`` is an interactive chat: each line you enter is sent as one streamed request and
the answer's tokens are printed as they arrive. Ctrl-C during an answer cancels that request on
the gateway (the in-band ``cancel`` frame), prints that it was cancelled and the tokens the
cancel saved (the final usage, SPEC.md §5.4), and returns to the prompt; Ctrl-C at the prompt
just gives a new prompt; Ctrl-D quits.

With ``--steps`` the pipeline's steps (SPEC.md §3.12) print as they happen, on their own lines
(``· tool search``), and a cancelled answer's footer says where the pipeline halted.

``muxgate cancel REQUEST_ID`` cancels a request by id from any process (HTTP ``DELETE``) and
prints the outcome; the exit status is 0 for ``cancelled`` / ``already_cancelled`` /
``already_completed``, 1 for ``not_found``, 2 for an error.

Both read ``MUXGATE_URL``, ``MUXGATE_CLIENT_KEY``, ``MUXGATE_TOKEN`` and ``MUXGATE_USER_ID``
like :class:`gateway.Client`; prefer the environment to ``--client-key`` (visible in ``ps``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TextIO

from .client import CancelStatus, ChatStream, Client, Halt, MuxgateError, Response, Step, Usage

__all__ = ["add_subcommands", "run"]

PROMPT = "you> "


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="gateway URL, ws(s):// or http(s):// (env MUXGATE_URL)")
    parser.add_argument("--client-key", help="client key (env MUXGATE_CLIENT_KEY; preferred)")
    parser.add_argument("--token", help="user token, HS256 JWT (env MUXGATE_TOKEN)")
    parser.add_argument("--user-id", help="act for this user (env MUXGATE_USER_ID)")


def add_subcommands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``chat`` and ``cancel`` to the ``muxgate`` command."""
    chat = sub.add_parser(
        "chat",
        help="interactive chat with a gateway (Ctrl-C cancels an answer, Ctrl-D quits)",
        description="Chat with a muxgate gateway. Tokens print as they stream; Ctrl-C cancels "
        "the current answer and shows the tokens saved; Ctrl-D quits.",
    )
    _connection_flags(chat)
    chat.add_argument("--codec", choices=("json", "msgpack"), default="json")
    chat.add_argument(
        "--metadata",
        type=json.loads,
        help="JSON object passed with every chat, e.g. '{\"tokens\": 400}' for the simulated "
        "backend",
    )
    chat.add_argument(
        "--timeout", type=float, help="seconds the gateway gives each answer (timeout_ms)"
    )
    chat.add_argument(
        "--steps",
        action="store_true",
        help="show the pipeline's steps (planning, tool calls, ...) and where a cancel halted it",
    )

    cancel = sub.add_parser(
        "cancel",
        help="cancel a request by id and print the outcome",
        description="Cancel a request by id (HTTP DELETE /v1/requests/{id}). Exit status: 0 "
        "cancelled / already_cancelled / already_completed, 1 not_found, 2 error.",
    )
    cancel.add_argument("request_id")
    _connection_flags(cancel)


def _client(args: argparse.Namespace, codec: str = "json") -> Client:
    return Client(
        args.url,
        client_key=args.client_key,
        token=args.token,
        user_id=args.user_id,
        codec=codec,  # type: ignore[arg-type]
    )


def run(args: argparse.Namespace) -> int:
    """Run ``muxgate chat`` or ``muxgate cancel``; returns the exit status."""
    try:
        if args.command == "cancel":
            return _cancel(args)
        if args.metadata is not None and not isinstance(args.metadata, dict):
            raise MuxgateError("--metadata must be a JSON object")
        return _chat(args)
    except MuxgateError as exc:
        print(f"muxgate: {exc}", file=sys.stderr)
        return 2


# -- muxgate cancel --------------------------------------------------------------------------


def _cancel(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.cancel_request(args.request_id, user_id=args.user_id)
    print(f"{result.request_id}: {result.status.value}")
    return 1 if result.status is CancelStatus.NOT_FOUND else 0


# -- muxgate chat ----------------------------------------------------------------------------


def _tokens(usage: Usage) -> str:
    return f"{usage.input_tokens} in / {usage.output_tokens} out"


def _halted(halt: Halt | None) -> str:
    """Where a cancelled pipeline halted, for the footer (``--steps``)."""
    if halt is None or halt.state != "halted":
        return ""
    if halt.step is None:
        return " · halted before any step"
    if halt.aborted:
        return f" · stopped during {halt.step.kind} {halt.step.name}"
    return f" · halted after {halt.step.kind} {halt.step.name}"


def _footer(client: Client, response: Response, stream: ChatStream) -> str:
    rid = response.request_id
    if response.status == "completed":
        return f"[completed · {rid} · {_tokens(response.usage)}]"
    usage = response.usage
    # The cancelled response came at once; its final figures follow (SPEC.md §5.4).
    with contextlib.suppress(MuxgateError, TimeoutError):
        usage = client.final_usage(response, timeout=5.0)
    why = "" if response.reason == "client" else f" ({response.reason})"
    where = _halted(stream.halt)
    return f"[cancelled{why} · {rid} · {usage.saved_tokens} tokens saved · {_tokens(usage)}{where}]"


def _answer(client: Client, line: str, args: argparse.Namespace, out: TextIO) -> None:
    first = True

    def show(step: Step) -> None:
        nonlocal first
        if step.state == "started":
            out.write(f"{'' if first else chr(10)}· {step.kind} {step.name}\n")
            out.flush()
            first = True  # the text after a step starts its own line

    stream = client.chat_stream(
        line,
        metadata=args.metadata,
        timeout=args.timeout,
        steps=args.steps,
        on_step=show if args.steps else None,
    )
    response: Response | None
    try:
        try:
            for chunk in stream:
                text = chunk.text.lstrip() if first else chunk.text
                first = False
                out.write(text)
                out.flush()
            response = stream.response
        except KeyboardInterrupt:
            response = stream.cancel()  # the cancel frame is already on its way
    except KeyboardInterrupt:  # a second Ctrl-C while waiting for the cancelled response
        out.write(f"\n[cancelled · {stream.request_id}]\n")
        return
    except MuxgateError as exc:
        out.write(f"\n[error · {stream.request_id} · {exc}]\n")
        return
    if response is None:
        out.write("\n[cancelled before it was sent]\n")
        return
    out.write(f"\n{_footer(client, response, stream)}\n")


def _chat(args: argparse.Namespace) -> int:
    out = sys.stdout
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # not on every platform
            import readline  # noqa: F401 - line editing and history for input()
    with _client(args, args.codec) as client:
        out.write(
            f"muxgate chat · {client.url} · Enter sends · Ctrl-C cancels the answer · "
            "Ctrl-D quits\n"
        )
        while True:
            try:
                line = input(PROMPT)
            except EOFError:
                out.write("\n")
                return 0
            except KeyboardInterrupt:
                out.write("\n")
                continue
            if line.strip():
                _answer(client, line, args, out)
