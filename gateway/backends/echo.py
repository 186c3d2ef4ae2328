"""Backend ``echo``: streams the prompt back word by word. The smallest real backend: one
abortable ``stream_llm`` step, usage estimated from the prompt."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator, Sequence
from typing import Final

from protocol import ChatMessage

from ..pipeline import RequestContext
from .simulated import estimate_tokens

__all__ = ["EchoBackend"]

_WORD = re.compile(r"\s*\S+")


class EchoBackend:
    """Streams the prompt back word by word (each word with its leading whitespace)."""

    name: Final = "echo"

    def __init__(self, *, token_delay_ms: int = 0) -> None:
        if type(token_delay_ms) is not int or token_delay_ms < 0:
            raise ValueError(
                f"echo backend option 'token_delay_ms' must be an integer >= 0, "
                f"got {token_delay_ms!r}"
            )
        self.token_delay_ms = token_delay_ms

    def __repr__(self) -> str:
        return f"EchoBackend(token_delay_ms={self.token_delay_ms})"

    async def run(self, ctx: RequestContext) -> None:
        prompt = ctx.prompt
        words = _WORD.findall(prompt)
        input_tokens = estimate_tokens(prompt)
        ctx.usage.expect(input_tokens + len(words))
        await ctx.stream_llm(self._tokens(words), input_tokens=input_tokens, name="echo")

    async def complete(
        self,
        ctx: RequestContext,
        turns: Sequence[ChatMessage],
        *,
        name: str = "completion",
        emit: bool = True,
    ) -> str:
        """Echo the last turn word by word, as one abortable step (what a flow's LLM steps run
        on in tests: the answer shows exactly the prompt the flow built)."""
        prompt = turns[-1].content if turns else ""
        words = _WORD.findall(prompt)
        tokens = self._tokens(words)
        return await ctx.stream_llm(
            tokens, input_tokens=estimate_tokens(prompt), name=name, emit=emit
        )

    async def _tokens(self, words: list[str]) -> AsyncIterator[str]:
        delay = self.token_delay_ms / 1000
        for word in words:
            await asyncio.sleep(delay)
            yield word
