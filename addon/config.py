"""Parsed configuration: mitmproxy option values turned into one plain, validated record."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_HOSTS = ("api.openai.com",)
DEFAULT_BASE_URL = "https://api.poe.com/bot/"
DEFAULT_UPLOAD_URL = "https://www.quora.com/poe_api/"
DEFAULT_MAPPINGS = "mappings/default.yaml"

PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")


class ConfigError(ValueError):
    """A bad option value; the message names the option and the fix."""


@dataclass(frozen=True)
class Settings:
    api_keys: tuple[str, ...]
    access_tokens: tuple[str, ...]
    mappings_path: Path
    hosts: frozenset[str]
    base_url: str
    upload_url: str
    proxy: str | None
    max_file_bytes: int = 50 * 1024 * 1024

    @property
    def auth_mode(self) -> str:
        if self.access_tokens:
            return "access tokens"
        if self.api_keys:
            return "configured keys"
        return "pass-through"


def split_secrets(values: Iterable[str]) -> tuple[str, ...]:
    """Comma- or whitespace-separated secrets, in order, without blanks or repeats."""
    seen: dict[str, None] = {}
    for value in values:
        for part in value.replace(",", " ").split():
            seen.setdefault(part, None)
    return tuple(seen)


def normalize_host(host: str) -> str:
    """Lower-case host without port or trailing dot ("API.OpenAI.com:443" -> "api.openai.com")."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:443
        return host[1 : host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host.rstrip(".")


def _base_url(option: str, value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(
            f"{option}={value!r} is not an http(s) URL; "
            f"use e.g. --set {option}=https://api.poe.com/bot/"
        )
    return value if value.endswith("/") else value + "/"


def _proxy(value: str) -> str | None:
    value = value.strip()
    if not value:
        return None
    parts = urlsplit(value)
    if parts.scheme not in PROXY_SCHEMES or not parts.hostname:
        raise ConfigError(
            f"poe_proxy={value!r} is not a proxy URL; use e.g. "
            "--set poe_proxy=http://127.0.0.1:7890 or socks5://127.0.0.1:1080"
        )
    return value


def parse_settings(
    *,
    poe_api_key: str,
    poe_access_tokens: Iterable[str],
    poe_mappings: str,
    poe_hosts: Iterable[str],
    poe_base_url: str,
    poe_upload_url: str,
    poe_proxy: str,
    poe_max_file_mb: int = 50,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    env = os.environ if environ is None else environ
    # The key comes from the environment when the option is empty, so `--options` and mitmweb's
    # option editor never show it.
    api_keys = split_secrets([poe_api_key or env.get("POE_API_KEY", "")])
    access_tokens = split_secrets(poe_access_tokens)
    if access_tokens and not api_keys:
        raise ConfigError(
            "poe_access_tokens is set but no Poe key is configured: clients would present a "
            "token and Poe would get no key. Set poe_api_key (or POE_API_KEY), or clear "
            "poe_access_tokens to let clients send their own Poe key."
        )
    hosts = frozenset(normalize_host(h) for h in poe_hosts if h.strip())
    if not hosts:
        raise ConfigError(
            "poe_hosts is empty: nothing would be answered. Use e.g. --set poe_hosts=api.openai.com"
        )
    path = Path(poe_mappings).expanduser()
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ConfigError(
            f"poe_mappings={poe_mappings!r}: no such file ({path}); point it at a YAML map such "
            f"as {DEFAULT_MAPPINGS}"
        )
    if poe_max_file_mb < 1:
        raise ConfigError(f"poe_max_file_mb={poe_max_file_mb} must be at least 1 (megabytes)")
    return Settings(
        api_keys=api_keys,
        access_tokens=access_tokens,
        mappings_path=path,
        hosts=hosts,
        base_url=_base_url("poe_base_url", poe_base_url),
        upload_url=_base_url("poe_upload_url", poe_upload_url),
        proxy=_proxy(poe_proxy),
        max_file_bytes=poe_max_file_mb * 1024 * 1024,
    )


def fingerprint(secret: str) -> str:
    """A short, non-reversible tag that tells keys apart in logs ("key#3fa2c1")."""
    return "key#" + hashlib.sha256(secret.encode()).hexdigest()[:6]
