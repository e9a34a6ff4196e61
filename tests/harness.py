"""Runs a real mitmdump with the addon, for end-to-end tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import openai

REPO = Path(__file__).resolve().parent.parent
MITMDUMP = Path(sys.executable).parent / "mitmdump"
LISTENING = re.compile(r"(reverse proxy to \S+|HTTP\(S\) proxy) listening at ([\d.*]+):(\d+)")


def assert_no_traceback(output: str) -> None:
    """No traceback in mitmdump's output, except Python's own note that a SIGUSR1 (sent by
    these tests for the status line) found the event loop's wake-up pipe full under load."""
    benign = output.count(", in _sighandler_noop")
    assert output.count("Traceback") == benign, output[-3000:]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Mitmdump:
    """``mitmdump -s addon/poe_openai.py`` in a temp confdir, with a reverse-mode listener
    for api.openai.com and an explicit-proxy listener, both on 127.0.0.1."""

    def __init__(
        self,
        *,
        options: dict[str, str] | None = None,
        env: dict[str, str] | None = None,
        extra_args: Sequence[str] = (),
        reverse: bool = True,
        regular: bool = True,
    ) -> None:
        self.confdir = Path(tempfile.mkdtemp(prefix="mitm-conf-"))
        self.options = options or {}
        self.env = env or {}
        self.extra_args = list(extra_args)
        self.reverse_port = free_port() if reverse else None
        self.proxy_port = free_port() if regular else None
        self.lines: list[str] = []
        self.wanted_listeners = sum(1 for p in (self.reverse_port, self.proxy_port) if p)
        self.proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    # --- process --------------------------------------------------------------------------

    def command(self) -> list[str]:
        args = [str(MITMDUMP), "-s", str(REPO / "addon" / "poe_openai.py")]
        args += ["--set", f"confdir={self.confdir}"]
        if self.reverse_port:
            args += ["--mode", f"reverse:https://api.openai.com@127.0.0.1:{self.reverse_port}"]
        if self.proxy_port:
            args += ["--mode", f"regular@127.0.0.1:{self.proxy_port}"]
        for name, value in self.options.items():
            args += ["--set", f"{name}={value}"]
        return args + self.extra_args

    def start(self, timeout: float = 20) -> Mitmdump:
        env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
        env.pop("POE_API_KEY", None)
        env["PYTHONUNBUFFERED"] = "1"  # log lines reach the test as they are written
        env.update(self.env)
        self.proc = subprocess.Popen(
            self.command(),
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        wanted = self.wanted_listeners
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if len(LISTENING.findall(self.output)) >= wanted and "poe-openai: answering" in (
                self.output
            ):
                return self
            if self.proc.poll() is not None:
                time.sleep(0.2)
                raise RuntimeError(f"mitmdump exited {self.proc.returncode}:\n{self.output}")
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mitmdump did not start:\n{self.output}")

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(2)
        return self.proc.returncode

    def __enter__(self) -> Mitmdump:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def status(self, timeout: float = 20) -> dict[str, object]:
        """The addon's status line, asked for with SIGUSR1."""
        import json

        assert self.proc is not None
        before = len(self.lines)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            # Resent each second: a signal can be lost while the event loop is flooded.
            self.proc.send_signal(signal.SIGUSR1)
            resend = time.monotonic() + 1
            while time.monotonic() < min(resend, deadline):
                for line in self.lines[before:]:
                    if "poe-openai status: " in line:
                        return json.loads(line.split("poe-openai status: ", 1)[1])  # type: ignore[no-any-return]
                time.sleep(0.02)
        raise RuntimeError("no status line")

    # --- clients ------------------------------------------------------------------------------

    @property
    def reverse_url(self) -> str:
        return f"http://127.0.0.1:{self.reverse_port}/v1"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    @property
    def ca_file(self) -> Path:
        return self.confdir / "mitmproxy-ca-cert.pem"

    def ssl_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_file))

    def reverse_client(self, api_key: str = "client-key", **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(
            api_key=api_key,
            base_url=self.reverse_url,
            max_retries=0,
            http_client=httpx.Client(trust_env=False, timeout=30),
            **kwargs,  # type: ignore[arg-type]
        )

    def proxy_client(self, api_key: str = "client-key", **kwargs: object) -> openai.OpenAI:
        """The SDK with its default base URL (https://api.openai.com), through the proxy."""
        return openai.OpenAI(
            api_key=api_key,
            max_retries=0,
            http_client=httpx.Client(
                proxy=self.proxy_url, verify=self.ssl_context(), trust_env=False, timeout=30
            ),
            **kwargs,  # type: ignore[arg-type]
        )

    def http(self, **kwargs: object) -> httpx.Client:
        """A raw HTTP client for the reverse listener."""
        kwargs.setdefault("timeout", 30)
        return httpx.Client(
            base_url=f"http://127.0.0.1:{self.reverse_port}",
            trust_env=False,
            **kwargs,  # type: ignore[arg-type]
        )
