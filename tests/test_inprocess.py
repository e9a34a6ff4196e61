"""The in-process path: answers that need no stream are the app's response set in the request
hook (no loopback connection); streams, streamed bodies and HTTP/2 keep the loopback hop. Both
transports give clients the same bytes, and the saved flows the same inspection."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, text
from harness import Mitmdump
from mitmproxy import http
from mitmproxy import io as mitmio
from mitmproxy.test import tutils

from addon.inprocess import needs_stream

USER = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def recorded(fake_poe: FakePoe, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Flows saved (-w) by a proxy with the default transport: non-streamed answers, an
    error, a stream, a streamed body and an HTTP/2 answer, each from its own client."""
    flows = tmp_path_factory.mktemp("inprocess") / "flows.mitm"
    fake_poe.script("InProc-plain", [text("plain answer")])
    fake_poe.script("InProc-streamed", [text("streamed answer")])
    fake_poe.script("InProc-h2", [text("over h2")])
    opts = poe_options(fake_poe, poe_api_key=POE_KEY)
    with Mitmdump(options=opts, extra_args=["-w", str(flows)]) as m, m.http() as client:
        auth = {"authorization": "Bearer sk-client-secret"}
        chat = {"model": "InProc-plain", "messages": USER}
        assert client.post("/v1/chat/completions", json=chat, headers=auth).status_code == 200
        assert client.get("/v1/models", headers=auth).status_code == 200
        assert client.post("/v1/chat/completions", json={}, headers=auth).status_code == 400
        streamed = {"model": "InProc-streamed", "messages": USER, "stream": True}
        r = client.post("/v1/chat/completions", json=streamed, headers=auth)
        assert r.status_code == 200 and "data: [DONE]" in r.text

        def chunks() -> Iterator[bytes]:  # no content-length: the body streams to the app
            yield json.dumps(chat).encode()

        r = client.post("/v1/chat/completions", content=chunks(), headers=auth)
        assert r.status_code == 200 and "plain answer" in r.text
        h2 = json.dumps({"model": "InProc-h2", "messages": USER})
        out = subprocess.run(
            [
                *("curl", "-s", "--http2", "-x", m.proxy_url, "--cacert", str(m.ca_file)),
                *("-H", "authorization: Bearer sk-client-secret"),
                *("-H", "content-type: application/json"),
                *("-d", h2, "-w", "\nhttp_version=%{http_version}"),
                "https://api.openai.com/v1/chat/completions",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout
        assert "over h2" in out and "http_version=2" in out
    yield flows


def saved(flows: Path) -> list[http.HTTPFlow]:
    with flows.open("rb") as f:
        return [flow for flow in mitmio.FlowReader(f).stream() if isinstance(flow, http.HTTPFlow)]


def test_answers_that_need_no_stream_open_no_loopback_connection(recorded: Path) -> None:
    flows = saved(recorded)
    assert [f.request.path for f in flows] == ["/v1/chat/completions", "/v1/models"] + [
        "/v1/chat/completions"
    ] * 4
    plain, models, refused, streamed, streamed_body, h2 = flows
    for flow in (plain, models, refused):  # answered in the request hook
        assert flow.server_conn.peername is None and flow.server_conn.timestamp_start is None
    for flow in (streamed, streamed_body, h2):  # over the hop, to the loopback app
        assert flow.server_conn.peername is not None
        assert flow.server_conn.peername[0] == "127.0.0.1"
    assert h2.request.http_version == "HTTP/2.0"


def test_in_process_flows_show_the_openai_url_redacted_with_their_comment(
    recorded: Path,
) -> None:
    plain, models, refused, *_ = saved(recorded)
    for flow in (plain, models, refused):
        assert flow.request.pretty_url.startswith("https://api.openai.com/v1/")
        assert flow.request.headers["authorization"].startswith("Bearer [redacted ")
        assert "x-poe-openai-route" not in flow.request.headers
        assert flow.marked
    assert b"sk-client-secret" not in recorded.read_bytes()
    assert plain.comment.startswith("Poe bot InProc-plain") and "key#" in plain.comment
    assert json.loads(plain.response.content)["choices"][0]["message"]["content"] == (
        "plain answer"
    )
    assert plain.response.headers["content-type"] == "application/json"
    assert json.loads(refused.response.content)["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("body", "streamed"),
    [
        (b'{"model": "m", "stream": true}', True),
        (b'{"model":"m","stream":true}', True),
        (b'{"model": "m", "stream" :\n true}', True),
        (b'{"model": "m", "stream": false}', False),
        (b'{"model": "m"}', False),
        (b"", False),
        # inside a message's text the quotes are escaped: not the request's own field
        (b'{"messages": [{"content": "say \\"stream\\": true"}]}', False),
    ],
)
def test_which_requests_need_a_stream(body: bytes, streamed: bool) -> None:
    request = tutils.treq(method=b"POST", content=body)
    assert needs_stream(request) is streamed


def test_bodies_that_stream_and_http2_need_the_hop() -> None:
    request = tutils.treq(method=b"GET", content=b"")
    assert not needs_stream(request)
    request.stream = True
    assert needs_stream(request)
    request = tutils.treq(method=b"GET", content=b"", http_version=b"HTTP/2.0")
    assert needs_stream(request)


@pytest.fixture(scope="module")
def both(fake_poe: FakePoe) -> Iterator[tuple[Mitmdump, Mitmdump]]:
    base = poe_options(fake_poe, poe_api_key=POE_KEY)
    with (
        Mitmdump(options=base, regular=False) as in_process,
        Mitmdump(options={**base, "poe_in_process": "false"}, regular=False) as loopback,
    ):
        yield in_process, loopback


@pytest.mark.parametrize(
    ("method", "path", "body", "headers"),
    [
        ("GET", "/v1/models", None, {}),
        ("GET", "/v1/models/gpt-4o", None, {}),
        ("GET", "/v1/embeddings", None, {}),
        ("HEAD", "/v1/models", None, {}),
        ("POST", "/v1/chat/completions", b"{not json", {"content-type": "application/json"}),
        ("POST", "/v1/chat/completions", b'{"model": "x"}', {}),
        ("DELETE", "/v1/responses/resp_nothing", None, {}),
        ("OPTIONS", "/v1/chat/completions", None, {"origin": "https://app.example"}),
        (
            "OPTIONS",
            "/v1/models",
            None,
            {"origin": "https://a.example", "access-control-request-method": "POST"},
        ),
        ("GET", "/v1/models", None, {"origin": "https://app.example"}),
    ],
)
def test_both_transports_answer_the_same_bytes(
    both: tuple[Mitmdump, Mitmdump],
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
) -> None:
    answers = []
    for proxy in both:
        with proxy.http() as client:
            r = client.request(method, path, content=body, headers=headers)
            answers.append(
                (r.status_code, r.reason_phrase, list(r.headers.multi_items()), r.content)
            )
    assert answers[0] == answers[1]


def test_a_chat_answer_is_the_same_on_both_transports(
    both: tuple[Mitmdump, Mitmdump], fake_poe: FakePoe
) -> None:
    fake_poe.script("InProc-same", [text("same "), text("answer")])
    answers = []
    for proxy in both:
        with proxy.http() as client:
            r = client.post("/v1/chat/completions", json={"model": "InProc-same", "messages": USER})
            answer = r.json()
            answer["id"] = answer["created"] = None
            answers.append((r.status_code, sorted(r.headers.keys()), answer))
    assert answers[0] == answers[1]
    assert answers[0][2]["choices"][0]["message"]["content"] == "same answer"
