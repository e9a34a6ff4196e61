"""mitmproxy addon: answer OpenAI API calls with Poe bots.

    mitmdump -s addon/poe_openai.py

Answered flows are pointed at the OpenAI-compatible app (app.py) that this addon serves on a
loopback port inside mitmproxy's own event loop, and their responses are streamed back; nothing
is ever sent to OpenAI. Every other flow passes through untouched.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import ipaddress
import json
import logging
import signal
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, "") or __package__.startswith("__mitmproxy_script__"):
    # Loaded by `mitmdump -s addon/poe_openai.py`: make the `addon` package importable.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mitmproxy import command, contentviews, ctx, exceptions, http
from mitmproxy.addonmanager import Loader
from mitmproxy.proxy.mode_specs import LocalMode, ProxyMode, RegularMode, ReverseMode

from addon import gctune, views
from addon.app import FLOW_HEADER, create_app
from addon.config import (
    DEFAULT_BASE_URL,
    DEFAULT_HOSTS,
    DEFAULT_MAPPINGS,
    DEFAULT_UPLOAD_URL,
    ConfigError,
    Settings,
    fingerprint,
    parse_settings,
)
from addon.errors import OpenAIError, internal_error, method_not_allowed
from addon.mappings import MappingError, ModelMap, load_mappings
from addon.poe import PoeClient
from addon.quietlog import OwnStreamNotices
from addon.routing import is_answered
from addon.server import LoopbackServer
from addon.service import Service, body_too_large
from addon.status import status as status_report

logger = logging.getLogger(__name__)

METADATA_KEY = views.METADATA_KEY
# Methods the app has routes or answers for (the rest get a 405 from the addon itself).
APP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
SECRET_HEADERS = ("authorization", "api-key", "x-api-key")
OPTION_NAMES = (
    "poe_api_key",
    "poe_access_tokens",
    "poe_mappings",
    "poe_hosts",
    "poe_base_url",
    "poe_upload_url",
    "poe_proxy",
    "poe_max_file_mb",
    "poe_api_key_file",
    "poe_max_body_mb",
    "poe_first_event_timeout_s",
    "poe_idle_timeout_s",
    "poe_total_timeout_s",
    "poe_header_hold_s",
    "poe_keepalive_s",
)


def error_response(error: OpenAIError) -> http.Response:
    # CORS too: browser front ends otherwise see these as network errors
    headers = {
        "content-type": "application/json",
        "access-control-allow-origin": "*",
        **error.headers,
    }
    return http.Response.make(error.status, json.dumps(error.body()), headers)


def refuse(flow: http.HTTPFlow, error: OpenAIError) -> None:
    """Answer an answered host's request right here, without the loopback app."""
    flow.metadata.setdefault(METADATA_KEY, {"url": flow.request.pretty_url})
    flow.response = error_response(error)
    redact(flow)


def take_secrets(flow: http.HTTPFlow) -> dict[str, str]:
    """Take keys and tokens off the flow, leaving fingerprints: what mitmproxy shows, saves
    (-w) or sends on to the loopback app never holds a secret. Returns the originals."""
    taken: dict[str, str] = {}
    headers = flow.request.headers
    for name in SECRET_HEADERS:
        value = headers.get(name)
        if not value or "[redacted " in value:
            continue
        taken[name] = value
        scheme, _, secret = value.partition(" ")
        if not secret:
            scheme, secret = "", scheme
        tag = f"[redacted {fingerprint(secret.strip())}]"
        headers[name] = f"{scheme} {tag}" if scheme else tag
    return taken


def redact(flow: http.HTTPFlow) -> None:
    take_secrets(flow)
    flow.request.headers.pop(FLOW_HEADER, None)


def exposed_listeners() -> list[str]:
    """The listeners that other machines can reach (not loopback, not local capture)."""
    if "mode" not in ctx.options:
        return []
    exposed = []
    for spec in ctx.options.mode:
        try:
            mode = ProxyMode.parse(spec)
        except ValueError:
            continue
        if isinstance(mode, LocalMode):
            continue  # captures this machine's own programs
        host = mode.listen_host(ctx.options.listen_host) or "0.0.0.0"
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = host == "localhost"
        if not loopback:
            exposed.append(f"{spec} (listening on {host})")
    return exposed


def guard_open_relay(settings: Settings) -> None:
    """A configured key + a reachable listener + no client auth = anyone spends your points."""
    if not settings.api_keys or settings.access_tokens:
        return
    if "proxyauth" in ctx.options and ctx.options.proxyauth:
        return
    if ctx.options.poe_allow_open_relay:
        return
    exposed = exposed_listeners()
    if exposed:
        raise exceptions.OptionsError(
            "Refusing to start an open relay: a Poe key is configured and "
            f"{', '.join(exposed)} can be reached from other machines by anyone, with no "
            "client auth. Do one of: listen on 127.0.0.1 (e.g. --mode regular@127.0.0.1:8080 or "
            "--listen-host 127.0.0.1); set --set poe_access_tokens=<token> so clients must "
            "present it; set mitmproxy's --set proxyauth=user:pass. To start anyway, "
            "--set poe_allow_open_relay=true."
        )


class StoredStream:
    """A response stream callable: forwards every chunk at once and keeps a capped copy."""

    def __init__(self, flow: http.HTTPFlow, limit: int) -> None:
        self.flow = flow
        self.limit = limit
        self.buffer = bytearray()
        self.truncated = False

    def __call__(self, data: bytes) -> bytes:
        if data:
            room = self.limit - len(self.buffer)
            if room > 0:
                self.buffer += data[:room]
            if len(data) > room:
                self.truncated = True
        elif self.flow.response is not None:  # b"": the end of the stream
            self.flow.response.data.content = bytes(self.buffer)
            if self.truncated:
                self.flow.comment = (self.flow.comment + "\n" if self.flow.comment else "") + (
                    f"stored body truncated at {self.limit} bytes"
                )
        return data


class PoeOpenAI:
    def __init__(self) -> None:
        self.settings: Settings | None = None
        self.service: Service | None = None
        self.server: LoopbackServer | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.notices = OwnStreamNotices()

    def load(self, loader: Loader) -> None:
        self.notices.install()
        for view in views.VIEWS:
            contentviews.add(view)
        loader.add_option(
            "poe_api_key",
            str,
            "",
            "Poe API key(s) from poe.com/api_key, comma-separated. Empty: use the POE_API_KEY "
            "environment variable; if that is empty too, each client's own Bearer key is "
            "passed to Poe.",
        )
        loader.add_option(
            "poe_access_tokens",
            collections.abc.Sequence[str],
            [],
            "Tokens clients must present as their Bearer key (needs a configured Poe key).",
        )
        loader.add_option(
            "poe_mappings",
            str,
            DEFAULT_MAPPINGS,
            "YAML map of OpenAI model names to Poe bot names; relative paths resolve against "
            "the addon's repository.",
        )
        loader.add_option(
            "poe_hosts",
            collections.abc.Sequence[str],
            list(DEFAULT_HOSTS),
            "Hosts whose OpenAI API calls are answered with Poe.",
        )
        loader.add_option("poe_base_url", str, DEFAULT_BASE_URL, "Poe bot API base URL.")
        loader.add_option("poe_upload_url", str, DEFAULT_UPLOAD_URL, "Poe file upload base URL.")
        loader.add_option(
            "poe_proxy",
            str,
            "",
            "Proxy for reaching Poe (http://, https://, socks5://). Poe calls never use the "
            "environment's proxy or CA settings.",
        )
        loader.add_option(
            "poe_max_file_mb",
            int,
            50,
            "Largest picture or file (MB) accepted in a chat message; larger ones get a 413.",
        )
        loader.add_option(
            "poe_api_key_file",
            str,
            "",
            "File with Poe keys, one a line (keeps keys out of the process list).",
        )
        loader.add_option(
            "poe_max_body_mb", int, 64, "Largest request body (MB); larger ones get a 413."
        )
        loader.add_option(
            "poe_first_event_timeout_s",
            int,
            120,
            "Seconds to wait for Poe's first event (504 before the answer starts).",
        )
        loader.add_option(
            "poe_idle_timeout_s", int, 120, "Seconds Poe may stay silent between two events."
        )
        loader.add_option("poe_total_timeout_s", int, 900, "Seconds an answer may take in all.")
        loader.add_option(
            "poe_header_hold_s",
            int,
            10,
            "Streams: seconds to hold the status line for Poe's first event; then 200 is "
            "sent and SSE keep-alives follow while Poe is silent.",
        )
        loader.add_option(
            "poe_keepalive_s",
            int,
            15,
            "Streams: SSE keep-alive comment interval while Poe is silent.",
        )
        loader.add_option(
            "poe_allow_open_relay",
            bool,
            False,
            "Start even though a configured Poe key would be usable by anyone who can reach a "
            "non-loopback listener (no poe_access_tokens, no proxyauth).",
        )
        loader.add_option(
            "poe_response_store_size",
            int,
            1000,
            "Responses API: how many responses are kept for previous_response_id and GET.",
        )
        loader.add_option(
            "poe_response_store_minutes",
            int,
            60,
            "Responses API: how long (minutes) a response is kept.",
        )
        loader.add_option(
            "poe_stream_store_limit",
            int,
            1_000_000,
            "Bytes of each streamed answer kept on the flow for inspection (0: keep none).",
        )

    def configure(self, updated: set[str]) -> None:
        if "connection_strategy" in ctx.options and ctx.options.connection_strategy != "lazy":
            # With "eager", mitmproxy connects to api.openai.com before any hook sees the
            # request: offline clients are dropped, online ones leak a connection to OpenAI.
            logger.info("poe-openai: setting connection_strategy=lazy")
            ctx.options.connection_strategy = "lazy"
        if "poe_stream_store_limit" in updated and ctx.options.poe_stream_store_limit < 0:
            raise exceptions.OptionsError(
                "poe_stream_store_limit must be >= 0 (bytes); use 0 to keep no streamed body"
            )
        for name in ("poe_response_store_size", "poe_response_store_minutes"):
            if name in updated and getattr(ctx.options, name) < 1:
                raise exceptions.OptionsError(f"{name} must be at least 1")
        if self.settings is None or updated.intersection(OPTION_NAMES):
            try:
                settings = parse_settings(
                    **{name: getattr(ctx.options, name) for name in OPTION_NAMES}
                )
                model_map = load_mappings(settings.mappings_path)
            except (ConfigError, MappingError) as e:
                raise exceptions.OptionsError(str(e)) from None
            self._apply(settings, model_map)
        assert self.service is not None and self.settings is not None
        guard_open_relay(self.settings)
        self.service.responses.max_entries = ctx.options.poe_response_store_size
        self.service.responses.max_age_s = ctx.options.poe_response_store_minutes * 60

    def _apply(self, settings: Settings, model_map: ModelMap) -> None:
        old = self.settings
        self.settings = settings
        if self.service is None:
            self.service = Service(
                settings,
                model_map,
                PoeClient(settings.base_url, settings.proxy, settings.upload_url),
                routed_only=True,
            )
            return
        self.service.reconfigure(settings, model_map)
        endpoints = (settings.base_url, settings.proxy, settings.upload_url)
        if old is None or (old.base_url, old.proxy, old.upload_url) != endpoints:
            previous = self.service.poe
            self.service.poe = PoeClient(*endpoints)
            # Answers still streaming use the old client: close it once they must be over.
            _close_later(previous, settings.timeouts.total + 60)

    def running(self) -> None:
        assert self.service is not None and self.settings is not None
        raise_open_file_limit()
        if self.watcher is None:
            gctune.tune()
            self._ensure_server()
            self.service.load_tokenizer()
            loop = asyncio.get_running_loop()
            with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError):
                loop.add_signal_handler(signal.SIGUSR1, self.log_status)
            self.watcher = loop.create_task(self.watch_mappings())
        s = self.settings
        logger.info(
            "poe-openai: answering %s with Poe (%s) | auth: %s | %d mapped models from %s",
            ", ".join(sorted(s.hosts)),
            s.base_url,
            s.auth_mode,
            len(self.service.model_map.models),
            s.mappings_path,
        )
        for line in client_settings(ctx.options.mode if "mode" in ctx.options else []):
            logger.info("poe-openai: %s", line)

    def _ensure_server(self) -> LoopbackServer:
        """The loopback app server; started on first need, since a request can arrive
        between the listeners opening and the ``running`` hook."""
        if self.server is None:
            assert self.service is not None
            server = LoopbackServer(create_app(self.service))
            try:
                server.start()
            except RuntimeError:  # no running event loop
                server.stop()
                raise
            self.server = server
        return self.server

    def done(self) -> None:
        self.notices.uninstall()
        for view in views.VIEWS:
            with contextlib.suppress(Exception):
                contentviews.remove(view)
        if self.watcher is not None:
            self.watcher.cancel()
            self.watcher = None
        with contextlib.suppress(NotImplementedError, RuntimeError, AttributeError, ValueError):
            asyncio.get_running_loop().remove_signal_handler(signal.SIGUSR1)
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.service is not None:
            _close_later(self.service.poe)

    # --- daily use ---------------------------------------------------------------------------

    @command.command("poe.status")
    def status(self) -> str:
        """Mappings, key pool and request counts since start, as JSON (keys as fingerprints)."""
        if self.service is None:
            return "{}"
        report = status_report(self.service)
        report["stream_notices_expected"] = len(self.notices.expected)
        return json.dumps(report)

    def log_status(self) -> None:
        logger.info("poe-openai status: %s", self.status())

    @command.command("poe.reload")
    def reload(self) -> str:
        """Read the mappings file again (a broken file keeps the previous map)."""
        if self.service is None or self.settings is None:
            return "not configured"
        try:
            model_map = load_mappings(self.settings.mappings_path)
        except MappingError as e:
            logger.error("poe-openai: %s; keeping the previous map", e)
            return f"error: {e}"
        self.service.model_map = model_map
        logger.info("poe-openai: %d mapped models from %s", len(model_map.models), model_map.source)
        return f"{len(model_map.models)} mapped models"

    async def watch_mappings(self, interval: float = 1.0) -> None:
        """Reload the mappings when their file changes."""
        seen: tuple[float, int] | None = None
        while True:
            if self.settings is not None:
                try:
                    stat = self.settings.mappings_path.stat()
                    current = (stat.st_mtime, stat.st_size)
                except OSError:
                    current = None
                if seen is not None and current is not None and current != seen:
                    self.reload()
                seen = current
            await asyncio.sleep(interval)

    # --- flows ------------------------------------------------------------------------------

    def _answers(self, flow: http.HTTPFlow) -> bool:
        if self.settings is None:
            return False
        return is_answered(
            flow.client_conn.proxy_mode,
            self.settings.hosts,
            host=flow.request.host,
            host_header=flow.request.host_header,
            sni=flow.client_conn.sni,
        )

    def requestheaders(self, flow: http.HTTPFlow) -> None:
        # Route here already, so that a request whose body streams (stream_large_bodies)
        # also goes to the loopback app and never to the real host.
        if flow.response is not None or not self._answers(flow):
            return
        assert self.settings is not None
        if flow.request.method not in APP_METHODS:
            # No route takes it, and the loopback server's parser (llhttp) would refuse a
            # method outside HTTP's registry with a plain-text 400.
            path = flow.request.path.split("?", 1)[0]
            refuse(flow, method_not_allowed(flow.request.method, path))
            return
        size = flow.request.headers.get("content-length", "")
        if size.isdigit() and int(size) > self.settings.max_body_bytes:
            # Answer before mitmproxy reads (and buffers) a body this large.
            refuse(flow, body_too_large(self.settings.max_body_bytes))
            return
        try:
            secrets = take_secrets(flow)
            assert self.service is not None
            self.service.routed[flow.id] = secrets
            self._route(flow)
        except Exception:
            logger.exception("poe-openai: could not route %s", flow.request.pretty_url)
            flow.response = error_response(internal_error())
            redact(flow)

    async def request(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(METADATA_KEY)
        if meta is None or flow.response is not None:
            return
        try:
            assert self.server is not None
            await self.server.wait_started()
            if (flow.request.host, flow.request.port) != (self.server.host, self.server.port):
                self._route(flow)  # another addon moved it: put it back
        except Exception:
            # Fail closed: an answered host must never reach the real upstream.
            logger.exception("poe-openai: could not route %s", meta["url"])
            flow.response = error_response(internal_error())
            redact(flow)

    def _route(self, flow: http.HTTPFlow) -> None:
        server = self._ensure_server()
        flow.metadata.setdefault(METADATA_KEY, {"url": flow.request.pretty_url})
        flow.request.scheme = "http"
        flow.request.host = server.host
        flow.request.port = server.port
        flow.request.headers[FLOW_HEADER] = flow.id
        # In upstream mode the connection would otherwise go through the upstream proxy.
        flow.server_conn.via = None

    def responseheaders(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(METADATA_KEY)
        if meta is None or flow.response is None:
            return
        flow.request.url = meta["url"]  # the flow list shows the OpenAI URL, not loopback
        redact(flow)
        flow.marked = ":speech_balloon:"
        if flow.response.headers.get("content-type", "").startswith("text/event-stream"):
            limit = ctx.options.poe_stream_store_limit
            flow.response.stream = StoredStream(flow, limit) if limit else True
            self.notices.expect(flow.client_conn.peername, flow.request.host)

    def response(self, flow: http.HTTPFlow) -> None:
        self._explain(flow)
        if self.service is not None:
            # Usually gone already; not for answers the app's endpoints never saw (a CORS
            # preflight, answered by the middleware; a flow refused while routing).
            self.service.routed.pop(flow.id, None)

    def _explain(self, flow: http.HTTPFlow) -> None:
        """The flow's comment and views: the Poe bot, key fingerprint, timing, errors."""
        meta = flow.metadata.get(METADATA_KEY)
        if meta is None or self.service is None:
            return
        self.notices.forget(flow.client_conn.peername, flow.request.host)
        info = self.service.flow_info.pop(flow.id, None)
        if info is None:
            return
        meta["poe"] = info
        parts = [f"Poe bot {info.get('bot')}", str(info.get("key"))]
        if "first_event_ms" in info:
            parts.append(f"first event {info['first_event_ms']} ms")
        if "total_ms" in info:
            parts.append(f"total {info['total_ms']} ms")
        if "tokens_est" in info:
            parts.append(f"~{info['tokens_est']} tokens")
        comment = " | ".join(parts)
        if info.get("error"):
            comment += f"\nerror: {info['error']}"
        flow.comment = f"{flow.comment}\n{comment}" if flow.comment else comment

    def error(self, flow: http.HTTPFlow) -> None:
        meta = flow.metadata.get(METADATA_KEY)
        if meta is None:
            return
        self._explain(flow)
        if self.service is not None:
            self.service.routed.pop(flow.id, None)
        # The client went away (or the stream was reset): stop the Poe query now.
        if self.service is not None and self.service.cancel(flow.id):
            self.service.stats["client left"] += 1  # (no log line: 50 leaving at once add up)
        flow.request.url = meta["url"]
        redact(flow)


def client_settings(modes: collections.abc.Sequence[str]) -> list[str]:
    """For the start-up banner: what a client should set, per listener."""
    confdir = ctx.options.confdir if "confdir" in ctx.options else "~/.mitmproxy"
    ca = f"{confdir}/mitmproxy-ca-cert.pem"
    lines = []
    for spec in modes:
        try:
            mode = ProxyMode.parse(spec)
        except ValueError:
            continue
        host = mode.listen_host(ctx.options.listen_host if "listen_host" in ctx.options else "")
        port = mode.listen_port()
        where = f"{host or '127.0.0.1'}:{port}"
        if isinstance(mode, ReverseMode):
            lines.append(f"{spec}: clients set base URL http://{where}/v1 (any API key)")
        elif isinstance(mode, RegularMode):
            lines.append(
                f"{spec}: clients set HTTPS_PROXY=http://{where} and trust {ca} "
                f"(e.g. SSL_CERT_FILE={ca}, NODE_EXTRA_CA_CERTS={ca})"
            )
        else:
            lines.append(f"{spec}: clients trust {ca}; see mitmproxy's docs for this mode")
    return lines


def raise_open_file_limit() -> None:
    """Each answered stream holds four sockets here (client, loopback both ends, Poe): the
    common default of 1024 open files would cap the proxy near 250 concurrent streams."""
    try:
        import resource
    except ImportError:  # Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            logger.info("poe-openai: open-file limit raised from %d to %d", soft, wanted)


def _close_later(client: PoeClient, delay: float = 0) -> None:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return

    async def close() -> None:
        await asyncio.sleep(delay)
        await client.aclose()

    task = loop.create_task(close())
    _background.add(task)
    task.add_done_callback(_background.discard)


_background: set[asyncio.Task[Any]] = set()

addons = [PoeOpenAI()]
