"""The README is executable: every fenced block in README.md runs here, as printed, against the
stand-in Poe (tests/fake_poe.py).

The blocks are read with markdown-it-py (a CommonMark parser: fences, their info strings, line
numbers and the HTML comments before them). The doc-test libraries (pytest-markdown-docs,
phmdoctest, mktestdocs) run Python blocks only; the README's blocks are mostly shell commands
that start a proxy which later blocks use, so the running is done here:

- A shell block that starts the proxy or the plain server (``./run.sh``, ``mitmdump``,
  ``mitmweb``, ``python -m addon``, ``uvicorn``) opens a *session*: it runs in the background
  until its banner and listener are up, a request goes through it, the blocks after it (up to
  the next such block) run against it, then it gets Ctrl-C (SIGINT) and must stop with no
  traceback.
- Other ``sh`` blocks run with ``bash -eo pipefail``; ``python`` blocks with this venv's Python;
  a ``js`` block is saved as the file the next shell block runs (``app.mjs``); a ``yaml`` block
  is loaded as a mappings file. Each must exit 0 with no OpenAI error in its output.
- ``text`` blocks quote messages (Troubleshooting): each must appear in what the proxy and the
  clients really print in the scenarios of ``test_troubleshooting_messages``.
- ``<!-- readme-test: skip: why -->`` before a block: not runnable here (system CA store,
  Windows, the suite itself); ``<!-- readme-test: fails -->``: the block must exit non-zero.

Placeholders substituted: ``your-poe-key`` (the stand-in's key), ports 8080/8000/8081 (free
ones, in run.sh's default too), ``python your_tool.py`` (a program using the openai SDK with
its defaults), ``your-web-token`` (mitmweb's token from its log). The blocks run in a copy of
the repository whose ``.venv`` is this one, with ``HOME`` a temporary directory: ``~/.mitmproxy``
is a fresh confdir whose config.yaml points the addon at the stand-in. No block gets this
venv on its PATH, so a command without its ``.venv/bin/`` prefix fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import yaml
from fake_poe import FakePoe, file, text
from harness import REPO, assert_no_traceback, free_port
from markdown_it import MarkdownIt

from addon.config import fingerprint
from addon.mappings import load_mappings

README = REPO / "README.md"
POE_KEY = "readme-poe-key"
MARKER = re.compile(r"<!--\s*readme-test:\s*([\w-]+)\s*(?::\s*(.*?))?\s*-->", re.S)
LAUNCHER = re.compile(
    r"(^|\s)(\./run\.sh(?!\s+test)|\S*mitmdump|\S*mitmweb|\S*python\S* -m addon|\S*uvicorn)(\s|$)"
)
WEB_TOKEN = re.compile(r"Web server listening at \S+\?token=([0-9a-f]+)")
READY = re.compile(
    r"(listening at [\d.*:\[\]]+:\d+|Uvicorn running on http://[\d.]+:\d+|WireGuard server)"
)
OPENAI_ERROR = re.compile(r'"error"\s*:\s*\{')


@dataclass
class Block:
    line: int
    lang: str
    text: str
    section: str
    marker: str | None = None
    reason: str = ""

    @property
    def label(self) -> str:
        return f"README.md:{self.line} ({self.section})"

    @property
    def is_server(self) -> bool:
        cmds = commands(self)
        one_off = re.search(r"\s--(options|commands|version|help)\b", cmds)
        return (
            self.lang == "sh"
            and self.marker is None
            and bool(LAUNCHER.search(cmds))
            and not one_off
        )


@dataclass
class Session:
    server: Block
    clients: list[Block] = field(default_factory=list)


def commands(block: Block) -> str:
    """The block's commands without comments (a `#` after a space or at a line's start)."""
    lines = [re.sub(r"(^|\s)#.*$", "", line) for line in block.text.splitlines()]
    return "\n".join(line for line in lines if line.strip())


def readme_blocks(markdown: str) -> list[Block]:
    tokens = MarkdownIt("commonmark").parse(markdown)
    blocks: list[Block] = []
    section = "top"
    pending: tuple[str, str] | None = None
    for i, token in enumerate(tokens):
        if token.type == "inline" and i and tokens[i - 1].type == "heading_open":
            section = token.content
        if token.type == "html_block":
            m = MARKER.search(token.content)
            pending = (m.group(1), m.group(2) or "") if m else None
            continue
        if token.type == "fence":
            assert token.map is not None
            lang = token.info.strip().split()[0] if token.info.strip() else ""
            marker, reason = pending or (None, "")
            blocks.append(Block(token.map[0] + 1, lang, token.content, section, marker, reason))
        pending = None
    return blocks


def sessions(blocks: list[Block]) -> list[Session]:
    found: list[Session] = []
    for block in blocks:
        if block.is_server:
            found.append(Session(block))
        elif block.lang != "text" and block.marker != "skip":
            assert found, f"{block.label}: a block before any block that starts the proxy"
            found[-1].clients.append(block)
    return found


BLOCKS = readme_blocks(README.read_text(encoding="utf-8"))
SESSIONS = sessions(BLOCKS)


# --- the sandbox: a copy of the repository, a fresh HOME, free ports -------------------------


@dataclass
class Sandbox:
    root: Path
    repo: Path
    home: Path
    ports: dict[int, int]
    env: dict[str, str]
    poe: FakePoe

    @property
    def ca(self) -> Path:
        return self.home / ".mitmproxy" / "mitmproxy-ca-cert.pem"

    def substitute(self, text: str, web_token: str = "") -> str:
        text = text.replace("your-poe-key", POE_KEY)
        for printed, port in self.ports.items():
            text = text.replace(f"127.0.0.1:{printed}", f"127.0.0.1:{port}")
            text = text.replace(f"--port {printed}", f"--port {port}")
        text = text.replace("python your_tool.py", f"{sys.executable} your_tool.py")
        if web_token:
            text = text.replace("your-web-token", web_token)
        return text


def shared_venv_copy(venv: Path, real: Path) -> None:
    """A `.venv` that is this venv without being it: `./run.sh` finds it installed (its stamp
    for the copied pyproject.toml is there) and so never installs into the real one."""
    venv.mkdir()
    (venv / "bin").mkdir()
    shutil.copy(real / "pyvenv.cfg", venv / "pyvenv.cfg")
    for name in ("lib", "lib64", "include"):
        if (real / name).exists():
            (venv / name).symlink_to((real / name).resolve())
    for entry in (real / "bin").iterdir():
        (venv / "bin" / entry.name).symlink_to(entry)
    digest = hashlib.sha256((REPO / "pyproject.toml").read_bytes()).hexdigest()[:16]
    (venv / f".installed-{digest}").touch()


def block_env(sandbox_home: Path) -> dict[str, str]:
    """The user's environment: no proxy, Poe or OpenAI settings, no venv on the PATH."""
    venv_bin = str(Path(sys.prefix) / "bin")
    path = [p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != venv_bin]
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.upper().endswith("_PROXY")
        and not k.startswith(("POE_", "OPENAI_", "VIRTUAL_ENV", "PYTHON", "NODE_"))
        and k not in ("SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
    }
    env.update(HOME=str(sandbox_home), PATH=os.pathsep.join(path), PYTHONUNBUFFERED="1")
    return env


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    root = tmp_path_factory.mktemp("readme")
    repo, home = root / "repo", root / "home"
    repo.mkdir()
    (home / ".mitmproxy").mkdir(parents=True)
    ports = {8080: free_port(), 8000: free_port(), 8081: free_port()}
    for name in ("addon", "mappings"):
        (repo / name).symlink_to(REPO / name)
    shutil.copy(REPO / "pyproject.toml", repo / "pyproject.toml")
    run_sh = (REPO / "run.sh").read_text().replace("127.0.0.1:8080", f"127.0.0.1:{ports[8080]}")
    (repo / "run.sh").write_text(run_sh)
    (repo / "run.sh").chmod(0o755)
    shared_venv_copy(repo / ".venv", Path(sys.prefix))
    node_modules = REPO / "tests" / "clients" / "node_modules"
    assert node_modules.is_dir(), "run `npm ci --prefix tests/clients` (as .ci/run does)"
    (repo / "node_modules").symlink_to(node_modules)
    (repo / "your_tool.py").write_text(
        # "Your program": the openai SDK with its defaults (api.openai.com, the environment's
        # HTTPS_PROXY and SSL_CERT_FILE).
        "from openai import OpenAI\n"
        "client = OpenAI(api_key='anything', max_retries=0)\n"
        "answer = client.chat.completions.create(\n"
        "    model='gpt-4o', messages=[{'role': 'user', 'content': 'Hello'}])\n"
        "print(answer.choices[0].message.content)\n"
    )
    with FakePoe(api_keys=(POE_KEY,)) as poe:
        poe.script("GPT-4o", [text("Hello from the stand-in")])
        poe.script("Claude-Sonnet-4-Reasoning", [text("Because it is.")])
        picture = poe.host_file("lighthouse.png", b"\x89PNG\r\n\x1a\nfake", "image/png")
        poe.script("FLUX-pro-1.1", [file(picture, "image/png", "lighthouse.png")])
        (home / ".mitmproxy" / "config.yaml").write_text(
            f"poe_base_url: {poe.base_url}\n"
            f"poe_upload_url: {poe.upload_url}\n"
            f"listen_port: {ports[8080]}\n"
            f"web_port: {ports[8081]}\n"
            "web_open_browser: false\n"
        )
        env = block_env(home)
        env.update(POE_BASE_URL=poe.base_url, POE_UPLOAD_URL=poe.upload_url)
        yield Sandbox(root, repo, home, ports, env, poe)


# --- running blocks ----------------------------------------------------------------------------


class Background:
    """A server block running in its own process group, its output collected."""

    def __init__(self, sandbox: Sandbox, script: str) -> None:
        self.script = script
        self.proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=sandbox.repo,
            env=sandbox.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def started(self) -> bool:
        """The listeners are up and so is the addon: its banner follows them (mitmweb's token
        line too); the plain server says it runs once its start-up is done."""
        out = self.output
        if "Uvicorn running on" in out:
            return True
        last = max((m.end() for m in READY.finditer(out)), default=-1)
        web = "mitmweb" not in self.script or WEB_TOKEN.search(out)
        return last >= 0 and "poe-openai: " in out[last:] and bool(web)

    def wait_ready(self, label: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.started():
                return
            if self.proc.poll() is not None:
                self.reader.join(2)
                pytest.fail(f"{label} exited {self.proc.returncode}:\n{self.output}")
            time.sleep(0.1)
        self.stop()
        pytest.fail(f"{label} did not start in {timeout} s:\n{self.output}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.reader.join(2)
        return self.proc.returncode


def run_client(sandbox: Sandbox, block: Block, web_token: str) -> str:
    script = sandbox.substitute(block.text, web_token)
    if block.lang == "js":
        (sandbox.repo / "app.mjs").write_text(script)
        return ""
    if block.lang == "yaml":
        path = sandbox.root / "mappings.yaml"
        path.write_text(script)
        model_map = load_mappings(path)
        written = yaml.safe_load(script)["models"]
        assert written, f"{block.label}: no models"
        for name, bot in written.items():  # "no value: the bot of the same name"
            assert model_map.bot_for(name) == (bot or name), block.label
        return ""
    if block.lang == "python":
        path = sandbox.root / f"block_{block.line}.py"
        path.write_text(script)
        argv = [sys.executable, str(path)]
    elif block.lang == "sh":
        argv = ["bash", "-eo", "pipefail", "-c", script]
    else:
        pytest.fail(f"{block.label}: no way to run a {block.lang!r} block; mark it or add one")
    done = subprocess.run(
        argv,
        cwd=sandbox.repo,
        env=sandbox.env,
        capture_output=True,
        text=True,
        timeout=90,
    )
    out = done.stdout + done.stderr
    if block.marker == "fails":
        assert done.returncode != 0, f"{block.label} should fail:\n{script}\n{out}"
        return out
    assert done.returncode == 0, f"{block.label} exited {done.returncode}:\n{script}\n{out}"
    assert not OPENAI_ERROR.search(out) and out.strip() != "null", f"{block.label}:\n{out}"
    shows_answer = "print(" in script or "your_tool.py" in script or script.startswith("curl")
    if shows_answer and re.search(r"gpt-4o|your_tool\.py", script):
        # A chat call whose answer the block shows: it is the stand-in's, whole.
        assert "Hello from the stand-in" in out, f"{block.label}:\n{out}"
    if "sha256sum" in script:  # the key's fingerprint, as the proxy's log lines show it
        assert f"key#{out.strip()}" == fingerprint(POE_KEY), f"{block.label}:\n{out}"
    return out


def listeners(output: str) -> list[tuple[str, str]]:
    """(kind, host:port) of each listener the output announces."""
    found = []
    for m in re.finditer(
        r"(reverse proxy to \S+|HTTP\(S\) proxy|[Tt]ransparent proxy) listening at ([\d.]+:\d+)",
        output,
    ):
        found.append((m.group(1).split()[0].lower(), m.group(2)))
    for m in re.finditer(r"Uvicorn running on http://([\d.]+:\d+)", output):
        found.append(("plain", m.group(1)))
    return found


def probe(sandbox: Sandbox, kind: str, where: str) -> None:
    """A request through the listener, as a client of that kind of listener sends it."""
    chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}
    headers = {"authorization": "Bearer anything"}
    if kind in ("reverse", "plain"):
        client = httpx.Client(base_url=f"http://{where}", trust_env=False, timeout=30)
        url = "/v1/chat/completions"
    elif kind == "http(s)":
        deadline = time.monotonic() + 10
        while not sandbox.ca.exists() and time.monotonic() < deadline:
            time.sleep(0.1)  # mitmproxy writes its CA files while it starts
        client = httpx.Client(
            proxy=f"http://{where}",
            verify=ssl.create_default_context(cafile=str(sandbox.ca)),
            trust_env=False,
            timeout=30,
        )
        url = "https://api.openai.com/v1/chat/completions"
    else:  # transparent: what a redirected connection carries (the Host header)
        client = httpx.Client(base_url=f"http://{where}", trust_env=False, timeout=30)
        url = "/v1/chat/completions"
        headers["host"] = "api.openai.com"
    with client:
        answer = client.post(url, json=chat, headers=headers)
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["message"]["content"] == "Hello from the stand-in"


def assert_parameters_reached_poe(poe: FakePoe) -> None:
    """The README's claim for `poe_parameters`: on the last user message of the Poe query."""
    for bot, parameters in (
        ("Claude-Sonnet-4-Reasoning", {"thinking_budget": 8000}),
        ("FLUX-pro-1.1", {"aspect_ratio": "4:3"}),
    ):
        asked = poe.requests_for(bot)
        assert asked, f"the README's {bot} call did not reach Poe"
        query = asked[-1].query
        assert query is not None and query.query[-1].parameters == parameters, query


def test_markers_and_sessions_are_read_as_written() -> None:
    """A marker belongs to the block right after it (in a list item too), not to one further
    on; one-off commands and `./run.sh test` start no session."""
    blocks = readme_blocks(
        "# A\n\n<!-- readme-test: skip: needs root -->\n```sh\nsudo x\n```\n\n"
        "<!-- readme-test: fails -->\n\nA paragraph between.\n\n```sh\nfalse\n```\n\n"
        "## B\n\n- item\n\n  <!-- readme-test: fails -->\n  ```sh\n  false\n  ```\n\n"
        "```sh\n./run.sh test\n```\n\n```sh\n.venv/bin/mitmdump -s a.py --options\n```\n\n"
        "```sh\nK=1 ./run.sh   # starts it\n```\n\n```python\nprint(1)\n```\n"
    )
    assert [(b.marker, b.reason, b.section) for b in blocks[:3]] == [
        ("skip", "needs root", "A"),
        (None, "", "A"),
        ("fails", "", "B"),
    ]
    assert [b.is_server for b in blocks[3:]] == [False, False, True, False]
    (session,) = sessions(blocks[5:])
    assert session.server is blocks[5] and session.clients == [blocks[6]]
    with pytest.raises(AssertionError, match="before any block that starts the proxy"):
        sessions(blocks[1:])


def test_every_block_is_run_or_marked() -> None:
    runnable = {"sh", "python", "js", "yaml", "text"}
    for block in BLOCKS:
        assert block.marker in (None, "skip", "fails"), f"{block.label}: marker {block.marker}"
        if block.marker == "skip":
            assert block.reason, f"{block.label}: say why it is skipped"
        else:
            assert block.lang in runnable, f"{block.label}: fence language {block.lang!r}"
    counted = sum(1 + len(s.clients) for s in SESSIONS)
    counted += sum(1 for b in BLOCKS if b.lang == "text" or b.marker == "skip")
    assert counted == len(BLOCKS)


def session_ids(found: list[Session]) -> list[str]:
    """By section and the command's first words (stable when lines above move)."""
    ids = []
    for session in found:
        words = " ".join(commands(session.server).replace("POE_API_KEY=your-poe-key", "").split())
        name = re.sub(r"[^\w.]+", "-", f"{session.server.section} {words[:40]}").strip("-")
        ids.append(name + (f"-{ids.count(name) + 1}" if name in ids else ""))
    return ids


@pytest.mark.parametrize("session", SESSIONS, ids=session_ids(SESSIONS))
def test_readme_session(sandbox: Sandbox, session: Session) -> None:
    server = Background(sandbox, sandbox.substitute(session.server.text))
    try:
        server.wait_ready(session.server.label)
        for kind, where in listeners(server.output):
            probe(sandbox, kind, where)
        token = WEB_TOKEN.search(server.output)
        for block in session.clients:
            run_client(sandbox, block, token.group(1) if token else "")
            if "poe_parameters" in block.text:
                assert_parameters_reached_poe(sandbox.poe)
    finally:
        stopped = server.stop()
    assert stopped == 0, f"Ctrl-C: exit status {stopped}:\n{server.output}"
    assert_no_traceback(server.output)
    assert "poe-openai: cannot start" not in server.output, server.output


def test_poe_status_through_mitmweb_is_plain_json(sandbox: Sandbox) -> None:
    """The README's curl line for mitmweb's command route answers the status itself."""
    (curl,) = [b for b in BLOCKS if "/commands/poe.status" in b.text and b.lang == "sh"]
    (session,) = [s for s in SESSIONS if curl in s.clients]
    server = Background(sandbox, sandbox.substitute(session.server.text))
    try:
        server.wait_ready(session.server.label)
        token = WEB_TOKEN.search(server.output)
        assert token, server.output
        out = run_client(sandbox, curl, token.group(1))
    finally:
        server.stop()
    status = json.loads(out)
    assert status["keys"], status


def quoted_lines() -> list[tuple[Block, str]]:
    return [
        (block, line.strip())
        for block in BLOCKS
        if block.lang == "text"
        for line in block.text.splitlines()
        if line.strip()
    ]


def printed(quote: str, output: str) -> bool:
    """The quote, with `...` standing for anything, is in the output."""
    pattern = ".*?".join(re.escape(part) for part in quote.split("..."))
    return re.search(pattern, output) is not None


def test_troubleshooting_messages(sandbox: Sandbox) -> None:
    """Each message the README quotes is printed, by the proxy or the client, in the
    situation the README describes: a newcomer's refused command, clients that do not trust
    the CA, a key Poe rejects, a call for a host the addon does not answer."""
    assert quoted_lines(), "no quoted messages in the README"
    outputs = []
    refused = subprocess.run(
        ["bash", "-c", f"POE_API_KEY={POE_KEY} .venv/bin/mitmdump -s addon/poe_openai.py"],
        cwd=sandbox.repo,
        env=sandbox.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode != 0, refused.stdout
    outputs.append(refused.stdout + refused.stderr)

    server = Background(sandbox, "POE_API_KEY=a-key-poe-rejects ./run.sh")
    proxy = f"http://127.0.0.1:{sandbox.ports[8080]}"
    untrusting = {**sandbox.env, "HTTPS_PROXY": proxy}
    (sandbox.repo / "untrusting.mjs").write_text(
        'import { EnvHttpProxyAgent, setGlobalDispatcher } from "undici";\n'
        "setGlobalDispatcher(new EnvHttpProxyAgent());\n"
        'try { await fetch("https://api.openai.com/v1/models"); } catch (e) { console.log(e); }\n'
    )
    sdk_call = "from openai import OpenAI\nOpenAI(api_key='x', max_retries=0).models.list()\n"
    try:
        server.wait_ready("./run.sh with a key Poe rejects")
        for argv in (
            ["curl", "-sS", "-x", proxy, "https://api.openai.com/v1/models"],
            [sys.executable, "-c", sdk_call],
            ["node", "untrusting.mjs"],
        ):
            done = subprocess.run(
                argv, cwd=sandbox.repo, env=untrusting, capture_output=True, text=True, timeout=60
            )
            outputs.append(done.stdout + done.stderr)
        with httpx.Client(
            proxy=proxy,
            verify=ssl.create_default_context(cafile=str(sandbox.ca)),
            trust_env=False,
            timeout=30,
        ) as client:
            chat = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hello"}]}
            for _ in range(2):  # the first call finds the key rejected, the second finds none
                answer = client.post("https://api.openai.com/v1/chat/completions", json=chat)
                assert answer.status_code == 502, answer.text
                outputs.append(answer.json()["error"]["message"])
            elsewhere = f"http://localhost:{sandbox.poe.port}/v1/chat/completions"
            assert client.post(elsewhere, json=chat).status_code == 404  # the other host's
    finally:
        server.stop()
    outputs.append(server.output)
    combined = "\n".join(outputs)
    assert "POST http://localhost" in server.output  # passed through: no poe-openai line
    missing = [f"{b.label}: {q}" for b, q in quoted_lines() if not printed(q, combined)]
    assert not missing, "quoted but not printed:\n" + "\n".join(missing) + "\n\n" + combined
