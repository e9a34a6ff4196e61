"""Configuration at unit level: value parsing, the addon's own reading of mitmproxy's deferred
options, refusals at start-up and at run time, the loopback test, the plain server's env."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path

import pytest
from mitmproxy import exceptions, optmanager
from mitmproxy.addons.proxyserver import Proxyserver
from mitmproxy.test import taddons, tflow

from addon.config import (
    ENV,
    ConfigError,
    is_loopback_host,
    parse_bool,
    parse_int,
    parse_settings,
)
from addon.poe_openai import OPTIONS, PoeOpenAI, take_own_deferred
from addon.standalone import build, create, settings_from_env

REPO = Path(__file__).resolve().parent.parent


def settings(**kw: object) -> object:
    args: dict[str, object] = {
        "poe_api_key": "",
        "poe_access_tokens": [],
        "poe_mappings": "mappings/default.yaml",
        "poe_hosts": ["api.openai.com"],
        "poe_base_url": "https://api.poe.com/bot/",
        "poe_upload_url": "https://www.quora.com/poe_api/",
        "poe_proxy": "",
        "environ": {},
    }
    args.update(kw)
    return parse_settings(**args)  # type: ignore[arg-type]


# --- values ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [(w, True) for w in ("true", "1", "yes", "on", "TRUE", " Yes ")]
    + [(w, False) for w in ("false", "0", "no", "off", "Off")],
)
def test_booleans_take_the_usual_spellings(text: str, value: bool) -> None:
    assert parse_bool(text, "poe_allow_open_relay") is value


@pytest.mark.parametrize("text", ["maybe", "", "2", "tru"])
def test_other_booleans_are_refused_by_name(text: str) -> None:
    with pytest.raises(ConfigError, match="poe_allow_open_relay="):
        parse_bool(text, "poe_allow_open_relay")
    with pytest.raises(ConfigError, match=r"POE_ALLOW_OPEN_RELAY=.*POE_ALLOW_OPEN_RELAY=true"):
        parse_bool(text, "poe_allow_open_relay", ENV)


def test_integers() -> None:
    assert parse_int(" 30 ", "poe_idle_timeout_s") == 30
    for bad in ("abc", "1.5", "", "1e3"):
        with pytest.raises(ConfigError, match=r"poe_idle_timeout_s=.* is not a whole number"):
            parse_int(bad, "poe_idle_timeout_s")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.3.4.5", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LocalHost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("", False),
        ("1.2.3", False),  # (inet_aton would read it as 1.2.0.3: never guess)
        ("192.168.1.10", False),
        ("my-laptop.local", False),
        ("fe80::1%eth0", False),
    ],
)
def test_one_loopback_test(host: str, loopback: bool) -> None:
    assert is_loopback_host(host) is loopback


# --- key file -------------------------------------------------------------------------------


def test_key_file_comments_after_a_key_are_not_keys(tmp_path: Path) -> None:
    keys = tmp_path / "keys.txt"
    keys.write_text(
        "# my keys\n"
        "poe-test-key  # second\n"
        "  key-two\t# tabbed comment\n"
        "key#three\n"  # a '#' inside a key (no space before it) is part of the key
        "\n   # indented comment\n"
    )
    assert settings(poe_api_key_file=str(keys)).api_keys == ("poe-test-key", "key-two", "key#three")


def test_key_file_mistakes_are_one_message(tmp_path: Path) -> None:
    only_comments = tmp_path / "comments.txt"
    only_comments.write_text("# nothing\n  # here\n")
    with pytest.raises(ConfigError, match="holds no key"):
        settings(poe_api_key_file=str(only_comments))
    binary = tmp_path / "binary.txt"
    binary.write_bytes(b"\xff\xfe\x00key")
    with pytest.raises(ConfigError, match="is not a UTF-8 text file"):
        settings(poe_api_key_file=str(binary))
    with pytest.raises(ConfigError, match=r"POE_API_KEY_FILE=.*cannot read it"):
        settings(poe_api_key_file=str(tmp_path), spelling=ENV)


def test_urls_with_a_bad_port_and_passwords_in_messages() -> None:
    with pytest.raises(ConfigError) as info:
        settings(poe_proxy="http://user:hunter2@127.0.0.1:abc")
    assert "hunter2" not in str(info.value) and "http://***@127.0.0.1:abc" in str(info.value)
    with pytest.raises(ConfigError, match="poe_base_url="):
        settings(poe_base_url="http://127.0.0.1:99999/bot/")


# --- mitmproxy's deferred options, read by the addon ----------------------------------------


def deferred(*specs: str, **yaml_values: object) -> optmanager.OptManager:
    options = optmanager.OptManager()
    options.set(*specs, defer=True)  # as mitmproxy does with --set before scripts load
    options.update_defer(**yaml_values)  # as it does with config.yaml
    return options


def test_own_deferred_values_are_parsed_with_the_addons_rules() -> None:
    options = deferred(
        "poe_allow_open_relay=yes",
        "poe_idle_timeout_s= 30",
        "poe_hosts=a.example",
        "poe_hosts=b.example",
        "poe_api_key=k",
        "poe_stream_store_limit",  # (handled below: an int needs a value)
        "other_option=x",
    )
    values, problems = take_own_deferred(options)
    assert values == {
        "poe_allow_open_relay": True,
        "poe_idle_timeout_s": 30,
        "poe_hosts": ["a.example", "b.example"],
        "poe_api_key": "k",
    }
    assert problems == [
        "--set poe_stream_store_limit needs a value: --set poe_stream_store_limit=VALUE"
    ]
    assert set(options.deferred) == {"other_option"}  # not the addon's: left to mitmproxy


def test_own_deferred_mistakes_are_each_named() -> None:
    options = deferred(
        "poe_api_key=secret-a",
        "poe_api_key=secret-b",
        "poe_idle_timeout_s=abc",
        "poe_allow_open_relay=maybe",
        "poe_idel_timeout_s=5",
    )
    values, problems = take_own_deferred(options)
    assert values == {}
    text = "\n".join(problems)
    assert len(problems) == 4
    assert "poe_api_key is given 2 times" in text and "secret" not in text
    assert "poe_idle_timeout_s='abc'" in text
    assert "poe_allow_open_relay='maybe'" in text
    assert "did you mean poe_idle_timeout_s?" in text


def test_config_yaml_values() -> None:
    values, problems = take_own_deferred(
        deferred(
            poe_allow_open_relay="on",
            poe_max_body_mb=8,
            poe_hosts="one.example",
            poe_api_key=12345,
            poe_keepalive_s=True,
            poe_access_tokens=[1],
        )
    )
    assert values == {
        "poe_allow_open_relay": True,
        "poe_max_body_mb": 8,
        "poe_hosts": ["one.example"],
        "poe_api_key": "12345",
    }
    assert len(problems) == 2


def test_every_option_takes_what_mitmproxy_would_give_it() -> None:
    # Each option's default, as a --set string, is taken back unchanged.
    specs = []
    for name, kind, default, _ in OPTIONS:
        if kind is bool:
            specs.append(f"{name}={'true' if default else 'false'}")
        elif isinstance(default, list):
            specs += [f"{name}={v}" for v in default]
        else:
            specs.append(f"{name}={default}")
    values, problems = take_own_deferred(deferred(*specs))
    assert problems == []
    for name, _, default, _ in OPTIONS:
        if default != []:
            assert values[name] == default, name


# --- the addon: start-up refusals, run-time refusals ------------------------------------------


def load_with(*specs: str) -> tuple[taddons.context, PoeOpenAI]:
    tctx = taddons.context(Proxyserver())
    tctx.options.set(*specs, defer=True)
    addon = PoeOpenAI()
    tctx.master.addons.add(addon)
    return tctx, addon


def cannot_start(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "cannot start" in r.getMessage()]


def test_a_bad_value_is_refused_once_and_flows_fail_closed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    tctx, addon = load_with("poe_idle_timeout_s=abc", "connection_strategy=eager")
    with tctx:
        tctx.configure(addon)
        tctx.configure(addon, connection_strategy="eager")  # a later change: still refused
        assert cannot_start(caplog) == [
            "poe-openai: cannot start: poe_idle_timeout_s='abc' is not a whole number; use "
            "e.g. --set poe_idle_timeout_s=120"
        ]
        assert tctx.options.connection_strategy == "lazy"  # nothing connects upstream
        flow = tflow.tflow()
        flow.request.host = "api.openai.com"
        addon.requestheaders(flow)
        assert flow.response is not None and flow.response.status_code == 503
        assert flow.response.headers["x-should-retry"] == "false"


@pytest.mark.parametrize(
    "options",
    [
        {"poe_access_tokens": ["t"]},
        {"poe_proxy": "ftp://x"},
        {"poe_idle_timeout_s": 0},
        {"poe_max_body_mb": 0},
        {"poe_mappings": "/no/such.yaml"},
        {"poe_stream_store_limit": -1},
        {"poe_response_store_size": 0},
        {"poe_api_key": "k", "mode": ["regular@0.0.0.0:8080"]},
    ],
)
def test_a_start_up_refusal_with_eager_connections_does_not_loop(
    options: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    """configure() used to set connection_strategy before judging; the refusal's rollback
    reset it and configure() ran again: the message 176 times, then RecursionError."""
    caplog.set_level(logging.INFO)
    addon = PoeOpenAI()
    with taddons.context(Proxyserver(), addon) as tctx:
        tctx.configure(addon, connection_strategy="eager", **options)
        assert len(cannot_start(caplog)) == 1, caplog.text[-2000:]
        assert "setting connection_strategy" not in caplog.text
        assert addon.settings is None


def test_a_refused_change_at_run_time_is_rolled_back(caplog: pytest.LogCaptureFixture) -> None:
    addon = PoeOpenAI()
    with taddons.context(Proxyserver(), addon) as tctx:
        tctx.configure(addon, poe_api_key="k", mode=["regular@127.0.0.1:8080"])
        working = addon.settings
        with pytest.raises(exceptions.OptionsError, match="poe_idle_timeout_s=0"):
            tctx.configure(addon, poe_idle_timeout_s=0, connection_strategy="eager")
        assert tctx.options.poe_idle_timeout_s == 120
        assert tctx.options.connection_strategy == "lazy"
        assert addon.settings == working
        assert cannot_start(caplog) == []


@pytest.mark.parametrize(
    ("mode", "exposed"),
    [
        ("wireguard", False),
        ("wireguard@51821", False),
        ("local", False),
        ("dns@0.0.0.0:5353", False),
        ("regular@[::1]:8080", False),
        ("regular@localhost:8080", False),
        ("reverse:https://api.openai.com@0.0.0.0:8000", True),
        ("socks5", True),
        ("upstream:http://up:3128@0.0.0.0:8080", True),
        ("transparent", True),
    ],
)
def test_which_listeners_make_an_open_relay(
    mode: str, exposed: bool, caplog: pytest.LogCaptureFixture
) -> None:
    addon = PoeOpenAI()
    with taddons.context(Proxyserver(), addon) as tctx:
        tctx.configure(addon, poe_api_key="k", mode=[mode])
        assert (addon.settings is None) is exposed
        assert ("open relay" in caplog.text) is exposed


def test_options_mitmproxy_never_applied_stop_start_up(caplog: pytest.LogCaptureFixture) -> None:
    """Had mitmproxy failed to apply the options for a reason of its own, the addon would
    have been dropped silently; the check scheduled in load() makes that a start-up error."""
    tctx, addon = load_with()
    with tctx:
        addon._check_configured()  # (what load() scheduled to run once loading is over)
        assert cannot_start(caplog) and "did not apply" in cannot_start(caplog)[0]
        tctx.configure(addon)
        caplog.clear()
        addon._check_configured()
        assert cannot_start(caplog) == []


def test_load_arms_the_check_for_options_never_applied(caplog: pytest.LogCaptureFixture) -> None:
    async def register_and_yield(configure: bool) -> None:
        tctx = taddons.context(Proxyserver())  # (inside a running loop: it uses that loop)
        addon = PoeOpenAI()
        tctx.master.addons.register(addon)  # load() and mitmproxy's deferred processing
        if configure:
            tctx.configure(addon)  # what script loading does next, when nothing failed
        await asyncio.sleep(0)

    asyncio.run(register_and_yield(configure=False))
    assert len(cannot_start(caplog)) == 1 and "did not apply" in cannot_start(caplog)[0]
    caplog.clear()
    asyncio.run(register_and_yield(configure=True))
    assert cannot_start(caplog) == []


# --- the plain server's environment --------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"POE_IDLE_TIMEOUT_S": "abc"}, "POE_IDLE_TIMEOUT_S"),
        ({"POE_HEADER_HOLD_S": "-1"}, "POE_HEADER_HOLD_S"),
        ({"POE_ACCESS_TOKENS": "t"}, "POE_ACCESS_TOKENS"),
        ({"POE_BASE_URL": "ftp://x"}, "POE_BASE_URL"),
        ({"POE_UPLOAD_URL": "nope"}, "POE_UPLOAD_URL"),
        ({"POE_PROXY": "gopher://x"}, "POE_PROXY"),
        ({"POE_MAPPINGS": "/no/such.yaml"}, "POE_MAPPINGS"),
        ({"POE_API_KEY_FILE": "/no/such.txt"}, "POE_API_KEY_FILE"),
        ({"POE_ACESS_TOKENS": "t"}, "POE_ACCESS_TOKENS"),
    ],
)
def test_plain_server_messages_name_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        settings_from_env(env)
    message = str(info.value)
    assert named in message
    assert "poe_" not in message and "--set" not in message


def test_plain_server_store_and_relay_variables(tmp_path: Path) -> None:
    broken = tmp_path / "map.yaml"
    broken.write_text("models: [\n")
    for env, named in (
        ({"POE_RESPONSE_STORE_SIZE": "0"}, "POE_RESPONSE_STORE_SIZE=0"),
        ({"POE_RESPONSE_STORE_MINUTES": "x"}, "POE_RESPONSE_STORE_MINUTES='x'"),
        ({"POE_ALLOW_OPEN_RELAY": "maybe"}, "POE_ALLOW_OPEN_RELAY='maybe'"),
        ({"POE_MAPPINGS": str(broken)}, "POE_MAPPINGS: "),
    ):
        with pytest.raises(ConfigError, match=named):
            build(env)
    app = build({"POE_RESPONSE_STORE_SIZE": "7", "POE_UNRELATED_TOOL": "x"})
    assert app is not None


def test_factory_ends_the_process_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        create({"POE_IDLE_TIMEOUT_S": "abc"})
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "POE_IDLE_TIMEOUT_S='abc'" in err


def test_the_addon_loads_without_the_resource_module() -> None:
    """Windows has no `resource` module."""
    code = (
        "import sys; sys.modules['resource'] = None\n"
        "import addon.poe_openai, addon.status\n"
        "print('rss', addon.status.rss_mb())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("rss ")


@pytest.mark.parametrize("host", ["https://api.openai.com", "api.openai.com/v1", "api openai"])
def test_a_host_that_could_never_match_is_refused(host: str) -> None:
    """Before, a URL in poe_hosts was accepted and matched nothing: the calls it meant to
    answer went to OpenAI."""
    with pytest.raises(ConfigError, match=r"poe_hosts holds .* not a host name"):
        settings(poe_hosts=[host])
    assert settings(poe_hosts=["API.OpenAI.com:443", " example.org "]).hosts == {
        "api.openai.com",
        "example.org",
    }


def test_a_mappings_file_that_is_not_text_is_one_message(tmp_path: Path) -> None:
    bad = tmp_path / "map.yaml"
    bad.write_bytes(b"\xff\xfe models")
    addon = PoeOpenAI()
    with taddons.context(Proxyserver(), addon) as tctx:
        tctx.configure(addon, poe_mappings=str(bad))
        assert addon.settings is None  # refused (logged), not a traceback
    with pytest.raises(ConfigError, match=r"POE_MAPPINGS: .*not UTF-8 text"):
        build({"POE_MAPPINGS": str(bad)})
