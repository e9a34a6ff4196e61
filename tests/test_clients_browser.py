"""A real browser against a real mitmdump (reverse mode): Debian's chromium, headless, driven by
puppeteer-core from ``node tests/clients/browser.mjs``. The page is served from another origin
(a small HTTP server on another port) and calls the proxy with ``fetch``, an Authorization
header (so each call is preflighted) and a ReadableStream reader for SSE, as browser chat front
ends do."""

from __future__ import annotations

import base64
import hashlib
import http.server
import re
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from clients.node import run_node
from clients.timing import PACE_S, assert_arrived_as_sent
from conftest import ACCESS_TOKEN
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from fake_poe import FakePoe, Step, json_event, sleep, text
from harness import Mitmdump

CHROMIUM = "/usr/bin/chromium"
FLOW = re.compile(r"^[\d.:\[\]]+: ([A-Z]+) (\S+)")  # mitmdump's line for each flow
PAGE = b"<!doctype html><meta charset=utf-8><title>a chat front end</title><p>client page"

TOOL_CALL = {
    "index": 0,
    "id": "call_t1",
    "type": "function",
    "function": {"name": "get_time", "arguments": '{"city": "Paris"}'},
}
SCRIPTS: dict[str, list[list[Step]]] = {
    "plain": [[text("Hello, browser.")]],
    "stream": [[text("One"), sleep(PACE_S), text(" two"), sleep(PACE_S), text(" three")]],
    "responses_stream": [[text("Uno"), sleep(PACE_S), text(" dos")]],
    "tools": [
        [json_event({"choices": [{"index": 0, "delta": {"tool_calls": [TOOL_CALL]}}]})],
        [text("It is noon in Paris.")],
    ],
    "two_turns": [[text("Hi Ann.")], [text("Ann.")]],
}


class _Page(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/html; charset=utf-8")
        self.send_header("content-length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def page_url() -> Iterator[str]:
    """The front end's own origin: another port than the proxy's."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def spki_hash(ca_file: Path) -> str:
    """Chromium's pin for mitmproxy's key: base64 of the SHA-256 of its SubjectPublicKeyInfo."""
    cert = x509.load_pem_x509_certificate(ca_file.read_bytes())
    der = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


@pytest.fixture(scope="module", params=["reverse", "explicit-proxy"])
def result(
    request: pytest.FixtureRequest,
    page_url: str,
    proxy: Mitmdump,
    proxy_tokens: Mitmdump,
    fake_poe: FakePoe,
) -> dict[str, Any]:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(
            f"{CHROMIUM} is missing: install Debian's chromium ('apt-get update && apt-get "
            "install -y chromium'; .ci/run does it).",
            pytrace=False,
        )
    bots = {name: f"Browser-{name}-{uuid.uuid4().hex[:8]}" for name in SCRIPTS}
    for name, scripts in SCRIPTS.items():
        fake_poe.script_sequence(bots[name], scripts)
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        config = {
            "page": page_url,
            "api": proxy.reverse_url,
            "tokensApi": proxy_tokens.reverse_url,
            "chromium": CHROMIUM,
            "userDataDir": profile,
            "bots": bots,
        }
        if request.param == "explicit-proxy":
            # the browser's proxy setting: the page keeps calling https://api.openai.com
            config |= {
                "api": "https://api.openai.com/v1",
                "proxyServer": f"127.0.0.1:{proxy.proxy_port}",
                "spki": spki_hash(proxy.ca_file),
            }
        before = len(proxy.lines)
        out = run_node("browser.mjs", config, timeout=90)
    out["bots"] = bots
    out["mode"] = request.param
    out["proxy_log"] = proxy.lines[before:]
    return out


def flows(result: dict[str, Any]) -> list[str]:
    """``METHOD URL`` of each flow mitmdump printed while the browser ran."""
    found = (FLOW.match(line) for line in result["proxy_log"])
    return [f"{m[1]} {m[2]}" for m in found if m]


def test_page_is_another_origin(result: dict[str, Any], proxy: Mitmdump) -> None:
    assert result["pageOrigin"] != proxy.reverse_url.removesuffix("/v1")
    assert result["pageOrigin"].startswith("http://127.0.0.1:")
    # nothing but the API calls left the browser (no background calls to Google's hosts)
    hosts = {re.sub(r"^[A-Z]+ (https?://[^/]+).*", r"\1", f) for f in flows(result)}
    assert hosts == {"https://api.openai.com"}, hosts


def test_plain_answer_and_preflight(result: dict[str, Any]) -> None:
    assert result["plain"]["status"] == 200
    assert result["plain"]["body"]["choices"][0]["message"]["content"] == "Hello, browser."
    # the browser asked first (Authorization and JSON are not CORS-safelisted)
    seen = flows(result)
    assert "OPTIONS https://api.openai.com/v1/chat/completions" in seen
    assert "OPTIONS https://api.openai.com/v1/responses" in seen


def test_chat_stream_read_piece_by_piece(result: dict[str, Any]) -> None:
    got = result["stream"]
    assert got["status"] == 200 and got["type"].startswith("text/event-stream")
    assert [d for _, d in got["deltas"]] == ["One", " two", " three"]
    assert got["reads"] >= 3 and got["last"] == "[DONE]"
    assert_arrived_as_sent([t for t, _ in got["deltas"]])


def test_responses_stream_read_piece_by_piece(result: dict[str, Any]) -> None:
    got = result["responses_stream"]
    assert got["status"] == 200
    assert [d for _, d in got["deltas"]] == ["Uno", " dos"]
    assert_arrived_as_sent([t for t, _ in got["deltas"]])
    assert got["types"][0] == "response.created" and got["types"][-1] == "response.completed"


def test_tool_round_trip_by_the_page(result: dict[str, Any], fake_poe: FakePoe) -> None:
    assert result["tools"] == {
        "finish": "tool_calls",
        "calls": ["get_time"],
        "answer": "It is noon in Paris.",
    }
    second = fake_poe.requests_for(result["bots"]["tools"])[1].body
    assert second["tool_results"][0]["content"] == "noon in Paris"


def test_second_turn(result: dict[str, Any], fake_poe: FakePoe) -> None:
    assert result["two_turns"] == {"first": "Hi Ann.", "second": "Ann."}
    query = fake_poe.requests_for(result["bots"]["two_turns"])[1].body["query"]
    assert [m["content"] for m in query] == ["I am Ann.", "Hi Ann.", "My name?"]


def test_error_bodies_readable_cross_origin(result: dict[str, Any]) -> None:
    errors = result["errors"]
    assert errors["401"]["status"] == 401
    assert errors["401"]["body"]["error"]["code"] == "invalid_api_key"
    assert "wrong-token" not in str(errors["401"]["body"]) and ACCESS_TOKEN not in str(errors)
    assert errors["404"]["status"] == 404
    assert errors["404"]["body"]["error"]["code"] == "not_found"
