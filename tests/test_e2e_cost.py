"""Cost per request: for each outcome (an answer, each error kind, a client that leaves), how
many Poe queries and uploads one call of the official openai SDK makes, with its DEFAULT retries
(two, on 408/409/429/5xx unless the answer says ``x-should-retry: false``). Counted at the
stand-in Poe server; the README's "Errors" section states the same numbers.

An error whose retry would spend points again for the same outcome (the bot answered, and
asked again it answers the same way) must say ``x-should-retry: false``: 1 query. Errors where
Poe did not answer (5xx, a cut connection, no first event in time, a rate limit) are worth the
SDK's retries: 3 queries.
"""

from __future__ import annotations

import base64
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import openai
import pytest
from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, Step, cut, error, file, http_error, sleep, text
from harness import Mitmdump

USER = [{"role": "user", "content": "hi"}]
TIMEOUTS = {
    "poe_first_event_timeout_s": "1",
    "poe_idle_timeout_s": "1",
    "poe_total_timeout_s": "2",
    "poe_header_hold_s": "1",
}


def sdk(m: Mitmdump, key: str = POE_KEY) -> openai.OpenAI:
    """The SDK as users run it: default retries (no max_retries given)."""
    return openai.OpenAI(
        api_key=key, base_url=m.reverse_url, http_client=httpx.Client(trust_env=False, timeout=30)
    )


def picture() -> str:
    """A data URL of bytes no other test sends, so its uploads can be counted."""
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(32)
    return "data:image/png;base64," + base64.b64encode(data).decode()


Call = Callable[[openai.OpenAI, str], Any]


def chat(**extra: Any) -> Call:
    return lambda client, bot: client.chat.completions.create(model=bot, messages=USER, **extra)


def chat_with_picture(client: openai.OpenAI, bot: str) -> Any:
    content = [{"type": "text", "text": "what is it?"}]
    content.append({"type": "image_url", "image_url": {"url": picture()}})  # type: ignore[dict-item]
    return client.chat.completions.create(
        model=bot,
        messages=[{"role": "user", "content": content}],  # type: ignore[list-item,misc]
    )


def streamed_failure(client: openai.OpenAI, bot: str) -> Any:
    for _ in client.chat.completions.create(model=bot, messages=USER, stream=True):
        pass


def leaves_after_first_chunk(client: openai.OpenAI, bot: str) -> Any:
    stream = client.chat.completions.create(model=bot, messages=USER, stream=True)
    next(iter(stream))
    stream.close()  # the client leaves; nothing is retried


@dataclass
class Outcome:
    script: list[Step] | None  # None: the bot does not exist at Poe (404)
    call: Call
    queries: int  # Poe queries the one SDK call causes
    error: type[Exception] | None = None  # the SDK's exception, None for an answer
    uploads: int = 0
    status: int | None = None
    code: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def image(response_format: str = "url") -> Call:
    return lambda client, bot: client.images.generate(
        model=bot,
        prompt="a cat",
        response_format=response_format,  # type: ignore[arg-type]
    )


# fmt: off
OUTCOMES: dict[str, Outcome] = {
    "answer": Outcome([text("ok")], chat(), 1),
    "answer with a picture": Outcome([text("a cat")], chat_with_picture, 1, uploads=1),
    "bad request": Outcome([text("ok")], chat(temperature=7), 0, openai.BadRequestError),
    "unknown bot (Poe 404)": Outcome(None, chat(), 1, openai.NotFoundError),
    "Poe HTTP 500": Outcome(
        [http_error(500, {"detail": "boom"})], chat(), 3, openai.InternalServerError,
        status=502, code="poe_error"),
    "Poe HTTP 500, with a picture": Outcome(
        [http_error(500, {"detail": "boom"})], chat_with_picture, 3,
        openai.InternalServerError, uploads=1, status=502),
    "Poe HTTP 500, legacy completions": Outcome(
        [http_error(500, {"detail": "boom"})],
        lambda client, bot: client.completions.create(model=bot, prompt="hi"), 3,
        openai.InternalServerError, status=502),
    "Poe HTTP 500, Responses": Outcome(
        [http_error(500, {"detail": "boom"})],
        lambda client, bot: client.responses.create(model=bot, input="hi"), 3,
        openai.InternalServerError, status=502),
    "cut connection": Outcome(
        [cut()], chat(), 3, openai.InternalServerError, status=502, code="poe_unreachable"),
    "bot error, retry allowed": Outcome(
        [error("Internal server error", allow_retry=True)], chat(), 3,
        openai.InternalServerError, status=502, code="poe_error"),
    "bot error, no retry": Outcome(
        [error("The bot failed.", allow_retry=False)], chat(), 1, openai.InternalServerError,
        status=502, code="poe_error"),
    "message too long": Outcome(
        [error("too long", error_type="user_message_too_long")], chat(), 1,
        openai.BadRequestError),
    "out of points (in-band)": Outcome(
        [error("out of points", error_type="insufficient_fund")], chat(), 1,
        openai.RateLimitError, code="insufficient_quota"),
    "out of points (HTTP 402)": Outcome(
        [http_error(402, {"detail": "no points"})], chat(), 1, openai.RateLimitError,
        code="insufficient_quota"),
    "rate limit (HTTP 429, Retry-After 1)": Outcome(
        [http_error(429, {"detail": "slow"}, {"Retry-After": "1"})], chat(), 3,
        openai.RateLimitError, code="rate_limit_exceeded"),
    "client key rejected (HTTP 401)": Outcome(
        [text("never: the key is refused first")], chat(), 1, openai.AuthenticationError,
        extra={"key": "poe-key-poe-does-not-know"}),
    "invalid JSON for json_object": Outcome(
        [text("not json at all")], chat(response_format={"type": "json_object"}), 1,
        openai.InternalServerError, status=502, code="invalid_json_output"),
    "invalid JSON for json_object, Responses": Outcome(
        [text("not json at all")],
        lambda client, bot: client.responses.create(
            model=bot, input="hi", text={"format": {"type": "json_object"}}),
        1, openai.InternalServerError, status=502, code="invalid_json_output"),
    "image bot answers text": Outcome(
        [text("I only write words.")], image(), 1, openai.InternalServerError, status=502,
        code="no_image"),
    "image bot answers text, b64_json": Outcome(
        [text("I only write words.")], image("b64_json"), 1, openai.InternalServerError,
        status=502, code="no_image"),
    "image file cannot be fetched": Outcome(
        [file("http://127.0.0.1:9/gone.png", "image/png", "gone.png")], image("b64_json"),
        1, openai.InternalServerError, status=502),
    "no first event in time": Outcome(
        [sleep(1.5), text("late")], chat(), 3, openai.APIStatusError, status=504,
        code="timeout"),
    "silence mid-answer": Outcome(
        [text("a"), sleep(1.5), text("b")], chat(), 3, openai.APIStatusError, status=504,
        code="timeout"),
    "whole-answer cap": Outcome(
        [text("a"), *[s for _ in range(5) for s in (sleep(0.6), text("."))]], chat(), 1,
        openai.APIStatusError, status=504, code="timeout"),
    "failure after streaming began": Outcome(
        [text("partial"), error("The bot failed.", allow_retry=True)], streamed_failure, 1,
        openai.APIError),
    "client leaves mid-stream": Outcome(
        [text("first"), sleep(2), text("never read")], leaves_after_first_chunk, 1),
}
# fmt: on


@pytest.fixture(scope="module")
def passthrough(fake_poe: FakePoe) -> Iterator[Mitmdump]:
    with Mitmdump(options=poe_options(fake_poe, **TIMEOUTS), regular=False) as m:
        yield m


def queries_and_uploads(fake: FakePoe, bot: str, marker: int) -> tuple[int, int]:
    uploads = [u for u in fake.uploads[marker:] if u.data is not None]
    return len(fake.requests_for(bot)), len(uploads)


def run(m: Mitmdump, fake: FakePoe, outcome: Outcome) -> None:
    bot = "Cost-" + uuid.uuid4().hex[:10]
    if outcome.script is not None:
        fake.script(bot, outcome.script)
    marker = len(fake.uploads)
    client = sdk(m, outcome.extra.get("key", POE_KEY))
    if outcome.error is None:
        outcome.call(client, bot)
    else:
        with pytest.raises(outcome.error) as info:
            outcome.call(client, bot)
        if isinstance(info.value, openai.APIStatusError):
            if outcome.status is not None:
                assert info.value.status_code == outcome.status, info.value
            if outcome.code is not None:
                assert info.value.code == outcome.code, info.value
            status = info.value.status_code
            retried_kind = status in (408, 409, 429) or status >= 500
            if retried_kind:  # what the SDK would retry is marked when a retry is waste
                should_retry = info.value.response.headers.get("x-should-retry")
                assert (should_retry == "false") == (outcome.queries == 1), should_retry
    # The stand-in records a query as it arrives; the client has its answer by now.
    queries, uploads = queries_and_uploads(fake, bot, marker)
    assert (queries, uploads) == (outcome.queries, outcome.uploads)


@pytest.mark.parametrize("name", list(OUTCOMES))
def test_cost_per_request(passthrough: Mitmdump, fake_poe: FakePoe, name: str) -> None:
    run(passthrough, fake_poe, OUTCOMES[name])


# With a configured key the pool keeps state: each row gets its own proxy.
CONFIGURED: dict[str, Outcome] = {
    "configured key rejected (HTTP 401)": Outcome(
        [text("never")], chat(), 1, openai.InternalServerError, status=502, code="poe_key_rejected"
    ),
    "configured key out of points (HTTP 402)": Outcome(
        [http_error(402, {"detail": "no points"})],
        chat(),
        1,
        openai.RateLimitError,
        code="insufficient_quota",
    ),
    "configured key rate-limited (HTTP 429, Retry-After 1)": Outcome(
        [http_error(429, {"detail": "slow"}, {"Retry-After": "1"})],
        chat(),
        3,
        openai.RateLimitError,
        code="rate_limit_exceeded",
    ),
}


@pytest.mark.parametrize("name", list(CONFIGURED))
def test_cost_per_request_with_a_configured_key(fake_poe: FakePoe, name: str) -> None:
    key = "poe-key-poe-does-not-know" if "rejected" in name else POE_KEY
    opts = poe_options(fake_poe, poe_api_key=key, **TIMEOUTS)
    with Mitmdump(options=opts, regular=False) as m:
        run(m, fake_poe, CONFIGURED[name])


@pytest.mark.parametrize("endpoint", ["images", "chat", "completions"])
def test_n_choices_are_n_conversations(
    passthrough: Mitmdump, fake_poe: FakePoe, bot: str, endpoint: str
) -> None:
    """n choices cost n queries, each its own conversation (own message and conversation
    ids): the same ids n times would be one conversation to Poe, answered n times over."""
    fake_poe.script(bot, [file("https://pfst.test/cat.png", "image/png", "cat.png")])
    client = sdk(passthrough)
    if endpoint == "images":
        result = client.images.generate(model=bot, prompt="a cat", n=3)
        assert len(result.data or []) == 3
    elif endpoint == "chat":
        assert len(client.chat.completions.create(model=bot, messages=USER, n=3).choices) == 3
    else:
        assert len(client.completions.create(model=bot, prompt="hi", n=3).choices) == 3
    queries = [q.query for q in fake_poe.requests_for(bot)]
    assert len(queries) == 3 and all(q is not None for q in queries)
    assert len({q.message_id for q in queries if q}) == 3
    assert len({q.conversation_id for q in queries if q}) == 3


def test_a_proxy_side_failure_after_the_answer_is_not_paid_for_again(
    passthrough: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    """Whatever goes wrong in the proxy after Poe answered (here: counting the tokens of a
    1.2 MB message, which the token counter refused at the time of writing), the SDK must not
    send the request again: a 500 says x-should-retry: false. One query either way."""
    fake_poe.script(bot, [text("ok")])
    client = sdk(passthrough)
    long = [{"role": "user", "content": "a" * 1_200_000}]
    try:
        client.chat.completions.create(model=bot, messages=long)  # type: ignore[arg-type]
    except openai.InternalServerError as e:
        assert e.status_code == 500 and e.response.headers["x-should-retry"] == "false"
    assert len(fake_poe.requests_for(bot)) == 1
