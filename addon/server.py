"""Serves an ASGI app on a loopback port inside the running event loop (mitmproxy's).

mitmproxy streams only bytes that arrive over a server connection, so the addon points answered
flows at this server instead of building responses itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Generator

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

logger = logging.getLogger(__name__)


class _ExpectedNoise(logging.Filter):
    """When a client leaves, the addon cancels its answer on purpose; uvicorn then reports the
    response as incomplete, which here is the intended outcome, not an error."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "returned without completing response" not in record.getMessage()


class _InLoopServer(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn would take over SIGINT/SIGTERM from mitmproxy while it runs.
        yield

    def install_signal_handlers(self) -> None:  # older uvicorn
        pass


class LoopbackServer:
    def __init__(self, app: ASGIApp, host: str = "127.0.0.1") -> None:
        self.app = app  # also called in-process, for answers that need no stream
        # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only when sock.proto says TCP;
        # without it each small answer waits ~40 ms on Nagle + delayed ACK.
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.host, self.port = self.sock.getsockname()[:2]
        self.app = app
        self.stopping = False
        config = uvicorn.Config(
            self._serve,
            interface="asgi3",  # (a bound method: uvicorn would guess ASGI2)
            lifespan="off",
            # uvicorn's C parser: with h11 (pure Python) the loopback hop's parsing took ~2.5%
            # of mitmdump's CPU per streamed request (bench/run.py --profile).
            http="httptools",
            log_level="warning",
            access_log=False,
            # mitmproxy keeps loopback connections open for reuse between requests.
            timeout_keep_alive=300,
            server_header=False,
            date_header=False,
        )
        self.server = _InLoopServer(config)
        # uvicorn.Config (re)configures its loggers, so the filter goes on afterwards.
        noise = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, _ExpectedNoise) for f in noise.filters):
            noise.addFilter(_ExpectedNoise())
        self.task: asyncio.Task[None] | None = None

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except asyncio.CancelledError:
            if self.stopping:
                # mitmproxy is exiting and asyncio cancels every task: an answer still
                # streaming ends with the proxy, which is no error of the application (uvicorn
                # would print "Exception in ASGI application" and a traceback per stream).
                return
            raise

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))

    async def wait_started(self) -> None:
        while not self.server.started:
            if self.task is not None and self.task.done():
                raise RuntimeError("the loopback server stopped") from self.task.exception()
            await asyncio.sleep(0.005)

    def stop(self) -> None:
        self.stopping = True
        self.server.should_exit = True
        self.server.force_exit = True
        with contextlib.suppress(OSError):
            self.sock.close()
