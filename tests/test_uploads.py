"""Ownership of shared work: what is de-duplicated or cached across requests (uploads, stored
responses, Poe connections) with two callers that use different keys, one of which fails or
leaves. And cancellation: one caller leaving never cancels another's work, and a caller's own
cancellation is never swallowed.

The upload tests drive the real PoeClient against the stand-in Poe server (whose uploads can be
made slow, so that they overlap); the rest go through a real mitmdump in pass-through mode,
where each client's key is its own Poe key.
"""

from __future__ import annotations

import asyncio
import base64
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import httpx
import openai
import pytest
from conftest import POE_KEY
from fake_poe import FakePoe, sleep, text
from harness import Mitmdump

from addon.files import FileInput
from addon.pacing import with_ticks
from addon.poe import PoeClient, PoeError
from addon.responses import ResponseStore
from addon.service import Service, owner_of

SECOND = "poe-second-key"
UNKNOWN = "poe-key-poe-does-not-know"  # the stand-in rejects it (401)


def new_file() -> FileInput:
    return FileInput("cat.png", "image/png", data=b"\x89PNG" + os.urandom(16))


@pytest.fixture
def slow_uploads(fake_poe: FakePoe) -> Iterator[FakePoe]:
    fake_poe.upload_delay = 0.5
    try:
        yield fake_poe
    finally:
        fake_poe.upload_delay = 0.0


def uploads_of(fake: FakePoe, file: FileInput) -> list[Any]:
    return [u for u in fake.uploads if u.data == file.data]


async def with_client(fake: FakePoe, body: Any) -> Any:
    client = PoeClient(fake.base_url, upload_url=fake.upload_url)
    try:
        return await body(client)
    finally:
        await client.aclose()


# --- uploads ----------------------------------------------------------------------------------


def test_one_upload_per_key_and_file(slow_uploads: FakePoe) -> None:
    """Callers with the same key share one upload (in flight, then cached); another key gets
    its own: a key never uses an attachment made with another."""
    file = new_file()

    async def body(client: PoeClient) -> None:
        a, b = await asyncio.gather(client.upload(file, POE_KEY), client.upload(file, POE_KEY))
        assert a == b
        assert await client.upload(file, POE_KEY) == a  # cached
        await client.upload(file, SECOND)
        await client.upload(file, SECOND)

    asyncio.run(with_client(slow_uploads, body))
    assert [u.api_key for u in uploads_of(slow_uploads, file)] == [POE_KEY, SECOND]


def test_a_rejected_key_does_not_fail_another_keys_upload(slow_uploads: FakePoe) -> None:
    """A's key is rejected while B waits for the same file: B gets its own upload, made with
    its own key, and A's failure stays A's."""
    file = new_file()

    async def body(client: PoeClient) -> list[Any]:
        first = asyncio.create_task(client.upload(file, UNKNOWN))
        await asyncio.sleep(0.1)  # A's upload is under way when B asks
        second = asyncio.create_task(client.upload(file, POE_KEY))
        return await asyncio.gather(first, second, return_exceptions=True)

    failed, attachment = asyncio.run(with_client(slow_uploads, body))
    assert isinstance(failed, PoeError) and failed.failure.status == 401
    assert not isinstance(attachment, BaseException), attachment
    assert attachment.url.startswith("https://fake-poe.test/att/")
    assert [u.api_key for u in uploads_of(slow_uploads, file)] == [UNKNOWN, POE_KEY]


def test_one_caller_leaving_does_not_cancel_anothers_upload(slow_uploads: FakePoe) -> None:
    file = new_file()

    async def body(client: PoeClient) -> Any:
        leaving = asyncio.create_task(client.upload(file, POE_KEY))
        await asyncio.sleep(0.1)
        staying = asyncio.create_task(client.upload(file, POE_KEY))
        await asyncio.sleep(0.1)
        leaving.cancel()
        attachment = await staying  # not cancelled with the one that left
        assert leaving.cancelled()
        return attachment

    attachment = asyncio.run(with_client(slow_uploads, body))
    assert attachment.url.startswith("https://fake-poe.test/att/")
    assert [u.status for u in uploads_of(slow_uploads, file)] == [200]  # one upload, finished


def test_the_last_caller_leaving_stops_the_upload(slow_uploads: FakePoe) -> None:
    file = new_file()

    async def body(client: PoeClient) -> None:
        callers = [asyncio.create_task(client.upload(file, POE_KEY)) for _ in range(2)]
        await asyncio.sleep(0.2)
        [shared] = client._uploading.values()
        for caller in callers:
            caller.cancel()
        await asyncio.gather(*callers, return_exceptions=True)
        await asyncio.wait([shared.task], timeout=5)
        assert shared.task.cancelled()
        assert client._uploading == {}  # nothing left behind
        assert client._uploaded == {}
        # Asked again, the file is uploaded again (the stopped upload cached nothing).
        assert (await client.upload(file, POE_KEY)).url

    asyncio.run(with_client(slow_uploads, body))
    assert len(uploads_of(slow_uploads, file)) == 2


def picture_message() -> list[dict[str, Any]]:
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(32)
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    content = [
        {"type": "text", "text": "what is it?"},
        {"type": "image_url", "image_url": {"url": url}},
    ]
    return [{"role": "user", "content": content}]


def test_two_clients_same_picture_one_key_rejected(
    proxy_passthrough: Mitmdump, slow_uploads: FakePoe, bot: str
) -> None:
    """Through the proxy (pass-through): two clients send the same picture at once, one with
    a key Poe rejects. The good key's client is answered; the other gets its own 401."""
    slow_uploads.script(bot, [text("a cat")])
    messages = picture_message()
    results: dict[str, Any] = {}

    def ask(key: str) -> None:
        client = proxy_passthrough.reverse_client(api_key=key)
        try:
            results[key] = client.chat.completions.create(model=bot, messages=messages)  # type: ignore[arg-type]
        except openai.APIStatusError as e:
            results[key] = e

    threads = [threading.Thread(target=ask, args=(key,)) for key in (UNKNOWN, POE_KEY)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert isinstance(results[UNKNOWN], openai.AuthenticationError)
    assert results[POE_KEY].choices[0].message.content == "a cat"
    assert [q.api_key for q in slow_uploads.requests_for(bot)] == [POE_KEY]


def test_a_client_leaving_mid_upload_does_not_cancel_the_other(
    proxy_passthrough: Mitmdump, slow_uploads: FakePoe, bot: str
) -> None:
    slow_uploads.upload_delay = 1.0
    slow_uploads.script(bot, [text("a cat")])
    messages = picture_message()
    body = {"model": bot, "messages": messages}
    url = f"{proxy_passthrough.reverse_url}/chat/completions"
    headers = {"authorization": f"Bearer {POE_KEY}"}
    leaving = httpx.Client(trust_env=False, timeout=httpx.Timeout(30, read=0.3))
    answer: dict[str, httpx.Response] = {}

    def stay() -> None:
        with httpx.Client(trust_env=False, timeout=30) as http:
            answer["r"] = http.post(url, json=body, headers=headers)

    with leaving, pytest.raises(httpx.ReadTimeout):  # leaves 0.3 s in, mid-upload
        threading.Timer(0.1, stay).start()
        leaving.post(url, json=body, headers=headers)
    assert slow_uploads.wait_for(lambda: "r" in answer, timeout=10)
    assert answer["r"].status_code == 200, answer["r"].text
    assert answer["r"].json()["choices"][0]["message"]["content"] == "a cat"


# --- stored responses ---------------------------------------------------------------------------


def test_a_stored_response_is_its_makers_alone(
    proxy_passthrough: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    """Pass-through: a response made with key A cannot be read, continued or deleted with key
    B (it is as unknown to B as an id never made); A can do all three."""
    fake_poe.script(bot, [text("remember: 42")])
    mine = proxy_passthrough.reverse_client(api_key=POE_KEY)
    theirs = proxy_passthrough.reverse_client(api_key=SECOND)
    made = mine.responses.create(model=bot, input="a secret")
    with pytest.raises(openai.NotFoundError):
        theirs.responses.retrieve(made.id)
    with pytest.raises(openai.NotFoundError) as info:
        theirs.responses.create(model=bot, input="what was it?", previous_response_id=made.id)
    assert info.value.body["param"] == "previous_response_id"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        theirs.responses.delete(made.id)
    assert len(fake_poe.requests_for(bot)) == 1  # B's attempts spent nothing
    assert mine.responses.retrieve(made.id).id == made.id
    follow = mine.responses.create(model=bot, input="what was it?", previous_response_id=made.id)
    history = [m.content for m in fake_poe.requests_for(bot)[-1].query.query]  # type: ignore[union-attr]
    assert "a secret" in history and follow.id != made.id
    mine.responses.delete(made.id)


def test_response_store_owner_unit() -> None:
    store = ResponseStore()
    alice, bob = owner_of("key-a"), owner_of("key-b")
    store.put({"id": "resp_1"}, [], alice)
    assert store.get("resp_1", bob) is None and not store.delete("resp_1", bob)
    assert store.get("resp_1", alice) is not None and store.delete("resp_1", alice)
    assert store.get("resp_1", alice) is None
    assert "key-a" not in alice  # a digest, not the key


# --- token tables ------------------------------------------------------------------------------


def test_a_caller_leaving_while_token_tables_load_does_not_stop_them() -> None:
    """The token tables load once, in a thread, and every early request waits for them: one
    that leaves meanwhile stops its own wait, never the load the others wait for."""

    async def main() -> tuple[bool, bool, bool]:
        loop = asyncio.get_running_loop()
        holder = SimpleNamespace(tokenizer=loop.run_in_executor(None, time.sleep, 0.3))
        leaving = asyncio.create_task(Service.tokenizer_loaded(holder))  # type: ignore[arg-type]
        staying = asyncio.create_task(Service.tokenizer_loaded(holder))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        leaving.cancel()
        await staying
        return leaving.cancelled(), holder.tokenizer.cancelled(), holder.tokenizer.done()

    assert asyncio.run(main()) == (True, False, True)


# --- connections -------------------------------------------------------------------------------


def test_shared_connections_keep_each_clients_answer(
    proxy_passthrough: Mitmdump, fake_poe: FakePoe, bot: str
) -> None:
    """Poe queries of both keys share the proxy's connection pools: a client whose key is
    rejected, or who leaves mid-stream, changes nothing for the other."""
    fake_poe.script(bot, [text("one"), sleep(0.3), text(" two")])
    results: dict[str, Any] = {}

    def good() -> None:
        client = proxy_passthrough.reverse_client(api_key=POE_KEY)
        results["good"] = [
            client.chat.completions.create(model=bot, messages=[{"role": "user", "content": "hi"}])
            .choices[0]
            .message.content
            for _ in range(3)
        ]

    def rejected() -> None:
        client = proxy_passthrough.reverse_client(api_key=UNKNOWN)
        for _ in range(3):
            with pytest.raises(openai.AuthenticationError):
                client.chat.completions.create(
                    model=bot, messages=[{"role": "user", "content": "hi"}]
                )
        results["rejected"] = True

    def leaving() -> None:
        client = proxy_passthrough.reverse_client(api_key=SECOND)
        for _ in range(3):
            stream = client.chat.completions.create(
                model=bot, messages=[{"role": "user", "content": "hi"}], stream=True
            )
            next(iter(stream))
            stream.close()
        results["leaving"] = True

    threads = [threading.Thread(target=f) for f in (good, rejected, leaving)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {"good": ["one two"] * 3, "rejected": True, "leaving": True}


# --- cancellation is never swallowed ------------------------------------------------------------


async def slow_to_close() -> AsyncIterator[int]:
    try:
        yield 1
        await asyncio.sleep(10)
        yield 2
    finally:
        await asyncio.sleep(0.3)  # a source whose cleanup takes a while (closing a stream)


def test_closing_a_keepalive_feed_passes_on_the_callers_cancellation() -> None:
    """pacing: closing the keep-alive feed waits for its pump to end; a caller cancelled in
    that wait (the client left) must end cancelled, not carry on as if nothing happened."""

    async def main() -> bool:
        ticks = with_ticks(slow_to_close(), 10)
        assert await anext(ticks) == 1
        closing = asyncio.create_task(ticks.aclose())  # type: ignore[attr-defined]
        await asyncio.sleep(0.05)
        closing.cancel()
        await asyncio.gather(closing, return_exceptions=True)
        return closing.cancelled()

    assert asyncio.run(main()) is True


def test_closing_a_keepalive_feed_still_waits_for_its_pump() -> None:
    """The fix's other half: without a cancellation, closing still waits for the source's
    cleanup (so no task outlives the stream)."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        ticks = with_ticks(slow_to_close(), 10)
        assert await anext(ticks) == 1
        started = loop.time()
        await ticks.aclose()  # type: ignore[attr-defined]
        assert len(asyncio.all_tasks()) == 1  # only this one
        return loop.time() - started

    assert asyncio.run(main()) >= 0.25
