"""What the proxy tells people, through a real mitmdump: the start-up banner per auth mode and
listener, the log line after a key failover, a failed image fetch, and a quiet shutdown."""
# (the plain server's start-up summary and request lines: at the end)

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest
from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, file, http_error, sleep, text
from harness import REPO, Mitmdump, free_port
from test_startup import SERVER_ENTRIES, plain_client, server_command, start_server, stop

from addon.config import fingerprint

USER = [{"role": "user", "content": "hi"}]
SECOND = "poe-second-key"


def wait_for(m: Mitmdump, needle: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while needle not in m.output and time.monotonic() < deadline:
        time.sleep(0.05)
    assert needle in m.output, m.output[-3000:]
    return m.output


def banner_line(m: Mitmdump, spec_part: str, contains: str = "") -> str:
    lines = [
        line
        for line in m.output.splitlines()
        if "poe-openai: " in line and spec_part in line and contains in line
    ]
    assert len(lines) == 1, m.output
    return lines[0]


# --- the banner: what a client sets, per auth mode and listener --------------------------------


def test_banner_configured_key_any_api_key(proxy: Mitmdump) -> None:
    reverse = banner_line(proxy, f"reverse:https://api.openai.com@127.0.0.1:{proxy.reverse_port}")
    assert f"base URL http://127.0.0.1:{proxy.reverse_port}/v1" in reverse
    assert "API key: any" in reverse
    regular = banner_line(proxy, f"regular@127.0.0.1:{proxy.proxy_port}", "clients set HTTPS_PROXY")
    assert f"HTTPS_PROXY=http://127.0.0.1:{proxy.proxy_port}" in regular
    assert f"SSL_CERT_FILE={proxy.ca_file}" in regular
    assert "API key: any" in regular


def test_banner_node_line_gives_what_makes_node_use_the_proxy(proxy: Mitmdump) -> None:
    # HTTPS_PROXY + NODE_EXTRA_CA_CERTS alone: Node's fetch ignores the proxy (ENOTFOUND
    # api.openai.com offline, or a real call to OpenAI online).
    node = banner_line(proxy, f"regular@127.0.0.1:{proxy.proxy_port}", "Node clients")
    assert f"NODE_EXTRA_CA_CERTS={proxy.ca_file}" in node
    assert "NODE_USE_ENV_PROXY=1" in node
    assert "EnvHttpProxyAgent" in node and "fetchOptions" in node


def test_banner_token_mode_asks_for_a_token(proxy_tokens: Mitmdump) -> None:
    reverse = banner_line(proxy_tokens, f"@127.0.0.1:{proxy_tokens.reverse_port}")
    assert "API key: a token from poe_access_tokens" in reverse
    assert "API key: any" not in reverse


def test_banner_pass_through_asks_for_the_users_poe_key(proxy_passthrough: Mitmdump) -> None:
    reverse = banner_line(proxy_passthrough, f"@127.0.0.1:{proxy_passthrough.reverse_port}")
    assert "API key: the user's own Poe key" in reverse
    assert "API key: any" not in reverse


def test_banner_token_mode_explicit_proxy(fake_poe: FakePoe) -> None:
    opts = poe_options(fake_poe, poe_api_key=POE_KEY, poe_access_tokens="t1")
    with Mitmdump(options=opts, reverse=False) as m:
        regular = banner_line(m, f"regular@127.0.0.1:{m.proxy_port}", "clients set HTTPS_PROXY")
    assert "API key: a token from poe_access_tokens" in regular


# --- the log line after a failover names the key that answered ----------------------------------


def test_failover_log_line_names_the_answering_key(fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script_sequence(bot, [[http_error(401, {"detail": "bad key"})], [text("ok")]])
    opts = poe_options(fake_poe, poe_api_key=f"{POE_KEY},{SECOND}")
    with Mitmdump(options=opts, regular=False) as m:
        result = m.reverse_client().chat.completions.create(model=bot, messages=USER)
        assert result.choices[0].message.content == "ok"
        wait_for(m, " answered in ")
        lines = m.output.splitlines()
    failover = [line for line in lines if "trying " in line and bot in line]
    answered = [line for line in lines if " answered in " in line and bot in line]
    assert len(failover) == 1 and len(answered) == 1, lines
    # the failover line: the key that failed, then the one tried next
    assert f"{bot}->{bot} {fingerprint(POE_KEY)}: poe_key_rejected" in failover[0]
    assert failover[0].endswith(f"trying {fingerprint(SECOND)}")
    # the answer: the key that answered, not the one that failed
    assert f"{bot}->{bot} {fingerprint(SECOND)} answered in" in answered[0]
    assert fingerprint(POE_KEY) not in answered[0]


def test_failed_second_key_log_names_it(fake_poe: FakePoe, bot: str) -> None:
    # Both keys rejected: each line names the key it is about.
    fake_poe.script(bot, [http_error(401, {"detail": "bad key"})])
    opts = poe_options(fake_poe, poe_api_key=f"{POE_KEY},{SECOND}")
    with Mitmdump(options=opts, regular=False) as m:
        with pytest.raises(openai.APIStatusError):
            m.reverse_client().chat.completions.create(model=bot, messages=USER)
        wait_for(m, "no Poe key left")
        lines = m.output.splitlines()
    left = [line for line in lines if "no Poe key left" in line]
    assert f"{bot}->{bot} {fingerprint(SECOND)}: no Poe key left" in left[0]


# --- a failed image fetch says what failed -----------------------------------------------------


@pytest.mark.parametrize(
    ("where", "why"),
    [
        ("missing", re.compile(r"fetching it from 127\.0\.0\.1 failed: HTTP 404")),
        ("refused", re.compile(r"fetching it from 127\.0\.0\.1 failed: ConnectError")),
    ],
)
def test_image_fetch_failure_names_the_fetch(
    proxy: Mitmdump, fake_poe: FakePoe, bot: str, where: str, why: re.Pattern[str]
) -> None:
    url = (
        f"http://127.0.0.1:{fake_poe.port}/cdn/{bot}-never-hosted.png"
        if where == "missing"
        else "http://127.0.0.1:9/gone.png"
    )
    fake_poe.script(bot, [file(url, "image/png", "out.png")])
    with pytest.raises(openai.InternalServerError) as info:
        proxy.reverse_client().images.generate(model=bot, prompt="x", response_format="b64_json")
    error = info.value.body
    assert isinstance(error, dict)
    assert error["code"] == "image_fetch_failed"
    assert why.search(error["message"]), error["message"]
    assert "Could not reach Poe" not in error["message"]
    assert info.value.response.headers["x-should-retry"] == "false"  # the picture was paid for
    wait_for(proxy, f"{bot}->{bot}")
    assert "failed fetching the image" in proxy.output


# --- stopping the proxy while answers stream -----------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_stopping_mid_stream_is_quiet(fake_poe: FakePoe, bot: str, sig: signal.Signals) -> None:
    fake_poe.script(bot, [text("first"), sleep(30), text("never")])
    opts = poe_options(fake_poe)
    m = Mitmdump(options=opts, env={"POE_API_KEY": POE_KEY}).start()
    try:
        clients = [m.reverse_client(), m.proxy_client()]  # both listeners, HTTP/1 and TLS
        seen: list[str] = []
        ended: list[str] = []

        def read(client: openai.OpenAI) -> None:
            try:
                for chunk in client.chat.completions.create(model=bot, messages=USER, stream=True):
                    seen.extend(c.delta.content or "" for c in chunk.choices)
            except openai.APIError as e:
                ended.append(type(e).__name__)

        readers = [threading.Thread(target=read, args=(c,), daemon=True) for c in clients]
        for reader in readers:
            reader.start()
        deadline = time.monotonic() + 15
        while seen.count("first") < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert seen.count("first") == 2, m.output
        assert m.proc is not None
        before = len(m.lines)
        m.proc.send_signal(sig)
        code = m.proc.wait(20)
    finally:
        m.stop()
    for reader in readers:
        reader.join(5)
    after = "".join(m.lines[before:])
    assert code == 0, after
    assert "Traceback" not in after and "CancelledError" not in after, after
    assert "Exception in ASGI application" not in after and "Exception in callback" not in after
    assert len(after.splitlines()) < 15, after  # mitmproxy's own lines per flow, nothing more


# --- the test run: third-party deprecations are silenced by module, ours are not ----------------

WARNING_PROBE = """
import warnings


def test_imports_that_warn() -> None:
    import fastapi_poe.types  # noqa: F401  (pydantic: class-based config)
    import mitmproxy.addons.proxyauth  # noqa: F401  (ldap3: pyasn1's tagMap)
    from addon import tokens

    tokens.warm_up()  # (bpe_openai: importlib.resources.open_binary)
    warnings.warn("our own deprecation", DeprecationWarning, stacklevel=1)
"""


def test_third_party_deprecations_are_silenced_by_module(tmp_path: Path) -> None:
    probe = tmp_path / "test_probe.py"
    probe.write_text(WARNING_PROBE)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-c",
            str(REPO / "pyproject.toml"),
            "--rootdir",
            str(REPO),
            "-p",
            "no:cacheprovider",
            "-q",
            str(probe),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout[-3000:]
    assert "our own deprecation" in done.stdout  # a warning of this project still shows
    for noise in ("class-based `config`", "tagMap", "open_binary"):
        assert noise not in done.stdout, done.stdout[-3000:]


# --- the plain server says what it does, in the addon's words -------------------------------------

LOG_LINE = r"\[\d\d:\d\d:\d\d\.\d{3}\] poe-openai: "


@pytest.mark.parametrize("entry", SERVER_ENTRIES)
def test_plain_server_start_up_summary_and_request_lines(
    fake_poe: FakePoe, bot: str, entry: str
) -> None:
    fake_poe.script(bot, [text("plain")])
    port = free_port()
    env = {
        "POE_API_KEY": POE_KEY,
        "POE_BASE_URL": fake_poe.base_url,
        "POE_UPLOAD_URL": fake_poe.upload_url,
        "PYTHONUNBUFFERED": "1",
    }
    proc = start_server(server_command(entry, "127.0.0.1", port), env)
    try:
        client = plain_client("127.0.0.1", port)
        client.chat.completions.create(model=bot, messages=USER)  # type: ignore[arg-type]
        list(client.chat.completions.create(model=bot, messages=USER, stream=True))  # type: ignore[arg-type]
        with pytest.raises(openai.NotFoundError):
            client.chat.completions.create(model=f"{bot}-unknown", messages=USER)  # type: ignore[arg-type]
        time.sleep(0.5)
    finally:
        stop(proc)
    out = proc.communicate(timeout=10)[0]
    summary = re.search(
        LOG_LINE + r"answering OpenAI API calls with Poe \((.*)\) \| auth: (.*) \| "
        r"(\d+) mapped models from (.*) \| (.*)$",
        out,
        re.M,
    )
    assert summary is not None, out
    assert summary.groups()[:4] == (
        fake_poe.base_url,
        "configured keys",
        "56",
        str(REPO / "mappings" / "default.yaml"),
    )
    where = (
        f"127.0.0.1:{port}" if entry == "python -m addon serve" else "the address uvicorn reports"
    )
    assert re.search(
        LOG_LINE + re.escape(f"clients set base URL http://{where}/v1; API key: any"), out
    ), out
    tag = re.escape(f"{bot}->{bot} {fingerprint(POE_KEY)}")
    assert re.search(LOG_LINE + tag + r" answered in \d+ ms$", out, re.M), out
    assert re.search(LOG_LINE + tag + r" streamed in \d+ ms$", out, re.M), out
    assert re.search(
        LOG_LINE + re.escape(f"{bot}-unknown->") + r".* failed before answering: 404", out
    ), out
    assert POE_KEY not in out


def test_plain_server_summary_names_the_variables(fake_poe: FakePoe) -> None:
    port = free_port()
    env = {
        "POE_API_KEY": POE_KEY,
        "POE_ACCESS_TOKENS": "tok-secret-xyz",
        "POE_BASE_URL": fake_poe.base_url,
        "POE_MODELS_URL": "",
        "PYTHONUNBUFFERED": "1",
    }
    proc = start_server(server_command("python -m addon serve", "127.0.0.1", port), env)
    stop(proc)
    out = proc.communicate(timeout=10)[0]
    assert "auth: access tokens" in out
    assert "Poe's bot list: off (POE_MODELS_URL is empty)" in out
    assert "API key: a token from POE_ACCESS_TOKENS (other keys get 401)" in out
    assert "tok-secret-xyz" not in out
