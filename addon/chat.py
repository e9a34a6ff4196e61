"""Chat completions: OpenAI request -> Poe query, Poe answer -> OpenAI JSON and stream chunks.

Pure functions and plain data only; no I/O.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi_poe.types import ProtocolMessage, QueryRequest

from addon.errors import OpenAIError, bad_request, not_found
from addon.mappings import BOT_NAME, ModelMap

# OpenAI role -> Poe role. Poe has no "assistant" (it says "bot") and no "developer".
ROLES = {
    "system": "system",
    "developer": "system",
    "user": "user",
    "assistant": "bot",
    "tool": "tool",
    "function": "tool",
}


@dataclass
class ChatRequest:
    model: str  # as the client named it; echoed back in answers
    bot: str  # the Poe bot that answers
    messages: list[ProtocolMessage]
    stream: bool = False
    include_usage: bool = False
    temperature: float | None = None
    stop: list[str] = field(default_factory=list)
    logit_bias: dict[str, float] = field(default_factory=dict)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _text_of(content: object, param: str, role: str) -> str:
    """Message content as Poe text: a string, or the text parts of a content list joined."""
    if content is None:
        if role in ("assistant", "function"):
            return ""
        raise bad_request(f"{param} is required for a {role} message.", param)
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{param} must be a string or an array of content parts.", param)
    texts: list[str] = []
    for i, part in enumerate(content):
        where = f"{param}[{i}]"
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise bad_request(f"{where} must be an object with a 'type'.", where)
        kind = part["type"]
        if kind in ("text", "input_text", "output_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise bad_request(f"{where}.text must be a string.", f"{where}.text")
            texts.append(text)
        elif kind == "refusal":
            texts.append(str(part.get("refusal") or ""))
        elif kind in ("image_url", "input_image"):
            raise bad_request(
                f"{where}: image input is not supported by this proxy yet; send text content only.",
                where,
                "unsupported_content",
            )
        else:
            raise bad_request(
                f"{where}: content part type {kind!r} is not supported through Poe.",
                f"{where}.type",
                "unsupported_content",
            )
    return "\n".join(texts)


def parse_messages(messages: object) -> list[ProtocolMessage]:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty array.", "messages")
    out: list[ProtocolMessage] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object.", where)
        role = message.get("role")
        if role not in ROLES:
            raise bad_request(
                f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}.", f"{where}.role"
            )
        content = _text_of(message.get("content"), f"{where}.content", role)
        out.append(ProtocolMessage(role=ROLES[role], content=content))
    return out


def _stop(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return list(value)
    raise bad_request("stop must be a string or an array of strings.", "stop")


def parse_chat_request(body: object, model_map: ModelMap) -> ChatRequest:
    """Validate an OpenAI chat completion request; OpenAIError(400, param=...) if it is bad."""
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    model = body.get("model")
    if not isinstance(model, str) or not model.strip():
        raise bad_request("model is required: the OpenAI model or Poe bot name.", "model")
    bot = model_map.bot_for(model.strip())
    if not BOT_NAME.match(bot):
        raise not_found(
            f"The model `{model}` does not exist: it is neither in the model map nor a "
            "valid Poe bot name.",
            "model_not_found",
        )
    messages = parse_messages(body.get("messages"))
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise bad_request("stream must be a boolean.", "stream")
    include_usage = False
    options = body.get("stream_options")
    if options is not None:
        if not isinstance(options, dict):
            raise bad_request("stream_options must be an object.", "stream_options")
        include_usage = options.get("include_usage") is True
    temperature = body.get("temperature")
    if temperature is not None and (not _is_number(temperature) or not 0 <= temperature <= 2):
        raise bad_request("temperature must be a number between 0 and 2.", "temperature")
    n = body.get("n")
    if n is not None and n != 1:
        raise bad_request("Poe answers one choice per request: n must be 1.", "n")
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and not (
        isinstance(logit_bias, dict) and all(_is_number(v) for v in logit_bias.values())
    ):
        raise bad_request("logit_bias must map token ids to numbers.", "logit_bias")
    return ChatRequest(
        model=model,
        bot=bot,
        messages=messages,
        stream=stream,
        include_usage=include_usage,
        temperature=None if temperature is None else float(temperature),
        stop=_stop(body.get("stop")),
        logit_bias={str(k): float(v) for k, v in (logit_bias or {}).items()},
    )


def to_query(chat: ChatRequest, new_id: Callable[[], str]) -> QueryRequest:
    """The Poe query for a chat request; ids come from ``new_id`` so this stays pure."""
    return QueryRequest(
        version="1.2",
        type="query",
        query=chat.messages,
        user_id=new_id(),
        conversation_id=new_id(),
        message_id=new_id(),
        temperature=chat.temperature,
        stop_sequences=chat.stop,
        logit_bias=chat.logit_bias,
    )


# --- usage ----------------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """About four characters a token for English text; an estimate, not a tokenizer."""
    return math.ceil(len(text) / 4) if text else 0


def usage(messages: list[ProtocolMessage], answer: str) -> dict[str, int]:
    # 4 tokens of framing per message, as OpenAI's chat format costs.
    prompt = sum(estimate_tokens(m.content) + 4 for m in messages) + 2
    completion = estimate_tokens(answer)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


# --- responses ------------------------------------------------------------------------------


def completion(
    completion_id: str, created: int, model: str, text: str, usage_: dict[str, int]
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": usage_,
    }


@dataclass(frozen=True)
class ChunkFactory:
    """Builds the chunks of one stream: the same id, created and model on every chunk."""

    completion_id: str
    created: int
    model: str
    include_usage: bool = False

    def _chunk(self, choices: list[dict[str, Any]], usage_: Any = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {
            "id": self.completion_id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if self.include_usage:
            chunk["usage"] = usage_
        return chunk

    def delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        return self._chunk(
            [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
        )

    def role(self) -> dict[str, Any]:
        return self.delta({"role": "assistant", "content": ""})

    def content(self, text: str) -> dict[str, Any]:
        return self.delta({"content": text})

    def finish(self, reason: str = "stop") -> dict[str, Any]:
        return self.delta({}, reason)

    def usage(self, usage_: dict[str, int]) -> dict[str, Any]:
        return self._chunk([], usage_)


def openai_error_chunk(error: OpenAIError) -> dict[str, Any]:
    """The SSE event that tells a client a stream failed after it began."""
    return error.body()
