"""Start the proxy without bash (Windows, macOS, or anywhere the package is installed):

python -m addon [mitmdump arguments...]        # what ./run.sh does
python -m addon serve [--host H] [--port P]    # the plain server, without mitmproxy
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ADDON = Path(__file__).resolve().parent / "poe_openai.py"


def run_proxy(args: list[str]) -> int:
    from mitmproxy.tools.main import mitmdump

    if not any(a in ("--mode", "-m") or a.startswith(("--mode=", "-m")) for a in args):
        args = ["--mode", "regular@127.0.0.1:8080", *args]
    mitmdump(["-s", str(ADDON), *args])
    return 0


def serve(args: list[str]) -> int:
    import uvicorn

    from addon.config import ConfigError, is_loopback_host
    from addon.standalone import build, open_relay, settings_from_env

    parser = argparse.ArgumentParser(prog="python -m addon serve")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=8000)
    options = parser.parse_args(args)
    try:
        relay = open_relay(settings_from_env(), os.environ)
        app = build(os.environ, address=f"{options.host}:{options.port}" if options.port else None)
    except ConfigError as e:
        print(f"poe-openai: cannot start: {e}", file=sys.stderr)
        return 2
    if relay and not is_loopback_host(options.host):
        # (the app would refuse other machines' requests anyway: say so before starting)
        print(
            f"poe-openai: cannot start: refusing to start an open relay: a Poe key is "
            f"configured and {options.host} can be reached from other machines with no client "
            "auth. Listen on 127.0.0.1 (--host 127.0.0.1), set POE_ACCESS_TOKENS=<token>, or "
            "set POE_ALLOW_OPEN_RELAY=true.",
            file=sys.stderr,
        )
        return 2
    uvicorn.run(app, host=options.host, port=options.port, log_level="info")
    return 0


def port_number(text: str) -> int:
    """A TCP port (0: any free one); argparse turns the error into a usage line."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def main(argv: list[str]) -> int:
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    return run_proxy(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
