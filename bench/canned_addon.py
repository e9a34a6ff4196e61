"""The floor: a mitmproxy addon that answers every request itself with a canned response.

    BENCH_CANNED=canned.json mitmdump -s bench/canned_addon.py --set connection_strategy=lazy

``canned.json`` holds ``{"json": {...}, "sse": {...}}``, each ``{"status", "headers", "body"}``
(bench/run.py captures them from the real addon, so both send the same bytes). A request whose
JSON body has ``"stream": true`` gets the SSE one. No loopback hop, no Poe call: what is left
is what mitmproxy charges any addon for one request and its response.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from mitmproxy import http

logger = logging.getLogger(__name__)


class Canned:
    def __init__(self) -> None:
        self.answers: dict[str, dict[str, Any]] = {}

    def running(self) -> None:
        with open(os.environ["BENCH_CANNED"]) as f:
            self.answers = json.load(f)
        # The wording is what tests/harness.py waits for before it reports "started".
        logger.info("poe-openai: answering everything with canned responses (bench floor)")

    def request(self, flow: http.HTTPFlow) -> None:
        try:
            stream = bool(json.loads(flow.request.content or b"{}").get("stream"))
        except (ValueError, AttributeError):
            stream = False
        answer = self.answers["sse" if stream else "json"]
        flow.response = http.Response.make(
            answer["status"], answer["body"].encode(), answer["headers"]
        )


addons = [Canned()]
