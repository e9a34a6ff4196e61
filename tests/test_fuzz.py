"""Property-based fuzzing of the HTTP surface of the real proxy (hypothesis).

Every request goes through the session's real mitmdump (the ``proxy`` fixture, reverse
listener) to the addon and, for valid bodies, on to the stand-in Poe server. Five strategies,
one test each: chat bodies, completions/responses/images bodies, arbitrary headers, methods x paths,
and content types x raw bodies. The property checked for every answer (``check_answer``):

* the status is one of ``ALLOWED`` (never 500, never another 5xx of our own making: a 502/504
  must carry one of the bot-caused codes in ``BOT_CAUSED``);
* no "Traceback" in the body;
* a non-2xx body is JSON in OpenAI's error shape (``ErrorResponse``);
* a 200 JSON body matches OpenAI's schema for its object, a 200 SSE body is ``data:`` lines
  of JSON objects (chunks, Responses events or an ``error`` envelope) or ``[DONE]``;
* a 200 from Poe is never turned into a 5xx by the proxy (``check_poe_answer_kept``).

Speed: 10,000 requests through a real mitmdump cannot be quick. mitmdump spends ~4 ms of CPU
on a flow the addon refuses and ~12 ms on one that reaches the stand-in Poe; this process
spends ~3-10 ms on each example (hypothesis generating it, httpx, the stand-in Poe answering,
the checks). One request after another would take three minutes; so each strategy runs
``WORKERS`` copies of its ``@given`` test in threads, each with its own fixed ``@seed`` and
``EXAMPLES / WORKERS`` examples (hypothesis supports running tests from several threads),
all sending through one shared ``httpx.Client``, and this process generates while mitmdump
answers. The strategies are shaped for cheap generation (``fixed``: a few optional keys per
body; ``weighted``: mostly near-valid values) and about a quarter of the bodies are valid
enough to reach the stand-in Poe. A failure found by a worker is shrunk by that worker and
re-raised by the test with hypothesis' "Falsifying example" note.

Figures (examples per strategy, answers by status) go to ``$FIGURES_DIR/fuzz.json`` when that
variable is set.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.parse
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fake_poe import FakePoe, echo, error, file, text
from figures import record
from harness import Mitmdump
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from openapi_schema import validate

EXAMPLES = 2000  # per strategy, at least
WORKERS = 4
SEED = 20_240_601

ALLOWED = frozenset({200, 204, 400, 401, 403, 404, 405, 413, 422, 429, 502, 504})
# 502/504 codes that mean "the bot (or Poe) failed", not "the proxy failed"
BOT_CAUSED = frozenset(
    {
        "poe_error",
        "poe_unreachable",
        "timeout",
        "no_image",
        "invalid_json_output",
        "image_fetch_failed",
    }
)
# Scripted on the stand-in Poe server before the tests.
OK_BOTS = ("Fuzz-Ok", "Fuzz-Ok-2")
ECHO_BOT = "Fuzz-Echo"
JSON_BOT = "Fuzz-Json"  # answers JSON, so response_format json_object can succeed
ERROR_BOT = "Fuzz-Error"  # an in-band bot error: a 502 poe_error
IMAGE_BOT = "Fuzz-Image"  # answers with a picture (a file event; its bytes on the CDN)
GOOD_BOTS = (*OK_BOTS, ECHO_BOT)
# Bots that answer every query with HTTP 200 and a whole answer: nothing the proxy does after
# that (counting, rendering, storing) may make it a 5xx or a failed stream. Only an answer that
# does not fit what the client asked may still be refused: not JSON (except from the bot that
# answers JSON), no picture (except from the bot that draws).
ANSWERING_BOTS = frozenset({*GOOD_BOTS, JSON_BOT, IMAGE_BOT})
MISFIT_FROM = {"invalid_json_output": JSON_BOT, "no_image": IMAGE_BOT}

HYPOTHESIS = settings(
    max_examples=-(-EXAMPLES // WORKERS),
    deadline=None,
    database=None,
    derandomize=False,  # each worker has its own fixed @seed instead
    print_blob=False,
    phases=(Phase.explicit, Phase.generate, Phase.shrink),
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# --------------------------------------------------------------------------- strategies


def words(s: str) -> list[str]:
    return s.split()


def weighted(*pairs: tuple[int, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """one_of with integer weights: a branch of weight w is drawn about w times as often (the
    first a little more still: hypothesis favours small integers). st.one_of cannot weigh its
    branches: it drops repeated ones, even wrapped in st.deferred."""
    table = [s for w, s in pairs for _ in range(w)]

    def branch(i: int) -> st.SearchStrategy[Any]:  # a named function: a short repr
        return table[i]

    return st.integers(0, len(table) - 1).flatmap(branch)


def or_junk(strategy: st.SearchStrategy[Any], weight: int = 3) -> st.SearchStrategy[Any]:
    return weighted((weight, strategy), (1, JSON))


def fixed(
    required: dict[str, st.SearchStrategy[Any]],
    optional: dict[str, st.SearchStrategy[Any]] | None = None,
    most: int = 3,
) -> st.SearchStrategy[dict[str, Any]]:
    """Like st.fixed_dictionaries, but at most ``most`` optional keys, drawn as a short list of
    (key, value) pairs: far fewer choices per example than one presence flag per key, which
    keeps generation cheap (hypothesis spends ~70 us per choice, under the GIL)."""
    if not optional:
        return st.fixed_dictionaries(required)
    pair = st.one_of([st.tuples(st.just(k), v) for k, v in optional.items()])
    return st.tuples(st.fixed_dictionaries(required), st.lists(pair, max_size=most)).map(
        lambda t: {**t[0], **dict(t[1])}
    )


def _with_case(pair: tuple[str, int]) -> str:
    name, mask = pair
    return "".join(c.upper() if mask >> i & 1 else c for i, c in enumerate(name))


def case_variants(name: str) -> st.SearchStrategy[str]:
    """``name`` in random upper/lower case (one choice, not one per letter)."""
    return st.tuples(st.just(name), st.integers(0, 2**24)).map(_with_case)


# Strings: any unicode but surrogates, short ASCII; and in the fields that matter (TEXT), now
# and then lone surrogates: valid JSON ("\ud800") that no UTF-8 encoder takes.
PLAIN_TEXT = weighted(
    (4, st.text(max_size=24)),
    (1, st.text(st.characters(codec="ascii"), max_size=10)),
)
SURROGATES = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
TEXT = weighted((40, PLAIN_TEXT), (1, SURROGATES))
UTF8_TEXT = st.text(st.characters(codec="utf-8"), max_size=8)
FIELD_NAMES = words(
    "model messages role content type text image_url url file file_data filename file_id "
    "tools tool_choice function name arguments parameters properties required $defs "
    "definitions $ref items enum stream stream_options include_usage n stop max_tokens "
    "response_format json_schema schema input instructions prompt"
)
KEYS = weighted((3, PLAIN_TEXT), (1, st.sampled_from(FIELD_NAMES)))
SCHEMA_KEYS = words(
    "type properties required $defs definitions $ref items enum additionalProperties"
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.floats(),  # NaN and +-Infinity too: Python's json (the server's) accepts them
    PLAIN_TEXT,
)
JSON: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(KEYS, kids, max_size=3),
    max_leaves=4,
)

MODEL = weighted(
    (8, st.sampled_from(GOOD_BOTS)),
    (2, st.sampled_from((JSON_BOT, ERROR_BOT))),
    (
        1,
        st.sampled_from(
            [
                "gpt-4o",  # mapped to GPT-4o, which the stand-in does not know: 404
                "GPT-4O",
                "dall-e-3",
                "fuzz-ok",
                "Fuzz-Ok ",
                " Fuzz-Echo\t",
                "",
                " ",
                "Fuzz-Ok/x",
                "../Fuzz-Ok",
                "Fuzz-Ok?x=1",
                "Fuzz-Ok%2F",
                "Fuzz-Ok#",
                "a" * 101,
                "Fuzz-Unknown",
            ]
        ),
    ),
    (1, TEXT),
    (1, JSON),
    (1, SURROGATES),  # a model name that cannot be encoded goes into the error message
)

B64_DATA = st.binary(max_size=48).map(lambda b: base64.b64encode(b).decode())
DATA_URL = st.tuples(
    st.sampled_from(["image/png", "image/jpeg", "application/pdf", "text/plain", "x/y"]), B64_DATA
).map(lambda t: f"data:{t[0]};base64,{t[1]}")
URL = weighted(
    (3, DATA_URL),
    (
        1,
        st.sampled_from(
            [
                "https://example.com/cat.png",
                "http://example.com/",
                "https://example.com/a%20b.jpg?x=1#y",
                "https://user:pw@example.com:8443/x.webp",
            ]
        ),
    ),
    (
        1,
        st.sampled_from(
            [
                "",
                "data:",
                "data:image/png,abc",
                "data:image/png;base64,@@@",
                "data:image/png;base64,YWJj=",
                "data:;base64,",
                "data:image/png;charset=x;base64,AAAA",
                "ftp://example.com/x.png",
                "http://",
                "https:///x",
                "javascript:alert(1)",
                "file:///etc/passwd",
                "//example.com/x.png",
            ]
        ),
    ),
    (1, TEXT),
)
FILE_DATA = weighted(
    (3, B64_DATA),
    (2, DATA_URL),
    (1, st.sampled_from(["", "data:", "====", "@@", "QQ", "data:application/pdf;base64,"])),
    (1, TEXT),
    (1, JSON),
)
FN_NAME = weighted((3, st.sampled_from(["get_weather", "f", "lookup"])), (1, TEXT))
CALL_ID = weighted((3, st.sampled_from(["call_1", "call_2", ""])), (1, TEXT))

TEXT_PART = fixed({"type": st.just("text"), "text": or_junk(TEXT)})
IMAGE_PART = fixed(
    {
        "type": st.just("image_url"),
        "image_url": weighted(
            (
                3,
                fixed(
                    {"url": URL},
                    optional={"detail": or_junk(st.sampled_from(["auto", "low", "high"]))},
                ),
            ),
            (1, URL),
            (1, JSON),
        ),
    }
)
FILE_PART = fixed(
    {
        "type": st.just("file"),
        "file": or_junk(
            fixed(
                {},
                optional={
                    "file_data": FILE_DATA,
                    "filename": or_junk(st.sampled_from(["a.pdf", "b.txt", "c", ".png"]) | TEXT),
                    "file_id": or_junk(TEXT),
                },
            )
        ),
    }
)
OTHER_PART = fixed(
    {
        "type": weighted(
            (
                2,
                st.sampled_from(
                    [
                        "refusal",
                        "input_text",
                        "output_text",
                        "input_audio",
                        "image",
                        "audio",
                        "input_image",
                        "input_file",
                        "",
                    ]
                ),
            ),
            (1, TEXT),
            (1, JSON),
        )
    },
    optional={"text": JSON, "refusal": JSON, "input_audio": JSON, "image_url": JSON},
)
PART = weighted((5, TEXT_PART), (2, IMAGE_PART), (2, FILE_PART), (1, OTHER_PART), (1, JSON))
CONTENT = weighted(
    (5, TEXT), (3, st.lists(PART, min_size=1, max_size=2)), (1, st.none()), (1, JSON)
)
ROLE = weighted(
    (8, st.just("user")),
    (4, st.sampled_from(["system", "developer", "assistant", "tool", "function"])),
    (1, TEXT),
    (1, JSON),
)
TOOL_CALL = fixed(
    {
        "id": or_junk(CALL_ID),
        "type": or_junk(st.just("function")),
        "function": or_junk(fixed({"name": or_junk(FN_NAME)}, optional={"arguments": JSON})),
    }
)
MESSAGE = fixed(
    {"role": ROLE, "content": CONTENT},
    optional={
        "name": or_junk(TEXT),
        "tool_calls": weighted((3, st.lists(TOOL_CALL, max_size=2)), (1, JSON)),
        "tool_call_id": or_junk(CALL_ID),
        "function_call": JSON,
    },
    most=1,
)


def _tool_round(question: str, names: list[str], results: list[str]) -> list[dict[str, Any]]:
    calls = [
        {"id": f"call_{i}", "type": "function", "function": {"name": n, "arguments": "{}"}}
        for i, n in enumerate(names)
    ]
    answers = [
        {"role": "tool", "tool_call_id": f"call_{i}", "content": r} for i, r in enumerate(results)
    ]
    return [
        {"role": "user", "content": question},
        {"role": "assistant", "content": None, "tool_calls": calls},
        *answers,
    ]


TOOL_ROUND = st.builds(
    _tool_round, TEXT, st.lists(FN_NAME, min_size=1, max_size=3), st.lists(TEXT, max_size=3)
)
SIMPLE_MESSAGE = fixed(
    {"role": st.sampled_from(["system", "developer", "user", "assistant"]), "content": TEXT}
)
MESSAGES = weighted(
    (8, st.lists(MESSAGE, min_size=1, max_size=2)),
    (2, TOOL_ROUND),
    (1, st.just([])),
    (1, JSON),
)


def _ref_schema(a: str, b: str, where: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {"x": {"$ref": f"#/{where}/{a}"}},
        where: {a: {"$ref": f"#/{where}/{b}"}, b: {"type": "string"}},
    }


PARAMS = weighted(
    (
        3,
        fixed(
            {
                "type": st.just("object"),
                "properties": st.dictionaries(
                    FN_NAME,
                    fixed({"type": st.sampled_from(["string", "integer"])}),
                    max_size=3,
                ),
            },
            optional={
                "required": or_junk(st.lists(FN_NAME, max_size=2)),
                "additionalProperties": JSON,
            },
        ),
    ),
    # $refs into $defs/definitions, cycles included
    (
        1,
        st.builds(
            _ref_schema,
            st.sampled_from("AB"),
            st.sampled_from("AB"),
            st.sampled_from(["$defs", "definitions"]),
        ),
    ),
    # schema keywords with junk values
    (2, st.dictionaries(st.sampled_from(SCHEMA_KEYS), JSON, min_size=1, max_size=3)),
    (1, st.none()),
    (1, JSON),
)
TOOL = fixed(
    {
        "type": or_junk(st.just("function")),
        "function": or_junk(
            fixed(
                {"name": or_junk(FN_NAME)},
                optional={"description": or_junk(TEXT), "parameters": PARAMS, "strict": JSON},
            )
        ),
    }
)
TOOL_CHOICE = weighted(
    (2, st.sampled_from(["auto", "none", "required"])),
    (
        2,
        fixed(
            {
                "type": st.just("function"),
                "function": or_junk(fixed({"name": or_junk(FN_NAME)})),
            }
        ),
    ),
    (1, JSON),
)
RESPONSE_FORMAT = or_junk(
    fixed(
        {"type": or_junk(st.sampled_from(["text", "json_object", "json_schema"]))},
        optional={
            "json_schema": or_junk(
                fixed(
                    {"name": or_junk(TEXT)},
                    optional={"schema": PARAMS, "strict": JSON, "description": JSON},
                )
            )
        },
    ),
    weight=3,
)
STREAM = or_junk(st.booleans())
STREAM_OPTIONS = or_junk(fixed({}, optional={"include_usage": or_junk(st.booleans())}))
TEMPERATURE = weighted((4, st.floats(0, 2)), (1, st.floats()), (1, JSON))
STOP = weighted(
    (2, TEXT),
    (2, st.lists(TEXT, max_size=4)),
    (1, st.sampled_from(["", [""], ["ok"], "o", ["k", "o"], "\n", ["ok"] * 5])),
    (1, JSON),
)
COUNT = weighted((6, st.integers(1, 2)), (1, st.integers(-3, 12)), (1, JSON))
LIMIT = weighted((3, st.integers(1, 40)), (1, st.integers(-3, 2**70)), (1, JSON))
LOGIT_BIAS = or_junk(
    st.dictionaries(
        st.integers(0, 200_000).map(str),
        st.integers(-100, 100) | st.floats(),
        max_size=3,
    )
)
POE_PARAMETERS = or_junk(st.dictionaries(TEXT, JSON, max_size=3))
IGNORED = words(
    "user seed top_p frequency_penalty presence_penalty logprobs top_logprobs metadata store "
    "modalities audio prediction reasoning_effort service_tier web_search_options functions"
)
EXTRAS = st.dictionaries(weighted((2, st.sampled_from(IGNORED)), (1, TEXT)), JSON, max_size=1)


def _with_extras(pair: tuple[dict[str, Any], dict[str, Any]]) -> dict[str, Any]:
    body, extras = pair
    return {**extras, **body}


NEAR_VALID_CHAT = st.tuples(
    fixed(
        {"model": MODEL, "messages": MESSAGES},
        optional={
            "stream": STREAM,
            "stream_options": STREAM_OPTIONS,
            "temperature": TEMPERATURE,
            "stop": STOP,
            "n": COUNT,
            "max_tokens": LIMIT,
            "max_completion_tokens": LIMIT,
            "tools": or_junk(st.lists(TOOL, min_size=1, max_size=2), weight=3),
            "tool_choice": TOOL_CHOICE,
            "parallel_tool_calls": or_junk(st.booleans()),
            "response_format": RESPONSE_FORMAT,
            "logit_bias": LOGIT_BIAS,
            "poe_parameters": POE_PARAMETERS,
        },
        most=4,
    ),
    EXTRAS,
).map(_with_extras)
VALID_CHAT = fixed(
    {
        "model": st.sampled_from(GOOD_BOTS),
        "messages": st.lists(SIMPLE_MESSAGE, min_size=1, max_size=3),
    },
    optional={
        "stream": st.booleans(),
        "stream_options": fixed({"include_usage": st.booleans()}),
        "stop": st.lists(st.text(max_size=3), max_size=2),
        "max_tokens": st.integers(1, 20),
        "n": st.integers(1, 2),
        "temperature": st.floats(0, 2),
    },
)
CHAT_FIELDS = words(
    "model messages stream stream_options temperature stop n max_tokens max_completion_tokens "
    "tools tool_choice parallel_tool_calls response_format logit_bias poe_parameters"
)


def mutants(
    bodies: st.SearchStrategy[dict[str, Any]], fields: list[str]
) -> st.SearchStrategy[dict[str, Any]]:
    """``bodies`` with one of ``fields`` set to an arbitrary JSON value (or removed)."""

    def mutate(t: tuple[dict[str, Any], str, Any]) -> dict[str, Any]:
        body, name, value = t
        if value is None:
            return {k: v for k, v in body.items() if k != name}
        return {**body, name: value}

    return st.tuples(bodies, st.sampled_from(fields), JSON).map(mutate)


CHAT_BODY = weighted(
    (3, NEAR_VALID_CHAT),
    (4, mutants(NEAR_VALID_CHAT, CHAT_FIELDS)),
    (1, VALID_CHAT),
    (1, JSON),
)

PROMPT = weighted(
    (5, TEXT),
    (3, st.lists(TEXT, min_size=1, max_size=3)),
    (1, st.lists(st.integers(0, 50_000), max_size=4)),
    (1, st.lists(st.lists(st.integers(0, 100), max_size=3), max_size=2)),
    (1, st.just([])),
    (1, JSON),
)
COMPLETIONS_BODY = st.tuples(
    fixed(
        {"model": MODEL, "prompt": PROMPT},
        optional={
            "echo": or_junk(st.booleans()),
            "best_of": weighted((6, st.just(1)), (1, st.integers(0, 3)), (1, JSON)),
            "suffix": or_junk(TEXT),
            "n": COUNT,
            "max_tokens": LIMIT,
            "stop": STOP,
            "temperature": TEMPERATURE,
            "stream": STREAM,
            "stream_options": STREAM_OPTIONS,
            "logit_bias": LOGIT_BIAS,
            "poe_parameters": POE_PARAMETERS,
        },
        most=4,
    ),
    EXTRAS,
).map(_with_extras)

RESPONSE_PART = weighted(
    (3, fixed({"type": st.just("input_text"), "text": or_junk(TEXT)})),
    (
        1,
        fixed(
            {"type": st.just("output_text"), "text": or_junk(TEXT)}, optional={"annotations": JSON}
        ),
    ),
    (
        1,
        fixed(
            {"type": st.just("input_image")},
            optional={"image_url": or_junk(URL), "file_id": or_junk(TEXT), "detail": JSON},
        ),
    ),
    (
        1,
        fixed(
            {"type": st.just("input_file")},
            optional={
                "file_data": FILE_DATA,
                "filename": or_junk(TEXT),
                "file_id": or_junk(TEXT),
                "file_url": or_junk(URL),
            },
        ),
    ),
    (
        1,
        fixed(
            {"type": or_junk(st.sampled_from(["refusal", "text", "input_audio", ""]))},
            optional={"refusal": JSON, "text": JSON},
        ),
    ),
    (1, JSON),
)
RESPONSE_ITEM = weighted(
    (
        4,
        fixed(
            {
                "role": weighted(
                    (5, st.just("user")),
                    (2, st.sampled_from(["assistant", "system", "developer"])),
                    (1, TEXT),
                    (1, JSON),
                ),
                "content": weighted(
                    (3, TEXT), (2, st.lists(RESPONSE_PART, min_size=1, max_size=2)), (1, JSON)
                ),
            },
            optional={"type": or_junk(st.just("message")), "id": JSON, "status": JSON},
        ),
    ),
    (
        1,
        fixed(
            {"type": st.just("function_call")},
            optional={
                "call_id": or_junk(CALL_ID),
                "name": or_junk(FN_NAME),
                "arguments": or_junk(TEXT),
                "id": JSON,
            },
        ),
    ),
    (
        1,
        fixed(
            {"type": st.just("function_call_output")},
            optional={"call_id": or_junk(CALL_ID), "output": JSON},
        ),
    ),
    (
        1,
        fixed(
            {
                "type": or_junk(
                    st.sampled_from(["reasoning", "web_search_call", "item_reference", ""])
                )
            },
            optional={"summary": JSON, "id": JSON},
        ),
    ),
    (1, JSON),
)
RESPONSE_TOOL = weighted(
    (
        8,
        fixed(
            {"type": st.just("function"), "name": or_junk(FN_NAME)},
            optional={"description": JSON, "parameters": PARAMS, "strict": JSON},
        ),
    ),
    (
        1,
        fixed(
            {
                "type": or_junk(
                    st.sampled_from(["web_search", "file_search", "code_interpreter", "mcp"])
                )
            }
        ),
    ),
    (1, JSON),
)
TEXT_FORMAT = or_junk(
    fixed(
        {
            "format": or_junk(
                fixed(
                    {"type": or_junk(st.sampled_from(["text", "json_object", "json_schema"]))},
                    optional={"name": or_junk(TEXT), "schema": PARAMS, "strict": JSON},
                )
            )
        },
        optional={"verbosity": JSON},
    ),
    weight=3,
)
RESPONSES_BODY = fixed(
    {
        "model": MODEL,
        "input": weighted(
            (4, TEXT),
            (3, st.lists(RESPONSE_ITEM, min_size=1, max_size=3)),
            (1, st.just([])),
            (1, JSON),
        ),
    },
    optional={
        "instructions": or_junk(TEXT),
        "tools": or_junk(st.lists(RESPONSE_TOOL, max_size=2), weight=3),
        "tool_choice": weighted(
            (2, st.sampled_from(["auto", "none", "required"])),
            (2, fixed({"type": st.just("function"), "name": FN_NAME})),
            (1, JSON),
        ),
        "parallel_tool_calls": or_junk(st.booleans()),
        "max_output_tokens": LIMIT,
        "temperature": TEMPERATURE,
        "text": TEXT_FORMAT,
        "stream": STREAM,
        "store": or_junk(st.booleans()),
        "previous_response_id": or_junk(st.sampled_from(["resp_123", ""]) | TEXT | SURROGATES),
        "poe_parameters": POE_PARAMETERS,
        **{k: JSON for k in ("metadata", "top_p", "reasoning", "truncation", "include")},
    },
    most=4,
)
COMPLETIONS_FIELDS = words(
    "model prompt echo best_of suffix n max_tokens stop temperature stream stream_options"
)
RESPONSES_FIELDS = words(
    "model input instructions tools tool_choice parallel_tool_calls max_output_tokens "
    "temperature text stream store previous_response_id"
)
IMAGE_MODEL = weighted((6, st.just(IMAGE_BOT)), (2, MODEL))
IMAGES_BODY = st.tuples(
    fixed(
        {"model": IMAGE_MODEL, "prompt": or_junk(TEXT, 6)},
        optional={
            "n": COUNT,
            "size": weighted(
                (3, st.sampled_from(["1024x1024", "1792x1024", "1024x1792", "auto", "256x256"])),
                (1, TEXT),
                (1, JSON),
            ),
            "response_format": weighted(
                (3, st.sampled_from(["url", "b64_json"])), (1, TEXT), (1, JSON)
            ),
            "quality": or_junk(st.sampled_from(["standard", "hd", "auto"])),
            "style": or_junk(st.sampled_from(["vivid", "natural"])),
            "poe_parameters": POE_PARAMETERS,
        },
        most=3,
    ),
    EXTRAS,
).map(_with_extras)
IMAGES_FIELDS = words("model prompt n size response_format quality style poe_parameters")
SECOND_TURN = weighted((3, TEXT), (1, st.lists(RESPONSE_ITEM, min_size=1, max_size=2)))

# Valid bodies, for the header and raw-body strategies.
SAMPLE_BODIES: list[dict[str, Any]] = [
    {"model": OK_BOTS[0], "messages": [{"role": "user", "content": "hi"}]},
    {"model": ECHO_BOT, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    {"model": OK_BOTS[1], "prompt": ["a", "b"], "max_tokens": 5, "stream": True},
    {
        "model": ECHO_BOT,
        "input": [{"role": "user", "content": [{"type": "input_text", "text": "x"}]}],
    },
    {"model": ECHO_BOT, "input": "hi", "stream": True, "instructions": "be brief"},
    {
        "model": OK_BOTS[0],
        "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        "stop": ["x"],
        "response_format": {"type": "json_object"},
    },
    {  # the client's own stop sequence cuts the bot's valid JSON
        "model": JSON_BOT,
        "messages": [{"role": "user", "content": "json"}],
        "response_format": {"type": "json_object"},
        "stop": ["o"],
    },
]

# --- headers

TOKEN_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# Framing and connection headers: httpx writes these itself; other values make invalid HTTP.
FRAMING = frozenset(
    words(
        "host content-length transfer-encoding connection upgrade expect te trailer keep-alive "
        "proxy-connection http2-settings"
    )
)
VALUE_BYTES = [9, *range(0x20, 0x7F), *range(0x80, 0x100)]  # HTAB, SP, VCHAR, obs-text


def _header_value_bytes(raw: bytes) -> bytes:
    value = bytes(VALUE_BYTES[b % len(VALUE_BYTES)] for b in raw)
    return value.strip(b" \t")  # a field value neither starts nor ends with whitespace


ASCII_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40).map(
    lambda s: s.strip(" \t")
)
LATIN1_VALUE = st.binary(max_size=40).map(_header_value_bytes)
HEADER_VALUE = weighted((3, ASCII_VALUE), (1, LATIN1_VALUE))
ODD_HEADERS: dict[str, list[str | bytes]] = {
    "authorization": [
        "Bearer",
        "Bearer x",
        "Bearer  x",
        "bearer x",
        "BEARER x",
        "Bearer\tx",
        "Basic dXNlcjpwYXNz",
        "Bearer poe-test-key",
        "Bearer [redacted key#123456]",
        "[redacted key#1]",
        "Token abc",
        "Bearer " + "k" * 4000,
        b"Bearer \xe9\xff",
        "x",
    ],
    "api-key": ["x", "poe-test-key", "[redacted x]"],
    "x-api-key": ["x", "Bearer y"],
    "content-type": [
        "application/json",
        "application/json; charset=utf-8",
        "APPLICATION/JSON",
        "application/json; charset=latin-1",
        "application/json;;;",
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=xyz",
        "application/octet-stream",
        "*/*",
        "text/event-stream",
    ],
    "content-encoding": ["gzip", "br", "deflate", "zstd", "identity", "gzip, br", "x-junk"],
    "accept": ["*/*", "application/json", "text/event-stream", "text/html", "image/png"],
    "accept-encoding": ["gzip", "identity", "*", "gzip;q=0, identity;q=0"],
    "accept-charset": ["latin-1", "utf-16"],
    "origin": ["http://localhost:3000", "null", "https://evil.example"],
    "access-control-request-method": ["POST", "GET", "DELETE", "PROPFIND", ""],
    "access-control-request-headers": ["authorization, content-type", "x-foo", ""],
    "access-control-request-private-network": ["true"],
    "x-poe-openai-flow": ["x", "00000000-0000-0000-0000-000000000000"],
    "x-forwarded-for": ["1.2.3.4", "::1", "junk"],
    "x-forwarded-host": ["api.openai.com", "evil.example"],
    "x-forwarded-proto": ["https", "gopher"],
    "forwarded": ["for=1.2.3.4;host=evil.example;proto=http"],
    "cookie": ["a=b", "a=b; c=d"],
    "range": ["bytes=0-10", "bytes=-5", "junk"],
    "if-none-match": ['"x"', "*"],
    "cache-control": ["no-cache", "max-age=0"],
    "openai-organization": ["org-x"],
    "openai-project": ["proj-x"],
    "openai-beta": ["assistants=v2"],
    "x-stainless-retry-count": ["0", "-1", "x"],
    "user-agent": ["", "OpenAI/Python 1.0"],
    "idempotency-key": ["k"],
    "x-request-id": ["r"],
}
ODD_HEADER = st.one_of(
    [
        st.tuples(case_variants(name), weighted((3, st.sampled_from(values)), (1, HEADER_VALUE)))
        for name, values in ODD_HEADERS.items()
    ]
)
RANDOM_HEADER = st.tuples(st.text(TOKEN_CHARS, min_size=1, max_size=24), HEADER_VALUE)
HEADERS = st.lists(weighted((2, ODD_HEADER), (1, RANDOM_HEADER)), max_size=6).map(
    lambda pairs: [(n, v) for n, v in pairs if n.lower() not in FRAMING]
)
PREFLIGHT_TARGET = ("OPTIONS", "/v1/chat/completions", None)
HEADER_TARGETS: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/models", None),  # first: drawn most often, and cheap
    ("POST", "/v1/chat/completions", SAMPLE_BODIES[0]),
    ("POST", "/v1/chat/completions", SAMPLE_BODIES[1]),  # streamed
    ("POST", "/v1/chat/completions", SAMPLE_BODIES[-1]),  # JSON cut by the client's stop
    ("POST", "/v1/responses", {"model": ECHO_BOT, "input": "hi"}),
    ("POST", "/v1/completions", {"model": OK_BOTS[1]}),
    ("POST", "/v1/chat/completions", None),
    ("POST", "/v1/chat/completions", {"model": OK_BOTS[0]}),
    ("GET", "/v1/models/gpt-4o", None),
    ("GET", "/v1/responses/resp_unknown", None),
    ("DELETE", "/v1/responses/resp_unknown", None),
    PREFLIGHT_TARGET,
    ("GET", "/v1/embeddings", None),
    ("HEAD", "/v1/models", None),
    ("PUT", "/v1/models", None),
]
# A browser's CORS preflight: OPTIONS with Origin and Access-Control-Request-Method.
PREFLIGHT = st.tuples(
    st.sampled_from(ODD_HEADERS["origin"]),
    weighted((2, st.sampled_from(ODD_HEADERS["access-control-request-method"])), (1, ASCII_VALUE)),
    st.lists(ODD_HEADER, max_size=2),
).map(lambda t: [("origin", t[0]), ("access-control-request-method", t[1]), *t[2]])
HEADER_CASE = weighted(
    (
        6,
        st.tuples(
            st.sampled_from(range(len(HEADER_TARGETS))),
            HEADERS,
            st.sampled_from(["content-length", "chunked"]),  # chunked: no content-length
        ),
    ),
    (1, st.tuples(st.just(HEADER_TARGETS.index(PREFLIGHT_TARGET)), PREFLIGHT, st.just(""))),
)

# --- methods x paths

METHOD = weighted(
    (4, st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"])),
    (1, st.sampled_from(["TRACE", "PROPFIND", "M-SEARCH", "get", "Post", "QUERY", "PURGE"])),
    (1, st.text(TOKEN_CHARS, min_size=1, max_size=10)),
).filter(lambda m: m.upper() not in ("CONNECT", "PRI"))  # not a request on a path
# What httpx puts in a request target: printable ASCII but "#" (it starts a fragment).
PATH_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in "#?/")
QUERY_CHARS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) != "#")
ENDPOINTS = words(
    "models models/{id} chat/completions chat/completions/{id} chat/completions/{id}/messages "
    "completions responses responses/{id} responses/{id}/input_items responses/{id}/cancel "
    "images/generations images/edits images/variations embeddings audio/speech "
    "audio/transcriptions files files/{id} files/{id}/content uploads batches batches/{id} "
    "fine_tuning/jobs moderations assistants threads/{id}/runs vector_stores realtime/sessions "
    "evals containers conversations organization/users videos chatkit/sessions "
    "engines/{id}/completions dashboard/billing"
)
PREFIX = st.sampled_from(["/v1/", "/", "/v2/", "/V1/", "/v1/v1/", "/api/v1/", "//v1/", "/v1//"])
SEGMENT = weighted(
    (3, st.sampled_from(sorted({p for e in ENDPOINTS for p in e.split("/") if "{" not in p}))),
    (2, st.text(PATH_CHARS, max_size=12)),
    (1, UTF8_TEXT.map(lambda s: urllib.parse.quote(s, safe=""))),
    (1, st.binary(max_size=6).map(lambda b: urllib.parse.quote_from_bytes(b, safe=""))),
    (1, st.sampled_from(["", ".", "..", "%2F", "%2f", "%", "%zz", "%00", "%2e%2e", ";x=1", "+"])),
)
PATH_ID = weighted(
    (2, st.sampled_from(["gpt-4o", "GPT-4O", "dall-e-3", OK_BOTS[0], "resp_123", "chatcmpl-1"])),
    (1, SEGMENT),
    (1, st.lists(SEGMENT, min_size=2, max_size=3).map("/".join)),
)
PATH = weighted(
    (
        4,
        st.tuples(PREFIX, st.sampled_from(ENDPOINTS), PATH_ID).map(
            lambda t: t[0] + t[1].replace("{id}", t[2])
        ),
    ),
    (2, st.lists(SEGMENT, max_size=5).map(lambda segs: "/" + "/".join(segs))),
    (1, st.text(PATH_CHARS + "/", max_size=30).map(lambda s: "/" + s)),
)
QUERY = weighted(
    (4, st.just("")),
    (
        1,
        st.dictionaries(UTF8_TEXT, UTF8_TEXT, max_size=3).map(
            lambda d: "?" + urllib.parse.urlencode(d)
        ),
    ),
    (1, st.text(QUERY_CHARS, max_size=20).map(lambda s: "?" + s)),
)
SMALL_BODY = weighted(
    (4, st.just(None)),
    (1, st.just(b"")),
    (
        1,
        st.sampled_from(GOOD_BOTS).map(
            lambda m: _json(
                {
                    "model": m,
                    "input": "hi",
                    "prompt": "x",
                    "messages": [{"role": "user", "content": "x"}],
                }
            )
        ),
    ),
    (1, JSON.map(lambda v: _json(v))),
)
ROUTE_CASE = st.tuples(METHOD, PATH, QUERY, SMALL_BODY)

# --- content types x raw bodies

RAW_PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/responses",
    "/v1/images/generations",
    "/chat/completions",
    "/responses",
]
CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=utf-16",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "application/octet-stream",
    "application/x-ndjson",
    "text/event-stream",
    "application/xml",
    "",
]
VALID_BODY = {"model": ECHO_BOT, "messages": [{"role": "user", "content": "hé ç"}]}
ENCODED = [
    json.dumps(VALID_BODY, ensure_ascii=False).encode(encoding)
    for encoding in ("utf-8-sig", "utf-16", "utf-16-le", "utf-32", "latin-1")
]
SPECIAL_BODIES = [
    b"",
    b" ",
    b"\r\n\r\n",
    b"null",
    b"{}",
    b"[]",
    b'""',
    b"0",
    b"-0",
    b"1e999999",
    b"NaN",
    b"Infinity",
    b'{"model": NaN}',
    b'{"model": "Fuzz-Ok", "model": 1}',
    b'{"a":1}garbage',
    b'{"a":1}\x00',
    b"\x00\x00\x00",
    b"\xff\xfe\xfd",
    b'{"model":"Fuzz-Echo","messages":[{"role":"user","content":"\\ud800"}]}',
    b'{"model":"Fuzz-Echo","messages":[{"role":"user","content":"\xff"}]}',
    *ENCODED,
]
REPEATS = [
    (b"[", b"]"),
    (b'{"a":', b"}"),
    (b"x", b""),
    (b" ", b""),
    (b"9", b""),
    (b'"', b""),
    (b"\\", b""),
    (b"[1,", b""),
]


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


def _truncated(pair: tuple[dict[str, Any], int]) -> bytes:
    raw = _json(pair[0])
    return raw[: pair[1] % max(len(raw), 1)]


def _repeated(spec: tuple[tuple[bytes, bytes], int]) -> bytes:
    (open_, close), n = spec
    return open_ * n + close * n


def _big_chat(n: int) -> bytes:
    return _json({"model": ECHO_BOT, "messages": [{"role": "user", "content": "x" * n}]})


def _multipart(fields: dict[str, str]) -> bytes:
    parts = [
        f'--xyz\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'
        for k, v in fields.items()
    ]
    return ("".join(parts) + "--xyz--\r\n").encode("utf-8", "surrogatepass")


RAW_BODY = weighted(
    (3, st.binary(max_size=1024)),
    (2, st.tuples(st.sampled_from(SAMPLE_BODIES), st.integers(0, 10**6)).map(_truncated)),
    (
        1,
        st.dictionaries(TEXT, TEXT, max_size=4).map(
            lambda d: urllib.parse.urlencode(d, encoding="utf-8", errors="surrogatepass").encode()
        ),
    ),
    (
        1,
        st.dictionaries(st.sampled_from(["model", "messages", "x"]), TEXT, max_size=3).map(
            _multipart
        ),
    ),
    (2, st.sampled_from(SPECIAL_BODIES)),
    (1, st.tuples(st.sampled_from(REPEATS), st.integers(1, 32_768)).map(_repeated)),
    (1, st.integers(1, 64_000).map(_big_chat)),
    (1, st.sampled_from(SAMPLE_BODIES).map(_json)),
)
RAW_CASE = st.tuples(
    st.sampled_from(RAW_PATHS),
    weighted((4, st.sampled_from(CONTENT_TYPES)), (1, st.none()), (1, ASCII_VALUE)),
    RAW_BODY,
    st.sampled_from(["content-length", "chunked"]),
)


# --------------------------------------------------------------------------- the property


class Fuzzer:
    """One shared httpx client to the reverse listener, the property, and the figures."""

    def __init__(self, proxy: Mitmdump) -> None:
        self.proxy = proxy
        self.port = proxy.reverse_port
        self.client = proxy.http(timeout=30, limits=httpx.Limits(max_connections=4 * WORKERS))
        self.lock = threading.Lock()
        self.examples: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()  # "2xx", "4xx", "5xx"
        self.by_status: Counter[str] = Counter()
        self.codes_5xx: Counter[str] = Counter()
        self.per_strategy: dict[str, Counter[str]] = {}
        self.seconds: dict[str, float] = {}
        self.log_start = len(proxy.lines)
        self.local = threading.local()  # .strategy: what the current thread is fuzzing

    def count(self, strategy: str) -> None:
        with self.lock:
            self.examples[strategy] += 1

    def send(
        self,
        method: str,
        target: str,
        content: bytes | None = None,
        headers: list[tuple[str, str | bytes]] | None = None,
        chunked: bool = False,
    ) -> tuple[httpx.Response, Any]:
        """Send one request and check the property on its answer; returns the answer and
        what check_answer parsed from it."""
        url = httpx.URL(scheme="http", host="127.0.0.1", port=self.port, raw_path=target.encode())
        body: bytes | Iterator[bytes] | None = content
        if chunked and content is not None:
            body = iter([content[: len(content) // 2], content[len(content) // 2 :]])
        r = self.client.request(method, url, content=body, headers=headers)
        status_class = f"{r.status_code // 100}xx"
        strategy = getattr(self.local, "strategy", "other")
        with self.lock:
            self.statuses[status_class] += 1
            self.per_strategy.setdefault(strategy, Counter())[status_class] += 1
            self.by_status[str(r.status_code)] += 1
            if r.status_code >= 500:
                try:
                    code = r.json()["error"]["code"]
                except Exception:
                    code = "?"
                self.codes_5xx[f"{r.status_code} {code}"] += 1
        return r, check_answer(method, target, r)

    def new_log(self, since: int) -> str:
        return "".join(self.proxy.lines[since:])

    def run(self, name: str) -> None:
        """``WORKERS`` seeded hypothesis runs of suite ``name`` (see SUITES), in threads."""
        strategy, prop = SUITES[name]
        strategy.validate()  # build the lazy strategies once, before the threads share them
        failures: list[BaseException] = []
        log_from = len(self.proxy.lines)
        started = time.monotonic()

        def worker(k: int) -> None:
            self.local.strategy = name

            @seed(SEED + zlib.crc32(name.encode()) + k)
            @HYPOTHESIS
            @given(strategy)
            def fuzz(example: Any) -> None:
                self.count(name)
                prop(self, example)

            try:
                fuzz()
            except BaseException as e:
                e.add_note(f"(strategy {name!r}, worker {k} of {WORKERS})")
                failures.append(e)

        threads = [
            threading.Thread(target=worker, args=(k,), name=f"fuzz-{name}-{k}")
            for k in range(WORKERS)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.seconds[name] = round(time.monotonic() - started, 1)
        if len(failures) == 1:
            raise failures[0]
        if failures:
            raise BaseExceptionGroup(f"{name}: {len(failures)} workers failed", failures)
        assert self.examples[name] >= EXAMPLES, f"only {self.examples[name]} examples"
        log = self.new_log(log_from)
        for bad in ("Traceback", "internal error"):
            assert bad not in log, f"{bad!r} in mitmdump's output:\n{_around(log, bad)}"

    def figures(self) -> dict[str, Any]:
        return {
            "examples": dict(self.examples),
            "statuses": dict(sorted(self.statuses.items())),
            "statuses_by_strategy": {
                name: dict(sorted(counts.items())) for name, counts in self.per_strategy.items()
            },
            "by_status": dict(sorted(self.by_status.items())),
            "codes_5xx": dict(sorted(self.codes_5xx.items())),
            "seconds": self.seconds,
            "workers": WORKERS,
        }


def _around(log: str, needle: str, width: int = 3000) -> str:
    at = log.find(needle)
    return log[max(0, at - 300) : at + width]


OBJECT_SCHEMAS = {
    "chat.completion": "CreateChatCompletionResponse",
    "text_completion": "CreateCompletionResponse",
    "list": "ListModelsResponse",
    "model": "Model",
}
TERMINAL_EVENTS = ("response.completed", "response.incomplete", "response.failed")


# Free-text fields: the schemas put no constraint on their values beyond their type.
FREE_TEXT = frozenset(
    words("id model created content text arguments message param name refusal system_fingerprint")
)
_conforming: set[str] = set()


def _shape(value: Any) -> Any:
    """``value`` with free-text fields blanked (same types): equal shapes validate alike."""
    if isinstance(value, dict):
        return {
            k: (type(v)() if k in FREE_TEXT and isinstance(v, str | int) else _shape(v))
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return value


def conforms(instance: Any, schema: str) -> None:
    """validate(), but each shape once: jsonschema over OpenAI's big document costs ~1 ms a
    call, and most answers repeat a shape already seen (stream chunks, error envelopes)."""
    key = schema + json.dumps(_shape(instance), sort_keys=True)
    if key not in _conforming:
        validate(instance, schema)
        _conforming.add(key)


def check_answer(method: str, target: str, r: httpx.Response) -> Any:
    """The property, for any answer. Returns the parsed JSON (or the SSE events)."""
    status, body = r.status_code, r.content
    where = f"{method} {target[:200]} -> {status} {r.headers.get('content-type')!r}"
    shown = body[:600]
    assert status in ALLOWED, f"{where}: status not allowed; body {shown!r}"
    assert b"Traceback" not in body, f"{where}: a traceback in the body: {shown!r}"
    if method.upper() == "HEAD":
        return None  # no body by definition
    if status == 204:
        assert method.upper() == "OPTIONS" and body == b"", f"{where}: {shown!r}"
        return None
    if status >= 300:
        try:
            data = json.loads(body)
        except ValueError:
            raise AssertionError(f"{where}: the error body is not JSON: {shown!r}") from None
        conforms(data, "ErrorResponse")
        if status in (502, 504):
            code = data["error"]["code"]
            assert code in BOT_CAUSED, f"{where}: a {status} not caused by the bot: {data}"
        return data
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        return check_sse(where, body)
    if method.upper() == "OPTIONS" and body == b"OK":
        return None  # a CORS preflight, answered by Starlette's CORS middleware
    try:
        data = json.loads(body)
    except ValueError:
        raise AssertionError(f"{where}: a 200 body that is not JSON: {shown!r}") from None
    assert isinstance(data, dict), f"{where}: {shown!r}"
    kind = data.get("object")
    if kind in OBJECT_SCHEMAS:
        conforms(data, OBJECT_SCHEMAS[kind])
    elif kind == "response":
        assert isinstance(data.get("id"), str), f"{where}: {shown!r}"
        assert data.get("deleted") is True or data.get("status") in (
            "completed",
            "incomplete",
        ), f"{where}: {shown!r}"
    elif "data" in data and "created" in data:
        conforms(data, "ImagesResponse")
    else:
        raise AssertionError(f"{where}: an unexpected 200 body: {shown!r}")
    return data


def check_sse(where: str, body: bytes) -> list[Any]:
    """Every ``data:`` line a JSON object (a chunk, a Responses event, an error) or [DONE]."""
    events: list[Any] = []
    for line in body.decode("utf-8").split("\n"):
        if not line or line.startswith((":", "event:")):
            continue
        assert line.startswith("data: "), f"{where}: not an SSE data line: {line[:300]!r}"
        assert "[DONE]" not in events, f"{where}: data after [DONE]: {line[:300]!r}"
        payload = line[len("data: ") :]
        if payload == "[DONE]":
            events.append("[DONE]")
            continue
        event = json.loads(payload)
        assert isinstance(event, dict), f"{where}: {line[:300]!r}"
        if _is_error(event):
            conforms(event, "ErrorResponse")
        elif event.get("object") == "chat.completion.chunk":
            conforms(event, "CreateChatCompletionStreamResponse")
        elif event.get("object") == "text_completion":
            conforms(_finished(event), "CreateCompletionResponse")
        elif isinstance(event.get("type"), str):  # the Responses API
            assert event.get("sequence_number") == len(events), f"{where}: {line[:300]!r}"
        else:
            raise AssertionError(f"{where}: an unexpected SSE event: {line[:300]!r}")
        events.append(event)
    assert events, f"{where}: an empty stream"
    last = events[-1]
    ended = (
        last == "[DONE]"
        or _is_error(last)
        or (isinstance(last, dict) and last.get("type") in TERMINAL_EVENTS)
    )
    assert ended, f"{where}: the stream does not end with [DONE], an error or a final event"
    return events


def check_poe_answer_kept(body: Any, r: httpx.Response, parsed: Any) -> None:
    """A 200 from Poe is never turned into a 5xx (or a failed stream) by the proxy."""
    model = body.get("model") if isinstance(body, dict) else None
    if not isinstance(model, str) or model not in ANSWERING_BOTS:
        return
    where = f"{model} answered 200, yet the client got {r.status_code}"

    def misfit(code: object) -> bool:
        return isinstance(code, str) and code in MISFIT_FROM and MISFIT_FROM[code] != model

    if r.status_code >= 500:
        assert misfit(parsed["error"]["code"]), f"{where}: {parsed}"
    for event in parsed if isinstance(parsed, list) else []:  # a stream
        if _is_error(event):
            code = event["error"].get("code")
        elif isinstance(event, dict) and event.get("type") == "response.failed":
            code = (event["response"].get("error") or {}).get("code")
        else:
            continue
        assert misfit(code), f"{where} and a failed stream: {event}"


def _finished(chunk: dict[str, Any]) -> dict[str, Any]:
    """A legacy completion chunk as its schema can take it: OpenAI streams these in the
    CreateCompletionResponse shape but with ``finish_reason: null`` until the last one, which
    the schema's enum does not allow."""
    choices = [
        {**c, "finish_reason": "stop"}
        if isinstance(c, dict) and c.get("finish_reason") is None
        else c
        for c in chunk.get("choices") or []
    ]
    return {**chunk, "choices": choices}


def _is_error(event: Any) -> bool:
    """An error envelope in a stream (a Response object's own "error" is null or has no
    "type" key at the top: it is not one)."""
    return isinstance(event, dict) and isinstance(event.get("error"), dict) and "type" not in event


def _kinds(parsed: Any) -> set[str]:
    """The object kinds of a 200 answer ('chat.completion', 'chat.completion.chunk', ...)."""
    items = parsed if isinstance(parsed, list) else [parsed]
    return {
        str(i.get("object") or i.get("type"))
        for i in items
        if isinstance(i, dict) and not _is_error(i)
    }


# --------------------------------------------------------------------------- fixtures, tests


@pytest.fixture(scope="module")
def fuzzer(proxy: Mitmdump, fake_poe: FakePoe) -> Iterator[Fuzzer]:
    for bot in OK_BOTS:
        fake_poe.script(bot, [text("ok")])
    fake_poe.script(ECHO_BOT, [echo()])
    fake_poe.script(JSON_BOT, [text('{"ok": true}')])
    fake_poe.script(ERROR_BOT, [error("the bot broke")])
    picture = fake_poe.host_file("fuzz.png", b"\x89PNG\r\n\x1a\n fuzz", "image/png")
    fake_poe.script(IMAGE_BOT, [file(picture, "image/png", "fuzz.png")])
    f = Fuzzer(proxy)
    yield f
    f.client.close()
    record("fuzz", f.figures())  # $FIGURES_DIR/fuzz.json, when FIGURES_DIR is set


def chat_body_answered(fuzzer: Fuzzer, body: Any) -> None:
    headers = [("content-type", "application/json")]
    r, parsed = fuzzer.send("POST", "/v1/chat/completions", _json(body), headers=headers)
    check_poe_answer_kept(body, r, parsed)
    if r.status_code == 200:
        assert _kinds(parsed) <= {"chat.completion", "chat.completion.chunk"}, parsed


def other_bodies_answered(fuzzer: Fuzzer, example: tuple[tuple[str, Any], Any]) -> None:
    (path, body), second = example
    r, parsed = fuzzer.send("POST", path, _json(body))
    check_poe_answer_kept(body, r, parsed)
    if r.status_code != 200:
        return
    kinds = _kinds(parsed)
    if path.endswith("/images/generations"):
        assert isinstance(parsed, dict) and parsed["data"], parsed
        return
    if path.endswith("/completions"):
        assert kinds <= {"text_completion"}, parsed
        return
    assert kinds and all(k.startswith("response") for k in kinds), parsed
    final = parsed if isinstance(parsed, dict) else parsed[-1]["response"]
    if second is None or not final["store"] or final["status"] == "failed":
        return
    # The stored response: read it, continue the conversation from it, delete it.
    at = f"/v1/responses/{urllib.parse.quote(final['id'])}"
    _, got = fuzzer.send("GET", at)
    assert got["id"] == final["id"], got
    fuzzer.send(
        "POST",
        path,
        _json({"model": body["model"], "input": second, "previous_response_id": final["id"]}),
    )
    r, gone = fuzzer.send("DELETE", at)
    assert r.status_code == 200 and gone["deleted"] is True, gone
    r, _ = fuzzer.send("GET", at)
    assert r.status_code == 404


def headers_answered(fuzzer: Fuzzer, example: tuple[int, list[tuple[str, Any]], str]) -> None:
    index, headers, framing = example
    method, path, body = HEADER_TARGETS[index]
    content = None if body is None else _json(body)
    r, parsed = fuzzer.send(method, path, content, headers=headers, chunked=framing == "chunked")
    check_poe_answer_kept(body, r, parsed)


def route_answered(fuzzer: Fuzzer, example: tuple[str, str, str, bytes | None]) -> None:
    method, path, query, body = example
    fuzzer.send(method, path + query, body)


def raw_body_answered(fuzzer: Fuzzer, example: tuple[str, str | None, bytes, str]) -> None:
    path, content_type, body, framing = example
    headers = [] if content_type is None else [("content-type", content_type)]
    r, parsed = fuzzer.send("POST", path, body, headers=headers, chunked=framing == "chunked")
    try:
        sent = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, or nested too deep for json.loads
        sent = None
    check_poe_answer_kept(sent, r, parsed)


COMPLETIONS_RESPONSES_OR_IMAGES = st.tuples(
    weighted(
        (
            1,
            st.tuples(
                st.sampled_from(["/v1/completions", "/completions"]),
                weighted(
                    (3, COMPLETIONS_BODY),
                    (4, mutants(COMPLETIONS_BODY, COMPLETIONS_FIELDS)),
                    (1, JSON),
                ),
            ),
        ),
        (
            1,
            st.tuples(
                st.sampled_from(["/v1/responses", "/responses"]),
                weighted(
                    (3, RESPONSES_BODY),
                    (4, mutants(RESPONSES_BODY, RESPONSES_FIELDS)),
                    (1, JSON),
                ),
            ),
        ),
        (
            1,
            st.tuples(
                st.sampled_from(["/v1/images/generations", "/images/generations"]),
                weighted((3, IMAGES_BODY), (3, mutants(IMAGES_BODY, IMAGES_FIELDS)), (1, JSON)),
            ),
        ),
    ),
    weighted((5, st.none()), (1, SECOND_TURN)),  # a follow-up turn on a stored response
)
SUITES: dict[str, tuple[st.SearchStrategy[Any], Callable[[Fuzzer, Any], None]]] = {
    "chat_bodies": (CHAT_BODY, chat_body_answered),
    "completions_responses_images_bodies": (COMPLETIONS_RESPONSES_OR_IMAGES, other_bodies_answered),
    "headers": (HEADER_CASE, headers_answered),
    "methods_paths": (ROUTE_CASE, route_answered),
    "content_types_raw_bodies": (RAW_CASE, raw_body_answered),
}


@pytest.mark.parametrize("suite", list(SUITES))
def test_fuzz(fuzzer: Fuzzer, suite: str) -> None:
    fuzzer.run(suite)


def test_proxy_still_answers_after_fuzzing(fuzzer: Fuzzer, proxy: Mitmdump) -> None:
    hi = [{"role": "user", "content": "hi"}]
    r, data = fuzzer.send(
        "POST", "/v1/chat/completions", _json({"model": OK_BOTS[0], "messages": hi})
    )
    assert r.status_code == 200
    assert data["choices"][0]["message"]["content"] == "ok"
    r, events = fuzzer.send(
        "POST", "/v1/chat/completions", _json({"model": ECHO_BOT, "messages": hi, "stream": True})
    )
    assert r.status_code == 200 and events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1]) == "hi"
    log = fuzzer.new_log(fuzzer.log_start)  # this module's share of the session's mitmdump
    for bad in ("Traceback", "internal error"):
        assert bad not in log, f"{bad!r} in mitmdump's output:\n{_around(log, bad)}"
