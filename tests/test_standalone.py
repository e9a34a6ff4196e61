"""The start command for systems without bash, and the plain server without mitmproxy: the
same application, sharing every line of translation with the addon."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import openai
import pytest
from conftest import POE_KEY
from fake_poe import FakePoe, text
from harness import REPO, Mitmdump, free_port

USER = [{"role": "user", "content": "hi"}]


def wait_port(port: int, proc: subprocess.Popen[str], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stdout.read() if proc.stdout else "exited")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise RuntimeError("did not start")


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    clean = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    return subprocess.Popen(
        [sys.executable, "-m", "addon", *args],
        cwd=REPO,
        env={**clean, "PYTHONUNBUFFERED": "1", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


@pytest.fixture(scope="module")
def plain_server(fake_poe: FakePoe) -> Iterator[int]:
    port = free_port()
    proc = start(
        ["serve", "--port", str(port)],
        {
            "POE_API_KEY": POE_KEY,
            "POE_BASE_URL": fake_poe.base_url,
            "POE_UPLOAD_URL": fake_poe.upload_url,
        },
    )
    try:
        wait_port(port, proc)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def test_plain_server_answers_like_the_addon(
    plain_server: int, fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("plain"), text(" server")])
    client = openai.OpenAI(
        api_key="x", base_url=f"http://127.0.0.1:{plain_server}/v1", max_retries=0
    )
    assert client.chat.completions.create(model=bot, messages=USER).choices[0].message.content == (
        "plain server"
    )
    chunks = client.chat.completions.create(model=bot, messages=USER, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "plain server"
    assert client.responses.create(model=bot, input="hi").output_text == "plain server"
    assert "gpt-4o" in [m.id for m in client.models.list().data]
    assert all(r.api_key == POE_KEY for r in fake_poe.requests_for(bot))


def test_plain_server_refuses_an_open_relay(fake_poe: FakePoe) -> None:
    proc = start(
        ["serve", "--host", "0.0.0.0", "--port", str(free_port())],
        {"POE_API_KEY": POE_KEY, "POE_BASE_URL": fake_poe.base_url},
    )
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 2 and "open relay" in out


def test_python_m_addon_starts_the_proxy(fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("via python -m addon")])
    port = free_port()
    conf = Mitmdump().confdir
    proc = start(
        [
            "--mode",
            f"reverse:https://api.openai.com@127.0.0.1:{port}",
            "--set",
            f"confdir={conf}",
            "--set",
            f"poe_base_url={fake_poe.base_url}",
        ],
        {"POE_API_KEY": POE_KEY},
    )
    try:
        wait_port(port, proc)
        client = openai.OpenAI(api_key="x", base_url=f"http://127.0.0.1:{port}/v1", max_retries=0)
        result = client.chat.completions.create(model=bot, messages=USER)
        assert result.choices[0].message.content == "via python -m addon"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
        print(out)
