"""Parsed configuration: mitmproxy option values turned into one plain, validated record."""

from __future__ import annotations

import hashlib
import ipaddress
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

REPO_ROOT = Path(__file__).resolve().parent.parent

DEFAULT_HOSTS = ("api.openai.com",)
DEFAULT_BASE_URL = "https://api.poe.com/bot/"
DEFAULT_UPLOAD_URL = "https://www.quora.com/poe_api/"
DEFAULT_MAPPINGS = "mappings/default.yaml"
# Poe's model list, from the host of poe_base_url (https://api.poe.com/v1/models by default,
# and a test's stand-in Poe when it stands in for Poe); "" turns learning Poe's bots off.
DEFAULT_MODELS_URL = "auto"

PROXY_SCHEMES = ("http", "https", "socks5", "socks5h")

# Defaults of the numeric options (the addon's option table and the plain server share them).
DEFAULTS: dict[str, int] = {
    "poe_max_file_mb": 50,
    "poe_max_body_mb": 64,
    "poe_first_event_timeout_s": 120,
    "poe_idle_timeout_s": 120,
    "poe_total_timeout_s": 900,
    "poe_header_hold_s": 10,
    "poe_keepalive_s": 15,
}


class ConfigError(ValueError):
    """A bad option value; the message names the option and the fix."""


@dataclass(frozen=True)
class Spelling:
    """How the user set an option, so that a message names what they typed: mitmproxy's
    ``--set poe_idle_timeout_s=5`` or the plain server's ``POE_IDLE_TIMEOUT_S=5``."""

    env: bool = False

    def name(self, option: str) -> str:
        return option.upper() if self.env else option

    def example(self, option: str, value: str) -> str:
        return f"{option.upper()}={value}" if self.env else f"--set {option}={value}"


OPTION = Spelling()
ENV = Spelling(env=True)

TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
FALSE_WORDS = frozenset({"false", "0", "no", "off"})


def parse_bool(text: str, option: str, spelling: Spelling = OPTION) -> bool:
    word = text.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise ConfigError(
        f"{spelling.name(option)}={text!r} is not a yes/no value; use "
        f"{spelling.example(option, 'true')} or {spelling.example(option, 'false')} "
        "(1/0, yes/no and on/off work too)"
    )


def parse_int(text: str, option: str, spelling: Spelling = OPTION) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise ConfigError(
            f"{spelling.name(option)}={text!r} is not a whole number; use e.g. "
            f"{spelling.example(option, '120')}"
        ) from None


def is_loopback_host(host: str) -> bool:
    """True for a listen or peer address only this machine can use: "localhost", 127.0.0.0/8,
    ::1 (also as [::1], with a zone, or IPv4-mapped). Anything else, names and malformed
    addresses included, counts as reachable from other machines."""
    host = host.strip().lower().removeprefix("[").removesuffix("]").split("%", 1)[0]
    if host == "localhost":
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


@dataclass(frozen=True)
class Timeouts:
    """Seconds. Poe's "Thinking..." replacements count as events, so as activity."""

    first_event: float = 120  # from the query to Poe's first event
    idle: float = 120  # between two Poe events
    total: float = 900  # the whole answer
    header_hold: float = 10  # streams: how long to hold the status line for Poe's first event
    keepalive: float = 15  # streams: SSE comment this often while Poe is silent


@dataclass(frozen=True)
class StateURL:
    """Where shared state lives (poe_state_url): a Redis or Valkey server."""

    url: str = field(repr=False)  # may hold a password
    host: str
    port: int
    db: int
    tls: bool
    password: str | None = field(default=None, repr=False)  # from POE_STATE_PASSWORD

    def describe(self) -> str:
        """Host and database only: a password never reaches a log."""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def parse_state_url(
    value: str, spelling: Spelling = OPTION, password: str | None = None
) -> StateURL | None:
    """None for empty (in-process state); a ConfigError with the fix for anything else."""
    value = value.strip()
    if not value:
        return None
    option = spelling.name("poe_state_url")
    example = spelling.example("poe_state_url", "redis://127.0.0.1:6379/0")
    try:
        parts = urlsplit(value)
        host, port, given = parts.hostname or "", parts.port or 6379, parts.password
    except ValueError:
        parts, host, port, given = urlsplit(""), "", 0, None
    shown = _without_password(value)
    if parts.scheme not in ("redis", "rediss") or not host:
        raise ConfigError(
            f"{option}={shown!r} is not a Redis URL; use e.g. {example} (rediss:// for TLS)"
        )
    db = parts.path.strip("/") or "0"
    if not db.isdigit() or parts.query or parts.fragment:
        raise ConfigError(
            f"{option}={shown!r}: give redis://[:password@]host:port/db with a database "
            f"number and nothing after it; e.g. {example}"
        )
    tls = parts.scheme == "rediss"
    return StateURL(value, host, port, int(db), tls, None if given else password)


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
    models_url: str | None = None  # Poe's model list (None: not fetched)
    state_url: StateURL | None = None  # None: in-process state

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


def _is_url(value: str, schemes: tuple[str, ...]) -> bool:
    """A URL with one of ``schemes``, a host, and a numeric port if any."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return False
    return parts.scheme in schemes and bool(parts.hostname)


def _base_url(option: str, value: str, spelling: Spelling) -> str:
    if not _is_url(value, ("http", "https")):
        raise ConfigError(
            f"{spelling.name(option)}={_without_password(value)!r} is not an http(s) URL; "
            f"use e.g. {spelling.example(option, DEFAULT_BASE_URL)}"
        )
    return value if value.endswith("/") else value + "/"


def _proxy(value: str, spelling: Spelling) -> str | None:
    value = value.strip()
    if not value:
        return None
    if not _is_url(value, PROXY_SCHEMES):
        raise ConfigError(
            f"{spelling.name('poe_proxy')}={_without_password(value)!r} is not a proxy URL; use "
            f"e.g. {spelling.example('poe_proxy', 'http://127.0.0.1:7890')} or "
            "socks5://127.0.0.1:1080"
        )
    return value


def _without_password(url: str) -> str:
    """A URL for a message: a proxy's user:password never reaches a log."""
    return re.sub(r"//[^/@]*@", "//***@", url)


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
    poe_models_url: str = DEFAULT_MODELS_URL,
    poe_state_url: str = "",
    environ: Mapping[str, str] | None = None,
    spelling: Spelling = OPTION,
) -> Settings:
    """Every value checked at once; a ConfigError names the option as the user set it."""
    env = os.environ if environ is None else environ
    name = spelling.name
    # The key comes from the environment when the option is empty, so `--options` and mitmweb's
    # option editor never show it; a key file keeps keys out of the process list too.
    api_keys = split_secrets(
        [poe_api_key or env.get("POE_API_KEY", ""), *_key_file(poe_api_key_file, spelling)]
    )
    access_tokens = split_secrets(poe_access_tokens)
    if access_tokens and not api_keys:
        key_option = "POE_API_KEY" if spelling.env else "poe_api_key (or POE_API_KEY)"
        raise ConfigError(
            f"{name('poe_access_tokens')} is set but no Poe key is configured: clients would "
            f"present a token and Poe would get no key. Set {key_option}, or clear "
            f"{name('poe_access_tokens')} to let clients send their own Poe key."
        )
    for host in poe_hosts:
        if "/" in host or " " in host.strip():
            # A URL would never match a Host header: its calls would go to OpenAI unanswered.
            raise ConfigError(
                f"{name('poe_hosts')} holds {host!r}, which is not a host name; give the host "
                f"alone, e.g. {spelling.example('poe_hosts', 'api.openai.com')}"
            )
    hosts = frozenset(normalize_host(h) for h in poe_hosts if h.strip())
    if not hosts:
        raise ConfigError(
            f"{name('poe_hosts')} is empty: nothing would be answered. Use e.g. "
            f"{spelling.example('poe_hosts', 'api.openai.com')}"
        )
    path = Path(poe_mappings).expanduser()
    if not path.is_absolute():
        path = REPO_ROOT / path
    if not path.is_file():
        raise ConfigError(
            f"{name('poe_mappings')}={poe_mappings!r}: no such file ({path}); point it at a "
            f"YAML map such as {DEFAULT_MAPPINGS}"
        )
    for option, value, least in (
        ("poe_max_file_mb", poe_max_file_mb, 1),
        ("poe_max_body_mb", poe_max_body_mb, 1),
        ("poe_first_event_timeout_s", poe_first_event_timeout_s, 1),
        ("poe_idle_timeout_s", poe_idle_timeout_s, 1),
        ("poe_total_timeout_s", poe_total_timeout_s, 1),
        ("poe_header_hold_s", poe_header_hold_s, 0),
        ("poe_keepalive_s", poe_keepalive_s, 1),
    ):
        if value < least:
            raise ConfigError(
                f"{name(option)}={value} must be at least {least}; use e.g. "
                f"{spelling.example(option, str(DEFAULTS[option]))}"
            )
    base_url = _base_url("poe_base_url", poe_base_url, spelling)
    return Settings(
        api_keys=api_keys,
        access_tokens=access_tokens,
        mappings_path=path,
        hosts=hosts,
        base_url=base_url,
        upload_url=_base_url("poe_upload_url", poe_upload_url, spelling),
        proxy=_proxy(poe_proxy, spelling),
        max_file_bytes=poe_max_file_mb * 1024 * 1024,
        max_body_bytes=poe_max_body_mb * 1024 * 1024,
        timeouts=Timeouts(
            first_event=poe_first_event_timeout_s,
            idle=poe_idle_timeout_s,
            total=poe_total_timeout_s,
            header_hold=poe_header_hold_s,
            keepalive=poe_keepalive_s,
        ),
        models_url=_models_url(poe_models_url, base_url, spelling),
        # A password may come from the environment, to keep it out of options and ps
        state_url=parse_state_url(poe_state_url, spelling, env.get("POE_STATE_PASSWORD")),
    )


def _models_url(value: str, base_url: str, spelling: Spelling) -> str | None:
    value = value.strip()
    if not value:
        return None
    if value == DEFAULT_MODELS_URL:
        parts = urlsplit(base_url)
        return f"{parts.scheme}://{parts.netloc}/v1/models"
    if not _is_url(value, ("http", "https")):
        name = spelling.name("poe_models_url")
        raise ConfigError(
            f"{name}={_without_password(value)!r} is not an http(s) URL; use e.g. "
            f"{spelling.example('poe_models_url', 'https://api.poe.com/v1/models')}, "
            f"{spelling.example('poe_models_url', 'auto')} (the list on "
            f"{spelling.name('poe_base_url')}'s host) "
            f"or an empty {name} to match model names against the map alone"
        )
    return value


def _key_file(path: str, spelling: Spelling) -> list[str]:
    """Keys from a file: one a line; blank lines and # comments (whole-line or after a key,
    following a space) are skipped."""
    if not path:
        return []
    option = spelling.name("poe_api_key_file")
    file = Path(path).expanduser()
    try:
        lines = file.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise ConfigError(f"{option}={path!r}: cannot read it ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{option}={path!r} is not a UTF-8 text file (one key a line)") from None
    keys = [key for line in lines if (key := COMMENT.sub("", line).strip())]
    if not keys:
        raise ConfigError(f"{option}={path!r} holds no key (one key a line)")
    return keys


# A comment starts a line or follows a space: "poe-key  # second account" is the key alone.
COMMENT = re.compile(r"(^|\s)#.*")


def secret_digest(secret: str) -> str:
    """A key's full digest: how shared state (Redis) names it, never the key itself. Not
    cached, like fingerprint: a cache would keep raw client keys in memory."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def fingerprint(secret: str) -> str:
    """A short, non-reversible tag that tells keys apart in logs ("key#3fa2c1")."""
    # Not cached: a cache would keep every client's raw key in memory, and a sha256 of a key
    # costs about 2 us (a request takes four tags: under 0.5% of its CPU).
    # surrogateescape: header values with odd bytes must not make redaction fail
    return "key#" + hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()[:6]
