"""Start-up paths: every way of starting the proxy x every kind of bad configuration.

Each entry point is a real process (./run.sh, python -m addon, mitmdump -s, mitmweb -s,
python -m addon serve, uvicorn's --factory). A bad configuration must end the process with a
non-zero status and one clear message (printed once, fewer than 20 lines in all, no traceback);
it must never start with the addon absent (flows would then reach OpenAI). Good but unusual
spellings must start with the addon answering.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import pytest
from conftest import POE_KEY
from fake_poe import FakePoe, text
from harness import LISTENING, MITMDUMP, REPO, assert_no_traceback, free_port

PYTHON = Path(sys.executable)
MITMWEB = MITMDUMP.parent / "mitmweb"
UVICORN = MITMDUMP.parent / "uvicorn"
BROKEN_MAP = "models:\n  gpt-4o: GPT-4o\n  oops: [\n"
USER = [{"role": "user", "content": "hi"}]
EXIT_TIMEOUT = 40  # seconds a refused start may take on a loaded machine


def clean_env(extra: dict[str, str]) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().endswith("_PROXY") and not k.upper().startswith("POE_")
    }
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


@pytest.fixture(scope="module")
def run_sh_sandbox() -> Path:
    """./run.sh in a directory whose .venv is already installed (its stamp present), so that
    run.sh only execs mitmdump: the real run.sh, addon and pyproject.toml (symlinks), and a
    .venv whose python and mitmdump are this test run's."""
    root = Path(tempfile.mkdtemp(prefix="runsh-"))
    for name in ("run.sh", "addon", "pyproject.toml"):
        (root / name).symlink_to(REPO / name)
    bin_dir = root / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").symlink_to(PYTHON)
    (bin_dir / "mitmdump").symlink_to(MITMDUMP)
    stamp = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (root / ".venv" / f".installed-{stamp}").touch()
    return root


def proxy_command(entry: str, args: list[str], sandbox: Path) -> list[str]:
    """One mitmproxy entry point with mitmdump-style arguments."""
    script = ["-s", str(REPO / "addon" / "poe_openai.py")]
    if entry == "run.sh":
        return ["bash", str(sandbox / "run.sh"), *args]
    if entry == "python -m addon":
        return [str(PYTHON), "-m", "addon", *args]
    if entry == "mitmdump -s":
        return [str(MITMDUMP), *script, *args]
    assert entry == "mitmweb -s"
    web = ["--no-web-open-browser", "--web-host", "127.0.0.1", "--web-port", str(free_port())]
    return [str(MITMWEB), *script, *web, *args]


PROXY_ENTRIES = ("run.sh", "python -m addon", "mitmdump -s", "mitmweb -s")
SERVER_ENTRIES = ("python -m addon serve", "uvicorn --factory")


def server_command(entry: str, host: str, port: int) -> list[str]:
    if entry == "python -m addon serve":
        return [str(PYTHON), "-m", "addon", "serve", "--host", host, "--port", str(port)]
    assert entry == "uvicorn --factory"
    factory = ["addon.standalone:create", "--factory"]
    return [str(UVICORN), *factory, "--host", host, "--port", str(port)]


# --- bad configurations ---------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """A bad configuration and the words its one message must hold."""

    sets: tuple[str, ...] = ()  # --set values ("{tmp}" is the case's directory)
    env: dict[str, str] = field(default_factory=dict)
    modes: tuple[str, ...] = ("reverse:https://api.openai.com@127.0.0.1:0",)
    needle: str = ""


KEY_ENV = {"POE_API_KEY": POE_KEY}
# What mitmproxy's own parser refused (it then dropped the addon without a word). The addon
# reports every one of them, so one process per entry point holds them all.
PARSE_MISTAKES = {
    "not a number": Bad(("poe_idle_timeout_s=abc",), needle="poe_idle_timeout_s='abc'"),
    "not yes or no": Bad(("poe_allow_open_relay=maybe",), needle="poe_allow_open_relay='maybe'"),
    "given twice": Bad(("poe_api_key=A", "poe_api_key="), needle="poe_api_key is given 2 times"),
    "number given twice": Bad(
        ("poe_max_body_mb=5", "poe_max_body_mb=6"), needle="poe_max_body_mb is given 2 times"
    ),
    "no value": Bad(("poe_mappings",), needle="--set poe_mappings needs a value"),
    "misspelt option": Bad(("poe_idle_timout_s=5",), needle="did you mean poe_idle_timeout_s?"),
}
ALL_PARSE_MISTAKES = Bad(
    tuple(spec for bad in PARSE_MISTAKES.values() for spec in bad.sets), needle="cannot start"
)
# What the addon refuses once the values are parsed (before: the message up to 176 times,
# then RecursionError). One process each through mitmdump -s; the commonest two through the
# other entry points (the same code path once the options are parsed).
REFUSALS = {
    "tokens without key": Bad(("poe_access_tokens=t1",), needle="no Poe key is configured"),
    "open relay": Bad(env=KEY_ENV, modes=("regular@0.0.0.0:0",), needle="start an open relay"),
    "proxy not a URL": Bad(("poe_proxy=ftp://x",), needle="poe_proxy='ftp://x' is not a proxy"),
    "idle timeout 0": Bad(("poe_idle_timeout_s=0",), needle="poe_idle_timeout_s=0 must be at"),
    "body limit 0": Bad(("poe_max_body_mb=0",), needle="poe_max_body_mb=0 must be at least 1"),
    "mappings missing": Bad(("poe_mappings={tmp}/none.yaml",), needle="no such file"),
    "mappings broken": Bad(("poe_mappings={tmp}/broken.yaml",), needle="broken.yaml, line 4"),
}
PROXY_CASES = [(entry, kind) for entry in PROXY_ENTRIES for kind in PARSE_MISTAKES] + [
    (entry, kind)
    for entry in PROXY_ENTRIES
    for kind in REFUSALS
    if entry == "mitmdump -s" or kind in ("open relay", "mappings broken")
]

SERVER_REFUSALS = {
    "not a number": Bad(env={"POE_IDLE_TIMEOUT_S": "abc"}, needle="POE_IDLE_TIMEOUT_S='abc'"),
    "not yes or no": Bad(
        env={"POE_ALLOW_OPEN_RELAY": "maybe"}, needle="POE_ALLOW_OPEN_RELAY='maybe'"
    ),
    "misspelt variable": Bad(
        env={"POE_IDLE_TIMEOUT": "5"}, needle="did you mean POE_IDLE_TIMEOUT_S?"
    ),
    "tokens without key": Bad(
        env={"POE_ACCESS_TOKENS": "t1"}, needle="POE_ACCESS_TOKENS is set but no Poe key"
    ),
    "proxy not a URL": Bad(env={"POE_PROXY": "ftp://x"}, needle="POE_PROXY='ftp://x'"),
    "idle timeout 0": Bad(env={"POE_IDLE_TIMEOUT_S": "0"}, needle="POE_IDLE_TIMEOUT_S=0 must"),
    "body limit 0": Bad(env={"POE_MAX_BODY_MB": "0"}, needle="POE_MAX_BODY_MB=0 must"),
    "mappings missing": Bad(
        env={"POE_MAPPINGS": "{tmp}/none.yaml"}, needle="POE_MAPPINGS='{tmp}/none.yaml'"
    ),
    "mappings broken": Bad(
        env={"POE_MAPPINGS": "{tmp}/broken.yaml"}, needle="POE_MAPPINGS: {tmp}/broken.yaml, line"
    ),
}
# All through `python -m addon serve`; uvicorn's factory goes through the same build().
SERVER_CASES = [("python -m addon serve", kind) for kind in SERVER_REFUSALS] + [
    ("uvicorn --factory", kind) for kind in ("not a number", "not yes or no", "mappings broken")
]


@dataclass
class Outcome:
    returncode: int | None  # None: still running after EXIT_TIMEOUT (it started)
    output: str
    tmp: Path


def case_dir() -> Path:
    tmp = Path(tempfile.mkdtemp(prefix="startup-"))
    (tmp / "broken.yaml").write_text(BROKEN_MAP)
    return tmp


def run_to_exit(command: list[str], env: dict[str, str], tmp: Path) -> Outcome:
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=clean_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        output, _ = proc.communicate(timeout=EXIT_TIMEOUT)
        return Outcome(proc.returncode, output, tmp)
    except subprocess.TimeoutExpired:
        proc.kill()
        output, _ = proc.communicate()
        return Outcome(None, output, tmp)


def run_proxy(entry: str, bad: Bad, sandbox: Path) -> Outcome:
    tmp = case_dir()
    args = ["--set", f"confdir={tmp}"]
    for mode in bad.modes:
        args += ["--mode", mode]
    for spec in bad.sets:
        args += ["--set", spec.replace("{tmp}", str(tmp))]
    return run_to_exit(proxy_command(entry, args, sandbox), bad.env, tmp)


def run_server(entry: str, bad: Bad) -> Outcome:
    tmp = case_dir()
    env = {k: v.replace("{tmp}", str(tmp)) for k, v in bad.env.items()}
    return run_to_exit(server_command(entry, "127.0.0.1", free_port()), env, tmp)


Runs = dict[tuple[str, str], concurrent.futures.Future[Outcome]]


@pytest.fixture(scope="module")
def runs(request: pytest.FixtureRequest, run_sh_sandbox: Path) -> Iterator[Runs]:
    """The processes the selected cases need, a few at a time (each start costs 1-3 s of
    CPU): one per entry point for all parse mistakes, one per other case."""
    jobs: set[tuple[str, str]] = set()
    for item in request.session.items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if item.module is sys.modules[__name__] and "entry" in params and "kind" in params:
            jobs.add(job_of(params["entry"], params["kind"]))
    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        futures: Runs = {}
        for entry, kind in sorted(jobs):
            if entry in SERVER_ENTRIES:
                futures[entry, kind] = pool.submit(run_server, entry, SERVER_REFUSALS[kind])
            elif kind == "parse mistakes":
                futures[entry, kind] = pool.submit(
                    run_proxy, entry, ALL_PARSE_MISTAKES, run_sh_sandbox
                )
            else:
                futures[entry, kind] = pool.submit(run_proxy, entry, REFUSALS[kind], run_sh_sandbox)
        yield futures


def job_of(entry: str, kind: str) -> tuple[str, str]:
    return (
        (entry, "parse mistakes")
        if kind in PARSE_MISTAKES and entry in PROXY_ENTRIES
        else (
            entry,
            kind,
        )
    )


def assert_fails_closed(outcome: Outcome, needle: str, max_lines: int = 20) -> None:
    output = outcome.output
    needle = needle.replace("{tmp}", str(outcome.tmp))
    assert outcome.returncode not in (None, 0), f"did not fail closed:\n{output[-3000:]}"
    assert output.count(needle) == 1, output[-3000:]
    assert len(output.splitlines()) < max_lines, output[-3000:]
    assert_no_traceback(output)
    assert "poe-openai: answering" not in output


@pytest.mark.parametrize(("entry", "kind"), PROXY_CASES, ids=[f"{e}|{k}" for e, k in PROXY_CASES])
def test_a_bad_option_stops_start_up_with_one_message(entry: str, kind: str, runs: Runs) -> None:
    outcome = runs[job_of(entry, kind)].result()
    bad = {**PARSE_MISTAKES, **REFUSALS}[kind]
    assert_fails_closed(outcome, bad.needle)
    message = [line for line in outcome.output.splitlines() if bad.needle in line]
    assert "poe-openai: cannot start: " in message[0]
    if kind == "given twice":
        assert "poe_api_key=A" not in outcome.output  # a value given for a key is not echoed
    if kind in REFUSALS:
        assert outcome.output.count("poe-openai: cannot start") == 1


@pytest.mark.parametrize(("entry", "kind"), SERVER_CASES, ids=[f"{e}|{k}" for e, k in SERVER_CASES])
def test_a_bad_variable_stops_the_plain_server_with_one_line(
    entry: str, kind: str, runs: Runs
) -> None:
    outcome = runs[entry, kind].result()
    assert_fails_closed(outcome, SERVER_REFUSALS[kind].needle, max_lines=2)
    message = [line for line in outcome.output.splitlines() if "cannot start" in line]
    assert len(message) == 1, outcome.output
    # It names the environment variable the user set, never the mitmproxy option.
    assert not re.search(r"poe_[a-z]", message[0].replace(str(outcome.tmp), "")), message[0]
    assert "--set" not in message[0]


# --- good configurations start with the addon answering -------------------------------------


def start_until_answering(
    command: list[str], env: dict[str, str], listeners: int, timeout: float = 40
) -> tuple[subprocess.Popen[str], list[str]]:
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=clean_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    lines: list[str] = []
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    os.set_blocking(proc.stdout.fileno(), False)
    while time.monotonic() < deadline:
        chunk = proc.stdout.readline()
        if chunk:
            lines.append(chunk)
            output = "".join(lines)
            if "poe-openai: answering" in output and len(LISTENING.findall(output)) >= listeners:
                return proc, lines
            continue
        if proc.poll() is not None:
            break
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("did not start:\n" + "".join(lines) + (proc.stdout.read() or ""))


def stop(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def reverse_port(lines: list[str]) -> int:
    for match in LISTENING.findall("".join(lines)):
        if match[0].startswith("reverse proxy"):
            return int(match[2])
    raise AssertionError("".join(lines))


@pytest.mark.parametrize("entry", PROXY_ENTRIES)
def test_unusual_but_good_spellings_start_with_the_addon_answering(
    entry: str, run_sh_sandbox: Path, fake_poe: FakePoe, bot: str, tmp_path: Path
) -> None:
    """`yes` for a boolean, spaces around a number, a key file with comments after the key:
    all accepted, and an exposed listener allowed by poe_allow_open_relay."""
    fake_poe.script(bot, [text("answered")])
    keys = tmp_path / "keys.txt"
    keys.write_text(f"# my keys\n{POE_KEY}  # second account's key is below\n\n")
    args = [
        "--set",
        f"confdir={tmp_path}",
        "--mode",
        "reverse:https://api.openai.com@127.0.0.1:0",
        "--mode",
        "regular@0.0.0.0:0",
        "--set",
        "poe_allow_open_relay=yes",
        "--set",
        "poe_idle_timeout_s= 30 ",
        "--set",
        f"poe_api_key_file={keys}",
        "--set",
        f"poe_base_url={fake_poe.base_url}",
    ]
    proc, lines = start_until_answering(proxy_command(entry, args, run_sh_sandbox), {}, 2)
    try:
        client = openai.OpenAI(
            api_key="client",
            base_url=f"http://127.0.0.1:{reverse_port(lines)}/v1",
            max_retries=0,
            http_client=httpx.Client(trust_env=False, timeout=30),
        )
        answer = client.chat.completions.create(model=bot, messages=USER)
        assert answer.choices[0].message.content == "answered"
        # the comment after the key is not a key: Poe got the key alone
        assert [r.api_key for r in fake_poe.requests_for(bot)] == [POE_KEY]
    finally:
        stop(proc)


def test_wireguard_listener_is_not_an_open_relay(
    fake_poe: FakePoe, bot: str, tmp_path: Path
) -> None:
    """WireGuard peers need a key from the confdir: like local capture, not exposed."""
    fake_poe.script(bot, [text("via wireguard set-up")])
    args = [
        "--set",
        f"confdir={tmp_path}",
        "--mode",
        "reverse:https://api.openai.com@127.0.0.1:0",
        "--mode",
        f"wireguard@{free_port()}",
        "--set",
        f"poe_base_url={fake_poe.base_url}",
    ]
    command = [str(MITMDUMP), "-s", str(REPO / "addon" / "poe_openai.py"), *args]
    proc, lines = start_until_answering(command, KEY_ENV, 1)
    try:
        client = openai.OpenAI(
            api_key="client",
            base_url=f"http://127.0.0.1:{reverse_port(lines)}/v1",
            max_retries=0,
            http_client=httpx.Client(trust_env=False, timeout=30),
        )
        answer = client.chat.completions.create(model=bot, messages=USER)
        assert answer.choices[0].message.content == "via wireguard set-up"
    finally:
        stop(proc)


# --- the plain server's guard: every way of serving the app passes it -----------------------


def start_server(command: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        command,
        cwd=REPO,
        env=clean_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    port = int(command[-1])
    host = command[-3]
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(proc.communicate()[0])
        try:
            httpx.get(
                f"http://{'[::1]' if host == '::1' else '127.0.0.1'}:{port}/v1/models",
                trust_env=False,
            )
            return proc
        except httpx.TransportError:
            time.sleep(0.1)
    stop(proc)
    raise AssertionError(proc.communicate()[0])


def plain_client(host: str, port: int, api_key: str = "client", **headers: str) -> openai.OpenAI:
    return openai.OpenAI(
        api_key=api_key,
        base_url=f"http://{host}:{port}/v1",
        max_retries=0,
        default_headers=headers,
        http_client=httpx.Client(trust_env=False, timeout=30),
    )


def test_uvicorn_factory_serves_a_configured_key_to_this_machine_only(
    fake_poe: FakePoe, bot: str
) -> None:
    """The README's own form, listening everywhere: clients on this machine are answered, a
    client elsewhere (here: behind a reverse proxy that forwards its address) gets a 403."""
    fake_poe.script(bot, [text("local")])
    port = free_port()
    env = {**KEY_ENV, "POE_BASE_URL": fake_poe.base_url}
    proc = start_server(server_command("uvicorn --factory", "0.0.0.0", port), env)
    try:
        local = plain_client("127.0.0.1", port)
        assert local.chat.completions.create(model=bot, messages=USER).choices[0].message.content
        remote = plain_client("127.0.0.1", port, **{"x-forwarded-for": "203.0.113.9"})
        with pytest.raises(openai.PermissionDeniedError) as info:
            remote.chat.completions.create(model=bot, messages=USER)
        error = info.value.body
        assert isinstance(error, dict) and error["code"] == "open_relay_refused"
        assert "POE_ACCESS_TOKENS" in error["message"]
        assert len(fake_poe.requests_for(bot)) == 1  # the refused request never reached Poe
    finally:
        stop(proc)
    output = proc.communicate()[0]
    assert output.count("refusing requests from other machines") == 1, output


@pytest.mark.parametrize("allow", ["true", "yes", "on", "1"])
def test_plain_server_open_relay_allowed_with_any_yes(
    fake_poe: FakePoe, bot: str, allow: str
) -> None:
    fake_poe.script(bot, [text("anyone")])
    port = free_port()
    env = {**KEY_ENV, "POE_BASE_URL": fake_poe.base_url, "POE_ALLOW_OPEN_RELAY": allow}
    proc = start_server(server_command("python -m addon serve", "0.0.0.0", port), env)
    try:
        remote = plain_client("127.0.0.1", port, **{"x-forwarded-for": "203.0.113.9"})
        answer = remote.chat.completions.create(model=bot, messages=USER)
        assert answer.choices[0].message.content == "anyone"
    finally:
        stop(proc)


def test_plain_server_with_tokens_serves_other_machines_that_present_one(
    fake_poe: FakePoe, bot: str
) -> None:
    fake_poe.script(bot, [text("token holder")])
    port = free_port()
    env = {**KEY_ENV, "POE_BASE_URL": fake_poe.base_url, "POE_ACCESS_TOKENS": "tok-1"}
    proc = start_server(server_command("uvicorn --factory", "0.0.0.0", port), env)
    try:
        remote = plain_client("127.0.0.1", port, "tok-1", **{"x-forwarded-for": "203.0.113.9"})
        answer = remote.chat.completions.create(model=bot, messages=USER)
        assert answer.choices[0].message.content == "token holder"
    finally:
        stop(proc)


def test_plain_server_on_ipv6_loopback_is_not_exposed(fake_poe: FakePoe, bot: str) -> None:
    fake_poe.script(bot, [text("over ::1")])
    port = free_port()
    env = {**KEY_ENV, "POE_BASE_URL": fake_poe.base_url}
    proc = start_server(server_command("python -m addon serve", "::1", port), env)
    try:
        answer = plain_client("[::1]", port).chat.completions.create(model=bot, messages=USER)
        assert answer.choices[0].message.content == "over ::1"
    finally:
        stop(proc)


@pytest.mark.parametrize("host", ["1.2.3", "0.0.0.0", "my-laptop.local"])
def test_plain_server_refuses_a_reachable_host_in_one_line(host: str) -> None:
    command = server_command("python -m addon serve", host, free_port())
    outcome = run_to_exit(command, KEY_ENV, case_dir())
    assert_fails_closed(outcome, "start an open relay", max_lines=2)
    assert "POE_ALLOW_OPEN_RELAY=true" in outcome.output


@pytest.mark.parametrize("port", ["99999", "-1", "http"])
def test_plain_server_refuses_a_bad_port_in_one_line(port: str) -> None:
    command = [str(PYTHON), "-m", "addon", "serve", "--port", port]
    outcome = run_to_exit(command, {}, case_dir())
    assert_fails_closed(outcome, "is not a port number", max_lines=3)
