"""Drops mitmproxy's "Streaming response from api.openai.com." line for answers the addon
streams: nothing came from OpenAI (the addon's own line says what did happen), and each log
record is handed to every addon's add_log hook, a measurable part of a request's CPU."""

from __future__ import annotations

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
