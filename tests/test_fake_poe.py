"""Self-tests for the test infrastructure: FakePoe (driven by the real fastapi-poe client)
and openapi_schema.validate."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import jsonschema
import pytest
from fake_poe import (
    FakePoe,
    cut,
    echo,
    error,
    file,
    http_error,
    json_event,
    meta,
    no_done,
    raw,
    replace,
    sleep,
    suggested,
    text,
)
from fastapi_poe.client import (
    PROTOCOL_VERSION,
    AttachmentUploadError,
    BotError,
    BotErrorNoRetry,
    stream_request_base,
    upload_file,
)
from fastapi_poe.types import MetaResponse, PartialResponse, ProtocolMessage, QueryRequest
from openapi_schema import validate

KEY = "poe-test-key"
ResponseHook = Callable[[httpx.Response], Awaitable[None]]


def make_query(content: str = "hello there") -> QueryRequest:
    return QueryRequest(
        version=PROTOCOL_VERSION,
        type="query",
        query=[ProtocolMessage(role="user", content=content)],
        user_id="",
        conversation_id="",
        message_id="",
    )


class Client:
    """Runs the real fastapi-poe client against the fake; remembers response statuses."""

    def __init__(self, fake: FakePoe, api_key: str = KEY) -> None:
        self.fake = fake
        self.api_key = api_key
        self.responses: list[tuple[int, httpx.Headers]] = []
        self.errors: list[Exception] = []

    async def _hook(self, response: httpx.Response) -> None:
        self.responses.append((response.status_code, response.headers))

    def session(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(timeout=10, event_hooks={"response": [self._hook]})

    async def acollect(
        self, bot: str, content: str = "hello there", num_tries: int = 1
    ) -> list[PartialResponse]:
        async with self.session() as session:
            return [
                msg
                async for msg in stream_request_base(
                    request=make_query(content),
                    bot_name=bot,
                    api_key=self.api_key,
                    session=session,
                    base_url=self.fake.base_url,
                    num_tries=num_tries,
                    retry_sleep_time=0,
                    on_error=lambda e, _msg: self.errors.append(e),
                )
            ]

    def collect(
        self, bot: str, content: str = "hello there", num_tries: int = 1
    ) -> list[PartialResponse]:
        return asyncio.run(self.acollect(bot, content, num_tries))


def texts(msgs: list[PartialResponse]) -> list[str]:
    return [m.text for m in msgs if not isinstance(m, MetaResponse) and m.text]


# --------------------------------------------------------------------------- events


def test_text_and_done(fake_poe: FakePoe) -> None:
    fake_poe.script("t-text", [text("Hello"), text(", world")])
    msgs = Client(fake_poe).collect("t-text", "hi")
    assert texts(msgs) == ["Hello", ", world"]
    [rec] = fake_poe.requests_for("t-text")
    assert rec.api_key == KEY
    assert rec.query is not None and rec.query.query[-1].content == "hi"
    assert rec.body["type"] == "query" and rec.body["query"][0]["content"] == "hi"
    assert rec.events_sent == 3  # two texts + done
    assert rec.finished is not None and rec.disconnected is None
    assert rec.status == 200 and not rec.invalid
    assert fake_poe.reports_for("t-text") == []


def test_every_event_kind_as_parsed_by_client(fake_poe: FakePoe) -> None:
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": None}],
    }
    fake_poe.script(
        "t-kinds",
        [
            meta(content_type="text/plain", linkify=True, suggested_replies=True),
            text("draft"),
            replace("final"),
            file("https://f.test/a.png", "image/png", "a.png", inline_ref="r1"),
            json_event(chunk),
            suggested("Tell me more"),
        ],
    )
    msgs = Client(fake_poe).collect("t-kinds")
    m_meta, m_draft, m_final, m_file, m_json, m_sugg = msgs
    assert isinstance(m_meta, MetaResponse)
    assert m_meta.content_type == "text/plain" and m_meta.linkify and m_meta.suggested_replies
    assert m_draft.text == "draft" and not m_draft.is_replace_response
    assert m_final.text == "final" and m_final.is_replace_response
    assert m_file.attachment is not None
    assert m_file.attachment.url == "https://f.test/a.png"
    assert m_file.attachment.content_type == "image/png"
    assert m_file.attachment.name == "a.png" and m_file.attachment.inline_ref == "r1"
    assert m_json.data == chunk
    assert m_sugg.is_suggested_reply and m_sugg.text == "Tell me more"


def test_meta_is_ignored_unless_first(fake_poe: FakePoe) -> None:
    fake_poe.script("t-late-meta", [text("a"), meta(content_type="text/plain")])
    msgs = Client(fake_poe).collect("t-late-meta")
    assert not any(isinstance(m, MetaResponse) for m in msgs)
    assert texts(msgs) == ["a"]


def test_echo(fake_poe: FakePoe) -> None:
    fake_poe.script("t-echo", [echo()])
    assert texts(Client(fake_poe).collect("t-echo", "ping 123")) == ["ping 123"]


def test_no_text_makes_client_report_error(fake_poe: FakePoe) -> None:
    fake_poe.script("t-json-only", [json_event({"choices": []})])
    msgs = Client(fake_poe).collect("t-json-only")
    assert [m.data for m in msgs] == [{"choices": []}]
    [report] = fake_poe.reports_for("t-json-only")
    assert report["type"] == "report_error"
    assert report["message"] == "Bot returned no text in response"
    assert fake_poe.requests_for("t-json-only")[0].status == 200  # reports are not requests


def test_no_done_makes_client_report_error(fake_poe: FakePoe) -> None:
    fake_poe.script("t-nodone", [text("partial"), no_done()])
    msgs = Client(fake_poe).collect("t-nodone")
    assert texts(msgs) == ["partial"]
    [report] = fake_poe.reports_for("t-nodone")
    assert report["message"] == "Bot exited without sending 'done' event"
    assert report["version"] == PROTOCOL_VERSION
    assert len(fake_poe.requests_for("t-nodone")) == 1


# --------------------------------------------------------------------------- errors


def test_error_event_no_retry(fake_poe: FakePoe) -> None:
    fake_poe.script("t-err", [text("a"), error("overloaded", error_type="insufficient_fund")])
    got: list[PartialResponse] = []

    async def run() -> None:
        client = Client(fake_poe)
        async with client.session() as session:
            async for msg in stream_request_base(
                request=make_query(),
                bot_name="t-err",
                api_key=KEY,
                session=session,
                base_url=fake_poe.base_url,
                num_tries=1,
            ):
                got.append(msg)

    with pytest.raises(BotErrorNoRetry) as info:
        asyncio.run(run())
    assert texts(got) == ["a"]
    assert '"overloaded"' in str(info.value) and "insufficient_fund" in str(info.value)


def test_error_event_retryable(fake_poe: FakePoe) -> None:
    fake_poe.script("t-err-retry", [error("try later", allow_retry=True)])
    with pytest.raises(BotError) as info:
        Client(fake_poe).collect("t-err-retry")
    assert not isinstance(info.value, BotErrorNoRetry)
    assert "try later" in str(info.value)


def test_http_error_429_visible_to_event_hook(fake_poe: FakePoe) -> None:
    fake_poe.script(
        "t-429",
        [http_error(429, {"detail": "rate limited"}, {"Retry-After": "7"})],
    )
    client = Client(fake_poe)
    with pytest.raises(BotError):
        client.collect("t-429")
    [(status, headers)] = client.responses
    assert status == 429 and headers["retry-after"] == "7"
    assert headers["content-type"] == "application/json"
    assert fake_poe.requests_for("t-429")[0].status == 429

    r = httpx.post(
        fake_poe.base_url + "t-429",
        json=make_query().model_dump(),
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 429 and r.json() == {"detail": "rate limited"}


def test_http_error_text_body(fake_poe: FakePoe) -> None:
    fake_poe.script("t-502", [http_error(502, "bad gateway")])
    r = httpx.post(
        fake_poe.base_url + "t-502",
        json=make_query().model_dump(),
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 502 and r.text == "bad gateway"


def test_bad_key_401(fake_poe: FakePoe) -> None:
    fake_poe.script("t-auth", [text("secret")])
    client = Client(fake_poe, api_key="wrong")
    with pytest.raises(BotError):
        client.collect("t-auth")
    assert [s for s, _ in client.responses] == [401]
    [rec] = fake_poe.requests_for("t-auth")
    assert rec.api_key == "wrong" and rec.status == 401 and rec.events_sent == 0

    r = httpx.post(
        fake_poe.base_url + "t-auth",
        json=make_query().model_dump(),
        headers={"Authorization": "Bearer wrong"},
    )
    assert r.status_code == 401 and r.json() == {"detail": "Invalid API key"}
    assert r.headers["content-type"] == "application/json"


def test_any_key_when_no_keys_configured() -> None:
    with FakePoe(api_keys=()) as fake:
        fake.script("open", [text("ok")])
        assert texts(Client(fake, api_key="anything").collect("open")) == ["ok"]


def test_unscripted_bot_404(fake_poe: FakePoe) -> None:
    client = Client(fake_poe)
    with pytest.raises(BotError):
        client.collect("t-nobody")
    assert [s for s, _ in client.responses] == [404]
    r = httpx.post(
        fake_poe.base_url + "t-nobody",
        json=make_query().model_dump(),
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 404 and r.json() == {"detail": "Bot not found"}


def test_invalid_query_400(fake_poe: FakePoe) -> None:
    fake_poe.script("t-invalid", [text("x")])
    r = httpx.post(
        fake_poe.base_url + "t-invalid",
        json={"type": "query", "version": "1.2"},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400
    [rec] = fake_poe.requests_for("t-invalid")
    assert rec.invalid and rec.query is None and rec.status == 400


def test_cut_fails_client(fake_poe: FakePoe) -> None:
    fake_poe.script("t-cut", [text("half"), cut()])
    client = Client(fake_poe)
    with pytest.raises(BotError) as info:
        client.collect("t-cut")
    assert isinstance(info.value.__cause__, httpx.RemoteProtocolError)
    assert isinstance(client.errors[0], httpx.RemoteProtocolError)
    [rec] = fake_poe.requests_for("t-cut")
    assert rec.finished is None and rec.events_sent == 1
    assert fake_poe.reports_for("t-cut") == []  # not a clean end


def test_cut_is_retried_after_partial_output(fake_poe: FakePoe) -> None:
    # Documents client behaviour: RemoteProtocolError is retried even after yielding text.
    fake_poe.script_sequence("t-cut-retry", [[text("one"), cut()], [text("two")]])
    msgs = Client(fake_poe).collect("t-cut-retry", num_tries=2)
    assert texts(msgs) == ["one", "two"]
    assert len(fake_poe.requests_for("t-cut-retry")) == 2


def test_raw_malformed_sse(fake_poe: FakePoe) -> None:
    fake_poe.script("t-raw", [raw("event: text\ndata: {not json\n\n")])
    with pytest.raises(BotErrorNoRetry, match="Invalid JSON"):
        Client(fake_poe).collect("t-raw")
    [report] = fake_poe.reports_for("t-raw")
    assert report["message"] == "Invalid JSON in 'text' event"


def test_client_going_away_is_recorded(fake_poe: FakePoe) -> None:
    fake_poe.script("t-leave", [text("first"), sleep(3), text("never")])
    closed_at: list[float] = []

    async def run() -> None:
        async with httpx.AsyncClient(timeout=10) as session:
            gen = stream_request_base(
                request=make_query(),
                bot_name="t-leave",
                api_key=KEY,
                session=session,
                base_url=fake_poe.base_url,
                num_tries=1,
            )
            async for msg in gen:
                assert msg.text == "first"
                break
            await gen.aclose()  # closes the httpx response mid-stream
            closed_at.append(time.monotonic())

    asyncio.run(run())
    [rec] = fake_poe.requests_for("t-leave")
    assert fake_poe.wait_for(lambda: rec.disconnected is not None, timeout=0.5)
    assert rec.disconnected is not None and rec.disconnected - closed_at[0] < 0.5
    assert rec.finished is None and rec.events_sent == 1


def test_rescript_and_clear() -> None:
    with FakePoe() as fake:
        fake.script("b", [text("1")])
        assert texts(Client(fake).collect("b")) == ["1"]
        fake.script("b", [text("2")])
        assert texts(Client(fake).collect("b")) == ["2"]
        assert len(fake.requests) == 2
        fake.clear()
        assert fake.requests == [] and fake.uploads == [] and fake.reports == []
    with pytest.raises(ValueError):
        fake.script("b", [text("x"), http_error(500, "no")])
    with pytest.raises(ValueError):
        fake.script("b", [cut(), text("x")])


# --------------------------------------------------------------------------- uploads


def test_upload_bytes(fake_poe: FakePoe) -> None:
    att = asyncio.run(
        upload_file(
            file=b"hello",
            file_name="hello.txt",
            api_key=KEY,
            base_url=fake_poe.upload_url,
            num_tries=1,
        )
    )
    digest = hashlib.sha256(b"hello").hexdigest()[:16]
    assert att.url == f"https://fake-poe.test/att/{digest}/hello.txt"
    assert att.content_type == "text/plain" and att.name == "hello.txt"
    up = fake_poe.uploads[-1]
    assert (up.api_key, up.filename, up.content_type, up.data, up.download_url) == (
        KEY,
        "hello.txt",
        "text/plain",
        b"hello",
        None,
    )


def test_upload_url(fake_poe: FakePoe) -> None:
    url = "https://example.com/pics/cat.png"
    att = asyncio.run(
        upload_file(file_url=url, api_key=KEY, base_url=fake_poe.upload_url, num_tries=1)
    )
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    assert att.url == f"https://fake-poe.test/att/{digest}/cat.png"
    assert att.content_type == "image/png"
    up = fake_poe.uploads[-1]
    assert up.download_url == url and up.data is None and up.api_key == KEY


def test_upload_bad_key(fake_poe: FakePoe) -> None:
    errors: list[Exception] = []
    with pytest.raises(AttachmentUploadError, match="401"):
        asyncio.run(
            upload_file(
                file=b"x",
                file_name="x.bin",
                api_key="nope",
                base_url=fake_poe.upload_url,
                num_tries=1,
                on_error=lambda e, _m: errors.append(e),
            )
        )
    assert fake_poe.uploads[-1].status == 401


# --------------------------------------------------------------------------- openapi schema

CHAT_COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1700000000,
    "model": "gpt-4o",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi!", "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        }
    ],
    "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
}


def test_schema_valid_chat_completion() -> None:
    validate(CHAT_COMPLETION, "CreateChatCompletionResponse")


def test_schema_missing_choices_fails() -> None:
    bad = copy.deepcopy(CHAT_COMPLETION)
    del bad["choices"]
    with pytest.raises(jsonschema.ValidationError, match="'choices' is a required property"):
        validate(bad, "CreateChatCompletionResponse")


def test_schema_stream_chunk_with_nulls() -> None:
    chunk = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o",
        "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}],
        "usage": None,
    }
    validate(chunk, "CreateChatCompletionStreamResponse")
    chunk["choices"][0]["finish_reason"] = "done"  # type: ignore[index]
    with pytest.raises(jsonschema.ValidationError, match=r"\$\.choices\[0\]\.finish_reason"):
        validate(chunk, "CreateChatCompletionStreamResponse")


def test_schema_error_envelope_and_models() -> None:
    validate(
        {
            "error": {
                "message": "nope",
                "type": "invalid_request_error",
                "param": None,
                "code": "model_not_found",
            }
        },
        "ErrorResponse",
    )
    validate(
        {
            "object": "list",
            "data": [{"id": "GPT-4o", "object": "model", "created": 0, "owned_by": "poe"}],
        },
        "ListModelsResponse",
    )
    with pytest.raises(KeyError):
        validate({}, "NoSuchSchema")
