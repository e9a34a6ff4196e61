"""Drops noise that is no news.

mitmproxy's "Streaming response from api.openai.com." line for answers the addon streams:
nothing came from OpenAI (the addon's own line says what did happen), and each log record is
handed to every addon's add_log hook, a measurable part of a request's CPU. And an asyncio
bug's report of client connections cancelled at exit.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter

MITMPROXY_LOGGER = "mitmproxy.proxy.server"


def _notice(host: str) -> str:
    return f"Streaming response from {host}."  # mitmproxy's wording (proxy/layers/http)


class OwnStreamNotices(logging.Filter):
    """Expected notices by (client address, message): exactly the flows the addon streams,
    not another stream on the same connection or to another host."""

    def __init__(self) -> None:
        super().__init__()
        self.expected: Counter[tuple[object, str]] = Counter()

    def expect(self, client: object, host: str) -> None:
        self.expected[(client, _notice(host))] += 1

    def forget(self, client: object, host: str) -> None:
        """The flow ended; if its notice never came (an error first), stop waiting for it."""
        key = (client, _notice(host))
        if key in self.expected:
            self._take(key)

    def _take(self, key: tuple[object, str]) -> None:
        if self.expected[key] > 1:
            self.expected[key] -= 1
        else:
            del self.expected[key]

    def filter(self, record: logging.LogRecord) -> bool:
        key = (getattr(record, "client", None), record.msg)
        if key in self.expected:
            self._take(key)
            return False
        return True

    def install(self) -> None:
        logging.getLogger(MITMPROXY_LOGGER).addFilter(self)

    def uninstall(self) -> None:
        logging.getLogger(MITMPROXY_LOGGER).removeFilter(self)


class CancelledClientTasks(logging.Filter):
    """Python 3.12.0-3.12.1's asyncio reports a client connection's task cancelled at exit as
    an error ("Exception in callback StreamReaderProtocol.connection_made.<locals>.callback"
    and a CancelledError traceback, one per connection still open when mitmproxy stops);
    later releases check ``task.cancelled()`` first. A cancelled task at exit is the intended
    end of that connection: only exactly that record is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (
            isinstance(exc, asyncio.CancelledError)
            and "StreamReaderProtocol.connection_made.<locals>.callback" in str(record.msg)
        )


def quiet_cancelled_client_tasks() -> None:
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, CancelledClientTasks) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(CancelledClientTasks())
