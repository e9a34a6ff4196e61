"""Parsed configuration: mitmproxy option values turned into one plain, validated record."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
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
class Timeouts:
    """Seconds. Poe's "Thinking..." replacements count as events, so as activity."""

    first_event: float = 120  # from the query to Poe's first event
    idle: float = 120  # between two Poe events
    total: float = 900  # the whole answer
    header_hold: float = 10  # streams: how long to hold the status line for Poe's first event
    keepalive: float = 15  # streams: SSE comment this often while Poe is silent


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
    max_body_bytes: int = 64 * 1024 * 1024
    timeouts: Timeouts = field(default_factory=lambda: Timeouts())

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
    poe_api_key_file: str = "",
    poe_max_body_mb: int = 64,
    poe_first_event_timeout_s: int = 120,
    poe_idle_timeout_s: int = 120,
    poe_total_timeout_s: int = 900,
    poe_header_hold_s: int = 10,
    poe_keepalive_s: int = 15,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    env = os.environ if environ is None else environ
    # The key comes from the environment when the option is empty, so `--options` and mitmweb's
    # option editor never show it; a key file keeps keys out of the process list too.
    api_keys = split_secrets(
        [poe_api_key or env.get("POE_API_KEY", ""), *_key_file(poe_api_key_file)]
    )
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
    for name, value in (
        ("poe_max_file_mb", poe_max_file_mb),
        ("poe_max_body_mb", poe_max_body_mb),
        ("poe_first_event_timeout_s", poe_first_event_timeout_s),
        ("poe_idle_timeout_s", poe_idle_timeout_s),
        ("poe_total_timeout_s", poe_total_timeout_s),
        ("poe_keepalive_s", poe_keepalive_s),
    ):
        if value < 1:
            raise ConfigError(f"{name}={value} must be at least 1")
    if poe_header_hold_s < 0:
        raise ConfigError(f"poe_header_hold_s={poe_header_hold_s} must be 0 or more (seconds)")
    return Settings(
        api_keys=api_keys,
        access_tokens=access_tokens,
        mappings_path=path,
        hosts=hosts,
        base_url=_base_url("poe_base_url", poe_base_url),
        upload_url=_base_url("poe_upload_url", poe_upload_url),
        proxy=_proxy(poe_proxy),
        max_file_bytes=poe_max_file_mb * 1024 * 1024,
        max_body_bytes=poe_max_body_mb * 1024 * 1024,
        timeouts=Timeouts(
            first_event=poe_first_event_timeout_s,
            idle=poe_idle_timeout_s,
            total=poe_total_timeout_s,
            header_hold=poe_header_hold_s,
            keepalive=poe_keepalive_s,
        ),
    )


def _key_file(path: str) -> list[str]:
    """Keys from a file: one a line; blank lines and # comments are skipped."""
    if not path:
        return []
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"poe_api_key_file={path!r}: cannot read it ({e.strerror})") from None
    keys = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not keys:
        raise ConfigError(f"poe_api_key_file={path!r} holds no key (one key a line)")
    return keys


def fingerprint(secret: str) -> str:
    """A short, non-reversible tag that tells keys apart in logs ("key#3fa2c1")."""
    # Not cached: a cache would keep every client's raw key in memory, and a sha256 of a key
    # costs about 2 us (a request takes four tags: under 0.5% of its CPU).
    # surrogateescape: header values with odd bytes must not make redaction fail
    return "key#" + hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()[:6]
