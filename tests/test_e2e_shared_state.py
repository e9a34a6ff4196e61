"""Several instances, one state: plain servers, mitmdump and `uvicorn --workers 2` sharing a
real Redis (tests/redisd.py), driven by the official SDK against the stand-in Poe server; and
the same Redis stopped and started again under them."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
import redis
from conftest import ACCESS_TOKEN, POE_KEY, poe_options
from fake_poe import FakePoe, http_error, text
from harness import REPO, Mitmdump, assert_no_traceback, free_port
from redisd import RedisServer
from test_standalone import wait_port

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

SECOND = "poe-second-key"
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


class PlainServer:
    """The plain server (`python -m addon serve`, or uvicorn with workers) with its output."""

    def __init__(self, env: dict[str, str], workers: int = 0) -> None:
        self.port = free_port()
        self.env = env
        self.workers = workers
        self.lines: list[str] = []
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> PlainServer:
        if self.workers:
            args = ["-m", "uvicorn", "addon.standalone:create", "--factory"]
            args += ["--port", str(self.port), "--workers", str(self.workers)]
        else:
            args = ["-m", "addon", "serve", "--port", str(self.port)]
        clean = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        clean = {k: v for k, v in clean.items() if not k.startswith("POE_")}
        self.proc = subprocess.Popen(
            [sys.executable, *args],
            cwd=REPO,
            env={**clean, "PYTHONUNBUFFERED": "1", **self.env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        wait_port(self.port, self.proc)
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def client(self) -> openai.OpenAI:
        # A new connection for each request: with workers, each may land on either of them.
        http = httpx.Client(
            trust_env=False, timeout=30, limits=httpx.Limits(max_keepalive_connections=0)
        )
        return openai.OpenAI(
            api_key=ACCESS_TOKEN, base_url=self.url, max_retries=0, http_client=http
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(15)

    def __enter__(self) -> PlainServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def shared_env(fake: FakePoe, url: str, keys: str) -> dict[str, str]:
    return {
        "POE_API_KEY": keys,
        "POE_ACCESS_TOKENS": ACCESS_TOKEN,
        "POE_BASE_URL": fake.base_url,
        "POE_UPLOAD_URL": fake.upload_url,
        "POE_STATE_URL": url,
    }


class MitmInstance:
    """mitmdump as one more instance, with the plain server's client interface."""

    def __init__(self, mitm: Mitmdump) -> None:
        self.mitm = mitm

    def client(self) -> openai.OpenAI:
        return self.mitm.reverse_client(api_key=ACCESS_TOKEN)

    @property
    def output(self) -> str:
        return self.mitm.output


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as running:
        yield running


@pytest.fixture(scope="module")
def plain_pair(fake_poe: FakePoe, server: RedisServer) -> Iterator[tuple[Any, Any]]:
    env = shared_env(fake_poe, server.url, f"{POE_KEY},{SECOND}")
    with PlainServer(env) as one, PlainServer(env) as two:
        yield one, two


@pytest.fixture(scope="module")
def mitm_and_plain(fake_poe: FakePoe, server: RedisServer) -> Iterator[tuple[Any, Any]]:
    opts = poe_options(
        fake_poe,
        poe_api_key=f"{POE_KEY},{SECOND}",
        poe_access_tokens=ACCESS_TOKEN,
        poe_state_url=server.url,
    )
    env = shared_env(fake_poe, server.url, f"{POE_KEY},{SECOND}")
    with Mitmdump(options=opts, regular=False) as mitm, PlainServer(env) as plain:
        yield MitmInstance(mitm), plain
        assert_no_traceback(mitm.output)


@pytest.fixture(params=["two plain servers", "mitmdump and a plain server"])
def pair(request: pytest.FixtureRequest) -> tuple[Any, Any]:
    name = "plain_pair" if request.param == "two plain servers" else "mitm_and_plain"
    return request.getfixturevalue(name)  # type: ignore[no-any-return]


def history(fake: FakePoe, bot: str, n: int) -> list[str]:
    return [m["content"] for m in fake.requests_for(bot)[n].body["query"]]


def chain(instances: list[Any], fake: FakePoe, bot: str) -> list[str]:
    """A Responses conversation, each turn on the next instance; returns the response ids."""
    fake.script_sequence(bot, [[text(f"answer {n}")] for n in range(len(instances))])
    ids: list[str] = []
    before = len(fake.requests_for(bot))
    for n, instance in enumerate(instances):
        made = instance.client().responses.create(
            model=bot, input=f"turn {n}", previous_response_id=ids[-1] if ids else None
        )
        assert made.output_text == f"answer {n}"
        ids.append(made.id)
        # Poe got the whole conversation, whoever stored its earlier turns
        expected = [x for k in range(n) for x in (f"turn {k}", f"answer {k}")] + [f"turn {n}"]
        assert history(fake, bot, before + n) == expected
    return ids


def test_a_three_turn_conversation_alternates_between_instances(
    pair: tuple[Any, Any], fake_poe: FakePoe, bot: str
) -> None:
    one, two = pair
    ids = chain([one, two, one], fake_poe, bot)
    # read on one, deleted on the other: gone everywhere
    assert two.client().responses.retrieve(ids[2]).output_text == "answer 2"
    assert one.client().responses.retrieve(ids[1]).output_text == "answer 1"
    two.client().responses.delete(ids[2])
    with pytest.raises(openai.NotFoundError):
        one.client().responses.retrieve(ids[2])
    with pytest.raises(openai.NotFoundError):
        one.client().responses.create(model=bot, input="more", previous_response_id=ids[2])
    assert len(fake_poe.requests_for(bot)) == 3


def test_an_item_reference_made_on_one_is_found_on_the_other(
    plain_pair: tuple[Any, Any], fake_poe: FakePoe, bot: str
) -> None:
    one, two = plain_pair
    fake_poe.script_sequence(bot, [[text("Hi Ann.")], [text("Blue.")]])
    first = one.client().responses.create(model=bot, input="I am Ann.")
    item = first.output[0].id
    two.client().responses.create(
        model=bot, input=[{"type": "item_reference", "id": item}, {"role": "user", "content": "?"}]
    )
    assert history(fake_poe, bot, 1) == ["Hi Ann.", "?"]


def test_store_false_writes_nothing_to_redis(
    plain_pair: tuple[Any, Any], fake_poe: FakePoe, server: RedisServer, bot: str
) -> None:
    one, _ = plain_pair
    fake_poe.script(bot, [text("not kept")])
    made = one.client().responses.create(model=bot, input="hi", store=False)
    client = redis.Redis(port=server.port)
    assert client.exists(f"poe-openai:resp:{made.id}") == 0
    kept = one.client().responses.create(model=bot, input="hi")
    assert client.exists(f"poe-openai:resp:{kept.id}") == 1  # (the name the check looks for)


KEY_FAILURES = {
    "rate-limited": (4, http_error(429, {"detail": "slow down"}, {"Retry-After": "30"})),
    "out of points": (5, http_error(402, {"detail": "no points"})),
    "rejected": (6, http_error(401, {"detail": "bad key"})),
}


@pytest.mark.parametrize("failure", list(KEY_FAILURES))
def test_a_key_benched_on_one_is_skipped_by_the_other(
    fake_poe: FakePoe, server: RedisServer, bot: str, failure: str
) -> None:
    """A key Poe rate-limited, found out of points or rejected on one instance is never asked
    by the other: one failed round trip for the whole deployment, not one per instance."""
    db, step = KEY_FAILURES[failure]
    env = shared_env(fake_poe, server.url.removesuffix("/0") + f"/{db}", f"{POE_KEY},{SECOND}")
    fake_poe.script_sequence(bot, [[step]] + [[text("ok")]] * 4)
    with PlainServer(env) as one, PlainServer(env) as two:
        answer = one.client().chat.completions.create(
            model=bot, messages=[{"role": "user", "content": "hi"}]
        )
        assert answer.choices[0].message.content == "ok"
        benched, fresh = (r.api_key for r in fake_poe.requests_for(bot))
        assert benched != fresh
        for _ in range(3):  # the other instance never asks Poe with the benched key
            two.client().chat.completions.create(
                model=bot, messages=[{"role": "user", "content": "x"}]
            )
        later = [r.api_key for r in fake_poe.requests_for(bot)][2:]
    assert later == [fresh] * 3
    assert failure in one.output and failure not in two.output  # seen once, on one


def test_a_picture_is_uploaded_once_for_every_instance(
    fake_poe: FakePoe, server: RedisServer, bot: str
) -> None:
    # One key: an upload is per key (another key may be rejected where this one is not).
    # Database 1: its own key health (another test here rests keys in database 0).
    env = shared_env(fake_poe, server.url.removesuffix("/0") + "/1", POE_KEY)
    png = PNG + bot.encode()
    content: Any = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png)}},
    ]
    fake_poe.script(bot, [text("A dot.")])
    with PlainServer(env) as one, PlainServer(env) as two:
        for instance in (one, two, one, two):
            instance.client().chat.completions.create(
                model=bot, messages=[{"role": "user", "content": content}]
            )
    assert [u.data for u in fake_poe.uploads].count(png) == 1
    assert len(fake_poe.requests_for(bot)) == 4


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def test_uvicorn_workers_share_one_state(fake_poe: FakePoe, server: RedisServer, bot: str) -> None:
    env = shared_env(fake_poe, server.url.removesuffix("/0") + "/2", f"{POE_KEY},{SECOND}")
    with PlainServer(env, workers=2) as workers:
        # Each request on a new connection: the two workers take them as they come.
        ids = chain([workers] * 6, fake_poe, bot)
        for response_id in ids:
            assert workers.client().responses.retrieve(response_id).id == response_id
        limited = http_error(429, {"detail": "slow down"}, {"Retry-After": "30"})
        fake_poe.script_sequence(bot, [[limited]] + [[text("ok")]] * 5)
        png = PNG + bot.encode()
        content: Any = [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(png)}},
        ]
        for _ in range(5):
            workers.client().chat.completions.create(
                model=bot, messages=[{"role": "user", "content": content}]
            )
        keys = [r.api_key for r in fake_poe.requests_for(bot)][6:]
        assert len(keys) == 6 and keys[2:] == [keys[1]] * 4 and keys[0] != keys[1]
        assert [u.data for u in fake_poe.uploads].count(png) == 2  # once per key: both tried
    assert workers.output.count("Started server process") == 2
    assert workers.output.count("poe-openai: state: shared through") == 2


def test_redis_stopped_and_started_again_mid_run(fake_poe: FakePoe, bot: str) -> None:
    """While the store is down: chat completions answer on each instance's own state, stored
    responses answer 503 with Retry-After (nothing sent to Poe), one warning per instance;
    once it is back, sharing resumes without a restart."""
    with RedisServer() as store:
        env = shared_env(fake_poe, store.url, f"{POE_KEY},{SECOND}")
        with PlainServer(env) as one, PlainServer(env) as two:
            fake_poe.script(bot, [text("still here")])
            first = one.client().responses.create(model=bot, input="before")
            store.stop()
            asked = len(fake_poe.requests_for(bot))
            for instance in (one, two, one, two):
                answer = instance.client().chat.completions.create(
                    model=bot, messages=[{"role": "user", "content": "during"}]
                )
                assert answer.choices[0].message.content == "still here"
                legacy = instance.client().completions.create(model=bot, prompt="during")
                assert legacy.choices[0].text == "still here"
            for instance in (one, two):
                with pytest.raises(openai.InternalServerError) as info:
                    instance.client().responses.create(
                        model=bot, input="next", previous_response_id=first.id
                    )
                assert info.value.status_code == 503
                assert info.value.response.headers["retry-after"] == "5"
                assert info.value.body["code"] == "store_unavailable"  # type: ignore[index]
                with pytest.raises(openai.InternalServerError):
                    instance.client().responses.retrieve(first.id)
                with pytest.raises(openai.InternalServerError):
                    instance.client().responses.delete(first.id)
            # a new response is answered (the answer is never lost), just not stored
            unstored = two.client().responses.create(model=bot, input="during")
            assert unstored.output_text == "still here"
            assert len(fake_poe.requests_for(bot)) == asked + 9  # the 503s asked Poe nothing
            store.start()
            time.sleep(1.2)  # an instance asks a store it found down once a second
            ids = chain([two, one, two], fake_poe, bot)
            assert one.client().responses.retrieve(ids[2]).id == ids[2]
        for instance in (one, two):
            banner = f"poe-openai: state: shared through {store.url} (stored responses"
            assert banner in instance.output
            assert instance.output.count("cannot be reached") == 1, instance.output
            assert instance.output.count("is back; sharing again") == 1, instance.output
            assert "Traceback" not in instance.output


def test_a_password_protected_store_is_named_without_its_password(
    fake_poe: FakePoe, bot: str
) -> None:
    """The password in the URL (mitmdump) or in POE_STATE_PASSWORD (plain server) opens the
    store; the start-up line, poe.status and the log name host and database only."""
    secret = "s3cret-store-pw"
    with RedisServer(password=secret) as store:
        at = f"127.0.0.1:{store.port}/3"
        opts = poe_options(
            fake_poe,
            poe_api_key=POE_KEY,
            poe_access_tokens=ACCESS_TOKEN,
            poe_state_url=f"redis://:{secret}@{at}",
        )
        env = shared_env(fake_poe, f"redis://{at}", POE_KEY) | {"POE_STATE_PASSWORD": secret}
        with Mitmdump(options=opts, regular=False) as mitm, PlainServer(env) as plain:
            ids = chain([MitmInstance(mitm), plain], fake_poe, bot)
            assert plain.client().responses.retrieve(ids[0]).id == ids[0]
            status = mitm.status()
            assert status["state"] == f"redis://{at}"
            assert f"state: shared through redis://{at}" in mitm.output
            assert f"state: shared through redis://{at}" in plain.output
            outputs = mitm.output + plain.output
        assert secret not in outputs and "cannot be reached" not in outputs


def test_a_bad_state_url_stops_start_up_with_one_line(fake_poe: FakePoe) -> None:
    """Both front ends: the option named as the user typed it, the fix, no password, no
    traceback."""
    bad = "http://:pw-in-url@cache:6379"
    mitm = Mitmdump(options=poe_options(fake_poe, poe_state_url=bad), regular=False)
    with pytest.raises(RuntimeError) as info:
        mitm.start()
    output = str(info.value)
    assert (
        "poe-openai: cannot start: poe_state_url='http://***@cache:6379' is not a Redis URL; "
        "use e.g. --set poe_state_url=redis://127.0.0.1:6379/0" in output
    )
    plain = subprocess.run(
        [sys.executable, "-m", "addon", "serve", "--port", str(free_port())],
        cwd=REPO,
        env={**os.environ, "POE_STATE_URL": bad},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert plain.returncode == 2
    assert plain.stderr.strip() == (
        "poe-openai: cannot start: POE_STATE_URL='http://***@cache:6379' is not a Redis URL; "
        "use e.g. POE_STATE_URL=redis://127.0.0.1:6379/0 (rediss:// for TLS)"
    )
    for text_out in (output, plain.stdout + plain.stderr):
        assert "pw-in-url" not in text_out and "Traceback" not in text_out


def test_no_key_or_token_is_written_to_redis(
    fake_poe: FakePoe, server: RedisServer, bot: str
) -> None:
    """A key benched, a picture uploaded and responses stored by a token holder: neither a
    Poe key nor an access token is in Redis, only their digests."""
    env = shared_env(fake_poe, server.url.removesuffix("/0") + "/7", f"{POE_KEY},{SECOND}")
    limited = http_error(429, {"detail": "slow down"}, {"Retry-After": "30"})
    fake_poe.script_sequence(bot, [[limited]] + [[text("ok")]] * 3)
    content: Any = [
        {"type": "text", "text": "What is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64," + b64(PNG + b"7")}},
    ]
    with PlainServer(env) as one:
        one.client().chat.completions.create(
            model=bot, messages=[{"role": "user", "content": content}]
        )
        chain([one, one], fake_poe, bot)
    client = redis.Redis(port=server.port, db=7)
    names = client.keys("*")
    assert any(b":upload:" in n for n in names) and any(b":resp:" in n for n in names)
    assert any(b":rest" in n for n in names)
    for name in names:
        value = name + b" " + (client.dump(name) or b"")
        for secret in (POE_KEY, SECOND, ACCESS_TOKEN):
            assert secret.encode() not in value, name
