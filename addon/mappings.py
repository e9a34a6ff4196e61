"""The model map: OpenAI model names -> Poe bot names, read from a small YAML file.

Schema::

    models:
      gpt-4o: GPT-4o          # OpenAI name: Poe bot name
      Claude-Sonnet-4:        # no value: the bot of the same name

Errors name the file and line, so a typo is easy to find.

A name resolves, in this order: the map (exact, then in any case), the bots Poe publishes (in
any case; see catalog.py), then the same two for a dated snapshot's family
("gpt-4o-2024-08-06" -> "gpt-4o"); anything else goes to Poe as written.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from addon.catalog import PoeBots

# Poe bot names are letters, digits, dots, dashes and underscores; anything else cannot be a
# URL path segment of the bot API.
BOT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
# OpenAI's dated snapshot ids: "gpt-4o-2024-08-06", "gpt-5-2025-08-07", "gpt-4-0613".
SNAPSHOT = re.compile(r"-(?:\d{4}-\d{2}-\d{2}|\d{4})$")


def family(model: str) -> str | None:
    """The model a dated snapshot id belongs to, or None for a name that is not one."""
    base = SNAPSHOT.sub("", model)
    return base if base != model and base else None


class MappingError(ValueError):
    pass


@dataclass(frozen=True)
class ModelMap:
    models: dict[str, str] = field(default_factory=dict)
    source: str = ""

    # Poe's published bots (shared, filled in the background); not part of the map's identity.
    published: PoeBots = field(default_factory=PoeBots, compare=False, repr=False)

    def bot_for(self, model: str) -> str:
        """The Poe bot for an OpenAI model name; unknown names are bot names themselves."""
        return self.lookup(model) or model

    def lookup(self, model: str) -> str | None:
        """The bot the map or Poe's published list gives ``model`` (or its snapshot's
        family), or None."""
        for name in (model, family(model)):
            if name is None:
                continue
            bot = (
                self.models.get(name)
                or self._folded().get(name.casefold())
                or self.published.match(name)
            )
            if bot is not None:
                return bot
        return None

    def is_mapped(self, model: str) -> bool:
        return self.lookup(model) is not None

    def names(self) -> list[str]:
        """What /v1/models lists: the map's names, then Poe's bots the map does not name."""
        folded = self._folded()
        return [*self.models, *(b for b in self.published.names if b.casefold() not in folded)]

    def with_published(self, published: PoeBots) -> ModelMap:
        return dataclasses.replace(self, published=published)

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
