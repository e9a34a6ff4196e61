"""Model names that just work: the default map covers the ids current OpenAI clients send, dated
snapshots resolve to their family, and any other name is matched, whatever its case, against
the bots Poe publishes (its model list, learned in the background at start-up)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import POE_KEY, poe_options
from fake_poe import FakePoe, text
from harness import REPO, Mitmdump, assert_no_traceback, free_port
from test_standalone import start, wait_port

from addon import catalog
from addon.catalog import CatalogError, PoeBots, parse_model_list
from addon.config import ConfigError, parse_settings
from addon.mappings import ModelMap, load_mappings

USER = [{"role": "user", "content": "hi"}]
DEFAULT_MAP = load_mappings(REPO / "mappings" / "default.yaml")

# OpenAI's ids as clients send them -> the Poe bot of the same model, as Poe spells it.
CURRENT_IDS = {
    "gpt-5": "GPT-5",
    "gpt-5-mini": "GPT-5-mini",
    "gpt-5-nano": "GPT-5-nano",
    "gpt-5-chat-latest": "GPT-5-Chat",
    "gpt-5-codex": "GPT-5-Codex",
    "gpt-5-pro": "GPT-5-Pro",
    "gpt-4.1": "GPT-4.1",
    "gpt-4.1-mini": "GPT-4.1-mini",
    "gpt-4.1-nano": "GPT-4.1-nano",
    "gpt-4o": "GPT-4o",
    "gpt-4o-mini": "GPT-4o-Mini",
    "o1": "o1",
    "o3": "o3",
    "o3-mini": "o3-mini",
    "o3-pro": "o3-pro",
    "o4-mini": "o4-mini",
    "chatgpt-4o-latest": "ChatGPT-4o-Latest",
    "dall-e-3": "DALL-E-3",
    "gpt-image-1": "GPT-Image-1",
}


# --- the default map ---------------------------------------------------------------------------


@pytest.mark.parametrize(("model", "bot"), CURRENT_IDS.items())
def test_default_map_covers_current_openai_ids(model: str, bot: str) -> None:
    assert DEFAULT_MAP.bot_for(model) == bot
    assert DEFAULT_MAP.is_mapped(model)
    assert model in DEFAULT_MAP.names() or model.casefold() in {
        n.casefold() for n in DEFAULT_MAP.names()
    }


@pytest.mark.parametrize(
    ("model", "bot"),
    [
        ("gpt-4o-2024-08-06", "GPT-4o"),
        ("gpt-5-2025-08-07", "GPT-5"),
        ("gpt-5-mini-2025-08-07", "GPT-5-mini"),
        ("gpt-4o-mini-2024-07-18", "GPT-4o-Mini"),
        ("o3-mini-2025-01-31", "o3-mini"),
        ("gpt-4.1-2025-04-14", "GPT-4.1"),
        ("gpt-4-0613", "GPT-4"),
        ("GPT-4O-2024-08-06", "GPT-4o"),  # in any case too
    ],
)
def test_dated_snapshots_resolve_to_their_family(model: str, bot: str) -> None:
    assert DEFAULT_MAP.bot_for(model) == bot
    assert DEFAULT_MAP.is_mapped(model)


@pytest.mark.parametrize(
    "model",
    [
        "Some-Bot-2024",  # a family that is not mapped: the name as written
        "2024-08-06",  # nothing before the date
        "gpt-4o-2024-08",  # not a whole date
        "gpt-4o-20240806",  # not OpenAI's spelling
        "gpt-4o-2024-08-06-extra",
    ],
)
def test_names_that_are_not_snapshots_of_a_mapped_model_go_as_written(model: str) -> None:
    assert DEFAULT_MAP.bot_for(model) == model
    assert not DEFAULT_MAP.is_mapped(model)


# --- Poe's published bots, as units --------------------------------------------------------------


def learned(*names: str) -> PoeBots:
    bots = PoeBots()
    bots.learn(list(names), "test")
    return bots


def test_published_bots_match_in_any_case_after_the_map() -> None:
    m = ModelMap({"gpt-4o": "GPT-4o", "mine": "My-Bot"}).with_published(
        learned("Claude-Opus-4.1", "GPT-4o", "mine", "Gemini-2.5-Flash")
    )
    assert m.bot_for("claude-opus-4.1") == "Claude-Opus-4.1"
    assert m.bot_for("CLAUDE-OPUS-4.1") == "Claude-Opus-4.1"
    assert m.bot_for("mine") == "My-Bot"  # the map wins over Poe's list
    assert m.bot_for("gemini-2.5-flash-2025-06-17") == "Gemini-2.5-Flash"  # family, published
    assert m.bot_for("Nobody-Knows") == "Nobody-Knows"
    assert m.is_mapped("claude-opus-4.1") and not m.is_mapped("Nobody-Knows")
    # the map's names, then Poe's bots the map does not name (in any case)
    assert m.names() == ["gpt-4o", "mine", "Claude-Opus-4.1", "Gemini-2.5-Flash"]


def test_published_bots_are_shared_by_maps_loaded_later() -> None:
    bots = PoeBots()
    first = ModelMap({"a": "A"}).with_published(bots)
    reloaded = ModelMap({"b": "B"}).with_published(bots)
    bots.learn(["Late-Bot"], "test")  # learned after both maps were made
    assert first.bot_for("late-bot") == reloaded.bot_for("late-bot") == "Late-Bot"
    bots.forget("failed")
    assert first.bot_for("late-bot") == "late-bot"


def test_parse_model_list() -> None:
    data = {
        "object": "list",
        "data": [
            {"id": "GPT-5", "object": "model", "created": 1, "owned_by": "OpenAI"},
            {"id": "GPT-5"},  # repeated
            {"id": "has space"},  # not a bot name: skipped
            {"id": 7},
            "not an object",
            {"no": "id"},
            {"id": "x" * 101},  # too long for a bot name
            {"id": "Claude-Sonnet-4.5"},
        ],
    }
    assert parse_model_list(data) == ["GPT-5", "Claude-Sonnet-4.5"]
    assert parse_model_list({"object": "list", "data": []}) == []
    for bad in ([], {"data": {}}, {"object": "list"}, "list", None):
        with pytest.raises(CatalogError):
            parse_model_list(bad)
    too_many = {"data": [{"id": f"Bot-{i}"} for i in range(catalog.MAX_BOTS + 1)]}
    with pytest.raises(CatalogError):
        parse_model_list(too_many)
    at_limit = {"data": [{"id": f"Bot-{i}"} for i in range(catalog.MAX_BOTS)]}
    assert len(parse_model_list(at_limit)) == catalog.MAX_BOTS


def settings_with(**values: str) -> object:
    base = {
        "poe_api_key": "",
        "poe_access_tokens": [],
        "poe_mappings": "mappings/default.yaml",
        "poe_hosts": ["api.openai.com"],
        "poe_base_url": "https://api.poe.com/bot/",
        "poe_upload_url": "https://www.quora.com/poe_api/",
        "poe_proxy": "",
    }
    return parse_settings(**{**base, **values})  # type: ignore[arg-type]


def test_models_url_option() -> None:
    assert settings_with().models_url == "https://api.poe.com/v1/models"  # type: ignore[attr-defined]
    derived = settings_with(poe_base_url="http://127.0.0.1:9/bot/")
    assert derived.models_url == "http://127.0.0.1:9/v1/models"  # type: ignore[attr-defined]
    assert settings_with(poe_models_url="").models_url is None  # type: ignore[attr-defined]
    own = settings_with(poe_models_url="https://example.test/models")
    assert own.models_url == "https://example.test/models"  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="poe_models_url='ftp://x' is not an http"):
        settings_with(poe_models_url="ftp://x")


def test_learn_fails_in_one_warning_and_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    bots = learned("Old-Bot")
    url = f"http://127.0.0.1:{free_port()}/v1/models"  # nothing listens there
    asyncio.run(catalog.learn(bots, url, None))
    warnings = [r for r in caplog.records if "could not fetch Poe's bot list" in r.getMessage()]
    assert len(warnings) == 1 and "ConnectError" in warnings[0].getMessage()
    assert bots.state == "failed" and len(bots) == 0


# --- through the proxy -------------------------------------------------------------------------


@pytest.fixture
def own_poe() -> Iterator[FakePoe]:
    """A stand-in Poe of this test's own: what it publishes is read once, at start-up."""
    with FakePoe(api_keys=(POE_KEY,)) as fake:
        yield fake


def wait_for(m: Mitmdump, needle: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while needle not in m.output and time.monotonic() < deadline:
        time.sleep(0.05)
    assert needle in m.output, m.output[-3000:]


def ids(m: Mitmdump) -> list[str]:
    with m.http() as http:
        return [x["id"] for x in http.get("/v1/models").json()["data"]]


def test_default_ids_reach_their_poe_bots(proxy: Mitmdump, fake_poe: FakePoe) -> None:
    # What Lobe Chat sends by default (gpt-5-mini, with a developer prompt for titles).
    fake_poe.script("GPT-5-mini", [text("from GPT-5-mini")])
    fake_poe.script("GPT-4o", [text("from GPT-4o")])
    client = proxy.reverse_client()
    messages = [{"role": "developer", "content": "Give a title."}, *USER]
    answer = client.chat.completions.create(model="gpt-5-mini", messages=messages)  # type: ignore[arg-type]
    assert answer.choices[0].message.content == "from GPT-5-mini"
    assert answer.model == "gpt-5-mini"
    snapshot = client.chat.completions.create(model="gpt-4o-2024-08-06", messages=USER)  # type: ignore[arg-type]
    assert snapshot.choices[0].message.content == "from GPT-4o"
    assert client.models.retrieve("gpt-5-2025-08-07").id == "gpt-5-2025-08-07"


def test_unmapped_names_match_poe_published_bots(own_poe: FakePoe) -> None:
    own_poe.published = ["Poe-Only-Bot", "GPT-4o"]  # GPT-4o: the map names it already
    own_poe.script("Poe-Only-Bot", [text("published bot")])
    with Mitmdump(options=poe_options(own_poe), env={"POE_API_KEY": POE_KEY}, regular=False) as m:
        wait_for(m, "learned 2 Poe bots from")
        client = m.reverse_client()
        answer = client.chat.completions.create(model="poe-only-bot", messages=USER)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "published bot"
        assert answer.model == "poe-only-bot"
        listed = ids(m)
        assert listed[: len(DEFAULT_MAP.models)] == list(DEFAULT_MAP.models)
        assert listed[len(DEFAULT_MAP.models) :] == ["Poe-Only-Bot"]
        assert client.models.retrieve("POE-ONLY-BOT").id == "POE-ONLY-BOT"
        status = m.status()
        assert status["poe_bots"] == {
            "source": f"http://127.0.0.1:{own_poe.port}/v1/models",
            "state": "learned",
            "bots": 2,
        }
        output = m.output
    assert [r.bot for r in own_poe.requests_for("Poe-Only-Bot")] == ["Poe-Only-Bot"]
    assert own_poe.model_list_fetches == 1
    assert_no_traceback(output)


@pytest.mark.parametrize("failure", ["HTTP 503", "not a list", "unreachable"])
def test_poe_list_unreachable_falls_back_to_the_map(own_poe: FakePoe, failure: str) -> None:
    own_poe.published = ["Poe-Only-Bot"]
    options = poe_options(own_poe)
    if failure == "HTTP 503":
        own_poe.published_status = 503
    elif failure == "not a list":
        options["poe_models_url"] = f"http://127.0.0.1:{own_poe.port}/cdn/nothing"
        own_poe.host_file("nothing", b'{"data": "no"}', "application/json")
    else:
        options["poe_models_url"] = f"http://127.0.0.1:{free_port()}/v1/models"
    own_poe.script("poe-only-bot", [text("as written")])
    own_poe.script("GPT-5-mini", [text("mapped")])
    with Mitmdump(options=options, env={"POE_API_KEY": POE_KEY}, regular=False) as m:
        wait_for(m, "could not fetch Poe's bot list")
        client = m.reverse_client()
        answer = client.chat.completions.create(model="poe-only-bot", messages=USER)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "as written"
        assert ids(m) == list(DEFAULT_MAP.models)
        assert client.chat.completions.create(model="gpt-5-mini", messages=USER)  # map still works
        output = m.output
    warnings = [line for line in output.splitlines() if "could not fetch Poe's bot list" in line]
    assert len(warnings) == 1, output
    assert "model names not in the map go to Poe as written" in warnings[0]
    assert_no_traceback(output)


def test_poe_list_off(own_poe: FakePoe) -> None:
    own_poe.published = ["Poe-Only-Bot"]
    opts = poe_options(own_poe, poe_models_url="")
    with Mitmdump(options=opts, env={"POE_API_KEY": POE_KEY}, regular=False) as m:
        assert "Poe's bot list: off (poe_models_url is empty)" in m.output
        assert ids(m) == list(DEFAULT_MAP.models)
        assert m.status()["poe_bots"]["state"] == "off"  # type: ignore[index]
    assert own_poe.model_list_fetches == 0


def test_a_slow_poe_list_delays_neither_start_up_nor_requests(own_poe: FakePoe) -> None:
    own_poe.published = ["Slow-Listed-Bot"]
    own_poe.published_delay = 60
    own_poe.script("Some-Bot", [text("at once")])
    began = time.monotonic()
    with Mitmdump(options=poe_options(own_poe), env={"POE_API_KEY": POE_KEY}, regular=False) as m:
        assert "learning Poe's bots from" in m.output
        answer = m.reverse_client().chat.completions.create(model="Some-Bot", messages=USER)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "at once"
        assert time.monotonic() - began < 30  # (the list takes 60 s)
        assert own_poe.model_list_fetches == 1
        code = m.stop()  # with the fetch still waiting
    assert code == 0
    assert_no_traceback(m.output)


def test_plain_server_learns_poe_bots(own_poe: FakePoe) -> None:
    own_poe.published = ["Poe-Only-Bot"]
    own_poe.script("Poe-Only-Bot", [text("plain and published")])
    port = free_port()
    env = {
        "POE_API_KEY": POE_KEY,
        "POE_BASE_URL": own_poe.base_url,
        "POE_UPLOAD_URL": own_poe.upload_url,
        "POE_MODELS_URL": f"http://127.0.0.1:{own_poe.port}/v1/models",
    }
    proc = start(["serve", "--port", str(port)], env)
    try:
        wait_port(port, proc)
        deadline = time.monotonic() + 15
        while own_poe.model_list_fetches == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
            for _ in range(100):  # the fetch is answered; its result lands a moment later
                listed = [x["id"] for x in http.get("/v1/models").json()["data"]]
                if "Poe-Only-Bot" in listed:
                    break
                time.sleep(0.1)
            assert listed[-1] == "Poe-Only-Bot"
            r = http.post("/v1/chat/completions", json={"model": "POE-only-bot", "messages": USER})
        assert r.json()["choices"][0]["message"]["content"] == "plain and published"
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=15)
    assert "learned 1 Poe bots from" in out


def test_plain_server_models_url_names_the_variable(tmp_path: Path) -> None:
    from addon.standalone import settings_from_env

    with pytest.raises(ConfigError, match="POE_MODELS_URL='nope' is not an http"):
        settings_from_env({"POE_MODELS_URL": "nope"})
    assert settings_from_env({"POE_MODELS_URL": ""}).models_url is None


def test_a_map_reload_keeps_the_learned_bots(own_poe: FakePoe, tmp_path: Path) -> None:
    mapping = tmp_path / "map.yaml"
    mapping.write_text("models:\n  my-model: GPT-4o\n")
    own_poe.published = ["Poe-Only-Bot"]
    own_poe.script("Poe-Only-Bot", [text("still published")])
    opts = poe_options(own_poe, poe_mappings=str(mapping))
    with Mitmdump(options=opts, env={"POE_API_KEY": POE_KEY}, regular=False) as m:
        wait_for(m, "learned 1 Poe bots from")
        assert ids(m) == ["my-model", "Poe-Only-Bot"]
        time.sleep(1.1)  # (a new modification time for the watcher)
        mapping.write_text("models:\n  my-model: GPT-4o\n  other: GPT-5\n")
        wait_for(m, "2 mapped models from")
        assert ids(m) == ["my-model", "other", "Poe-Only-Bot"]
        answer = m.reverse_client().chat.completions.create(model="poe-only-bot", messages=USER)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "still published"
