"""Image generation: OpenAI ``/v1/images/generations`` <-> a Poe image bot. Pure functions."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from addon.chat import bot_for, model_name, parse_parameters
from addon.errors import bad_request
from addon.mappings import ModelMap

DEFAULT_MODEL = "dall-e-3"
MAX_IMAGES = 10
# Aspect ratios image bots commonly accept; a size maps to the closest one.
ASPECTS = ("1:1", "16:9", "9:16", "4:3", "3:4", "3:2", "2:3", "21:9", "9:21")
MARKDOWN_IMAGE = re.compile(r"!\[[^\]]*\]\(\s*<?([^)\s>]+)>?[^)]*\)")
# A reference definition's URL ends at white space, or where markdown glued onto it begins
# (brackets, angle brackets, "![" of an image): "[r]: https://x/cat.png![cat][r]" is cat.png.
REFERENCE = re.compile(r"^\[[^\]]+\]:[ \t]*<?((?:(?!!\[)[^\s<>\[\]])+)", re.M)


@dataclass
class ImageRequest:
    model: str
    bot: str
    prompt: str
    n: int = 1
    aspect: str | None = None
    response_format: str = "url"
    parameters: dict[str, Any] = field(default_factory=dict)


def aspect_for(size: str) -> str | None:
    """OpenAI size ("1792x1024") -> the nearest common aspect ratio ("16:9"); "auto" -> None."""
    match = re.fullmatch(r"(\d{2,5})x(\d{2,5})", size)
    if match is None:
        return None
    ratio = int(match.group(1)) / int(match.group(2))

    def distance(aspect: str) -> float:
        w, h = aspect.split(":")
        return abs(math.log(ratio * int(h) / int(w)))

    return min(ASPECTS, key=distance)


def parse_image_request(body: object, model_map: ModelMap) -> ImageRequest:
    if not isinstance(body, dict):
        raise bad_request("The request body must be a JSON object.")
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise bad_request("prompt is required.", "prompt")
    # The same checks as chat (one validation path); only a missing model has a default here.
    model = body.get("model")
    model = model_name({"model": DEFAULT_MODEL if model is None else model})
    n = body.get("n", 1)
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or not 1 <= n <= MAX_IMAGES:
        raise bad_request(f"n must be an integer from 1 to {MAX_IMAGES}.", "n")
    size = body.get("size")
    if size is not None and (
        not isinstance(size, str) or (size != "auto" and not aspect_for(size))
    ):
        raise bad_request("size must look like 1024x1024 (or be 'auto').", "size")
    response_format = body.get("response_format")
    if response_format is None:
        response_format = "url"
    if response_format not in ("url", "b64_json"):
        raise bad_request("response_format must be 'url' or 'b64_json'.", "response_format")
    parameters = parse_parameters(body.get("poe_parameters"))
    return ImageRequest(
        model=model,
        bot=bot_for(model, model_map),  # after every field, as in chat
        prompt=prompt,
        n=n,
        aspect=aspect_for(size) if isinstance(size, str) else None,
        response_format=response_format,
        parameters=parameters,
    )


def bot_parameters(req: ImageRequest) -> dict[str, Any]:
    """Where the size goes: Poe image bots take an aspect ratio parameter. Explicit
    poe_parameters win."""
    params: dict[str, Any] = {}
    if req.aspect:
        params["aspect_ratio"] = req.aspect
    return {**params, **req.parameters}


def image_urls(answer: str) -> list[str]:
    """The images in an image bot's answer (file events already rendered as markdown)."""
    urls = MARKDOWN_IMAGE.findall(answer) + REFERENCE.findall(answer)
    return [u for u in dict.fromkeys(urls) if u.startswith(("http://", "https://"))]


def images_response(created: int, items: list[dict[str, str]]) -> dict[str, Any]:
    return {"created": created, "data": items}
