"""Legacy completions (``/v1/completions``): request -> Poe query, answer -> legacy shapes.

Pure functions. Each prompt of a list is a conversation of its own (one user turn), answered as
its own choice, as OpenAI does; with ``n`` each prompt gets ``n`` choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from fastapi_poe.types import ProtocolMessage

from addon.chat import Sampling, bot_for, model_name, parse_sampling
from addon.errors import bad_request
from addon.mappings import ModelMap

# OpenAI's default for this endpoint: without max_tokens an answer ends at 16 tokens.
DEFAULT_MAX_TOKENS = 16


@dataclass
class CompletionRequest:
    model: str
    bot: str
    prompts: list[str]
    echo: bool = False
    sampling: Sampling = field(default_factory=lambda: Sampling())

    def conversations(self) -> list[list[ProtocolMessage]]:
        """One Poe conversation per choice: every prompt, n times each."""
        return [
            [ProtocolMessage(role="user", content=prompt)]
            for prompt in self.prompts
            for _ in range(self.sampling.n)
        ]


def parse_completion_request(body: object, model_map: ModelMap) -> CompletionRequest:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    model = model_name(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = list(prompt)
    elif isinstance(prompt, list) and prompt:
        raise bad_request("prompt must be text: token arrays cannot be sent to Poe bots.", "prompt")
    else:
        raise bad_request("prompt is required (a string or an array of strings).", "prompt")
    best_of = body.get("best_of")
    if best_of not in (None, 1):
        raise bad_request("best_of is not supported through Poe; use n.", "best_of")
    sampling = parse_sampling(body, "max_tokens")
    if body.get("max_tokens") is None:
        sampling.max_tokens = DEFAULT_MAX_TOKENS
    if len(prompts) * sampling.n > 20:
        raise bad_request("At most 20 choices (prompts x n) per request.", "prompt")
    bot = bot_for(model, model_map)  # after every field, as in chat
    return CompletionRequest(model, bot, prompts, bool(body.get("echo")), sampling)


def text_completion(
    completion_id: str,
    created: int,
    model: str,
    choices: list[tuple[str, str]],
    usage: dict[str, int],
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"text": text, "index": i, "logprobs": None, "finish_reason": finish}
            for i, (text, finish) in enumerate(choices)
        ],
        "usage": usage,
    }


def completion_chunk(
    completion_id: str,
    created: int,
    model: str,
    index: int,
    text: str,
    finish_reason: str | None = None,
) -> dict[str, Any]:
    return {
        "id": completion_id,
        "object": "text_completion",
        "created": created,
        "model": model,
        "choices": [
            {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}
        ],
    }
