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

# bpe-openai refuses a text of 1,000,000 characters or more, and one that makes more than
# 200,000 tokens. A piece of at most 50,000 characters is at most 200,000 UTF-8 bytes, and a
# token is at least one byte, so it passes both; longer texts are counted piece by piece.
PIECE_CHARS = 50_000
# A piece ends before a space that starts a word: both tables' pre-tokenizers split there
# anyway (the space begins the next word's token), so the pieces' counts add up to the whole
# text's. Text without such a place in the last half of a piece (one repeated character,
# base64) is cut at the piece's end: each such cut can change the count by a token or two,
# under 0.01% of a piece's count, which usage (an estimate for non-OpenAI bots anyway) bears.
WORD_START = re.compile(r" (?=[^\W\d_])")


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


def pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """``text`` cut into pieces of at most ``size`` characters, where possible at word starts."""
    out: list[str] = []
    start = 0
    while len(text) - start > size:
        end = start + size
        cuts = [m.start() for m in WORD_START.finditer(text, end - size // 2, end)]
        cut = cuts[-1] if cuts and cuts[-1] > start else end
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def encoding_name(model: str) -> str:
    return "cl100k_base" if CL100K_MODELS.match(model) else "o200k_base"


def warm_up() -> None:
    """Load the tables (about a second for both on a small machine), before a request needs them."""
    for name in ("o200k_base", "cl100k_base"):
        _encoding(name)


def estimate(text: str) -> int:
    """About four characters a token: what counts fall back to without the tables."""
    return math.ceil(len(text) / 4)


class TokenCounter:
    """Counts never fail: usage and max_tokens are judged after Poe answered, and the answer
    is worth more than an exact count. A tokenizer failure is logged once per counter (one
    request) and the count falls back to the estimate."""

    def __init__(self, model: str) -> None:
        self.name = encoding_name(model)
        self.failed = False

    @property
    def encoding(self) -> Encoding | None:
        # Loaded on first use, so a request that counts nothing never waits for the tables.
        return _encoding(self.name)

    def _fail(self, e: Exception) -> None:
        if not self.failed:
            self.failed = True
            logger.warning(
                "poe-openai: counting tokens failed (%s: %s); token counts for this request "
                "are estimates",
                type(e).__name__,
                str(e)[:200],
            )

    def count(self, text: str) -> int:
        if not text:
            return 0
        encoding = self.encoding
        if encoding is None or self.failed:
            return estimate(text)
        try:
            return sum(len(encoding.encode_ordinary(piece)) for piece in pieces(text))
        except Exception as e:
            self._fail(e)
            return estimate(text)

    def prefix(self, text: str, limit: int) -> str:
        """The longest start of ``text`` that is at most ``limit`` tokens."""
        if limit <= 0:
            return ""
        encoding = self.encoding
        if encoding is not None and not self.failed:
            try:
                return self._prefix(encoding, text, limit)
            except Exception as e:
                self._fail(e)
        return text[: limit * 4]

    def _prefix(self, encoding: Encoding, text: str, limit: int) -> str:
        head = ""
        for piece in pieces(text):
            tokens = encoding.encode_ordinary(piece)
            if len(tokens) <= limit:
                head += piece
                limit -= len(tokens)
                continue
            cut = encoding.decode_bytes(tokens[:limit]).decode("utf-8", errors="ignore")
            return head + (cut if piece.startswith(cut) else piece[: len(cut)])
        return head

    def messages(self, texts: list[str]) -> int:
        return sum(self.count(t) + TOKENS_PER_MESSAGE for t in texts) + TOKENS_PER_REPLY
