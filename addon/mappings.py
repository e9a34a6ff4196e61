"""The model map: OpenAI model names -> Poe bot names, read from a small YAML file.

Schema::

    models:
      gpt-4o: GPT-4o          # OpenAI name: Poe bot name
      Claude-Sonnet-4:        # no value: the bot of the same name

Errors name the file and line, so a typo is easy to find.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

# Poe bot names are letters, digits, dots, dashes and underscores; anything else cannot be a
# URL path segment of the bot API.
BOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")


class MappingError(ValueError):
    pass


@dataclass(frozen=True)
class ModelMap:
    models: dict[str, str] = field(default_factory=dict)
    source: str = ""

    def bot_for(self, model: str) -> str:
        """The Poe bot for an OpenAI model name; unmapped names are bot names themselves."""
        bot = self.models.get(model)
        if bot is None:
            bot = self._folded().get(model.casefold(), model)
        return bot

    def is_mapped(self, model: str) -> bool:
        return model in self.models or model.casefold() in self._folded()

    def _folded(self) -> dict[str, str]:
        # Small maps; rebuilt lazily and cached on the frozen instance.
        cache = self.__dict__.get("_folded_cache")
        if cache is None:
            cache = {k.casefold(): v for k, v in self.models.items()}
            object.__setattr__(self, "_folded_cache", cache)
        return cache


def parse_mappings(text: str, source: str = "<string>") -> ModelMap:
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}, line {mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e)
        raise MappingError(f"{where}: not valid YAML: {problem}") from None
    if root is None:
        return ModelMap({}, source)

    def fail(node: yaml.Node, message: str) -> MappingError:
        return MappingError(f"{source}, line {node.start_mark.line + 1}: {message}")

    if not isinstance(root, yaml.MappingNode):
        raise fail(root, "expected a mapping with a 'models' key")
    models_node: yaml.Node | None = None
    for key, value in root.value:
        if key.value != "models":
            raise fail(key, f"unknown key {key.value!r}; the only top-level key is 'models'")
        models_node = value
    models: dict[str, str] = {}
    if models_node is None or (
        isinstance(models_node, yaml.ScalarNode) and models_node.value in ("", "~", "null")
    ):
        return ModelMap(models, source)
    if not isinstance(models_node, yaml.MappingNode):
        raise fail(models_node, "'models' must map OpenAI model names to Poe bot names")
    for key, value in models_node.value:
        if not isinstance(key, yaml.ScalarNode) or not key.value.strip():
            raise fail(key, "a model name must be a non-empty string")
        name = key.value.strip()
        if not isinstance(value, yaml.ScalarNode):
            raise fail(value, f"{name}: the Poe bot name must be a string")
        bot = value.value.strip()
        if value.tag.endswith(":null") or bot in ("", "~", "null"):
            bot = name
        if not BOT_NAME.match(bot):
            raise fail(value if value.value else key, f"{name}: {bot!r} is not a Poe bot name")
        if name in models:
            raise fail(key, f"{name} is listed twice")
        models[name] = bot
    return ModelMap(models, source)


def load_mappings(path: Path) -> ModelMap:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise MappingError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:  # (a ValueError: it would escape as a traceback)
        raise MappingError(f"{path}: not UTF-8 text (byte {e.start})") from None
    return parse_mappings(text, str(path))
