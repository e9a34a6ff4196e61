"""Token counts for usage and max_tokens: OpenAI's own BPE tables, offline.

tiktoken downloads its tables on first use (offline it fails); bpe-openai ships the same tables
(cl100k_base, o200k_base) inside the package. Poe bots that are not OpenAI models use their own
tokenizers, so for them the counts are a close estimate, not their bill.
"""

from __future__ import annotations

import functools
import logging
import math
import re
from typing import Protocol

logger = logging.getLogger(__name__)

# Older OpenAI chat models use cl100k_base; everything newer (and any other bot) o200k_base.
CL100K_MODELS = re.compile(r"^(gpt-3\.5|gpt-4(?!o|\.\d|-?o)|text-embedding-|chatgpt-16k)", re.I)
# What the chat format adds: about 3 tokens per message plus 3 to prime the answer.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


class Encoding(Protocol):
    def encode_ordinary(self, text: str) -> list[int]: ...
    def decode_bytes(self, tokens: list[int]) -> bytes: ...


@functools.cache
def _encoding(name: str) -> Encoding | None:
    try:
        import bpe_openai

        return bpe_openai.get_encoding(name)  # type: ignore[no-any-return]
    except Exception as e:  # the estimate below still works
        logger.warning("poe-openai: no tokenizer (%s); token counts are estimates", e)
        return None


def encoding_name(model: str) -> str:
    return "cl100k_base" if CL100K_MODELS.match(model) else "o200k_base"


def warm_up() -> None:
    """Load the tables (about a second for both on a small machine), before a request needs them."""
    for name in ("o200k_base", "cl100k_base"):
        _encoding(name)


class TokenCounter:
    def __init__(self, model: str) -> None:
        self.name = encoding_name(model)

    @property
    def encoding(self) -> Encoding | None:
        # Loaded on first use, so a request that counts nothing never waits for the tables.
        return _encoding(self.name)

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self.encoding is None:
            return math.ceil(len(text) / 4)
        return len(self.encoding.encode_ordinary(text))

    def prefix(self, text: str, limit: int) -> str:
        """The longest start of ``text`` that is at most ``limit`` tokens."""
        if limit <= 0:
            return ""
        if self.encoding is None:
            return text[: limit * 4]
        tokens = self.encoding.encode_ordinary(text)
        if len(tokens) <= limit:
            return text
        head = self.encoding.decode_bytes(tokens[:limit]).decode("utf-8", errors="ignore")
        return head if text.startswith(head) else text[: len(head)]

    def messages(self, texts: list[str]) -> int:
        return sum(self.count(t) + TOKENS_PER_MESSAGE for t in texts) + TOKENS_PER_REPLY
