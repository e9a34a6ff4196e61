"""The same OpenAI-to-Poe application without mitmproxy, for clients that can set a base URL
and for running several instances behind a load balancer.

    python -m addon serve --host 127.0.0.1 --port 8000
    uvicorn addon.standalone:create --factory --host 127.0.0.1 --port 8000

Configuration comes from the environment, with the addon's option names in capitals:
POE_API_KEY, POE_API_KEY_FILE, POE_ACCESS_TOKENS (comma-separated), POE_MAPPINGS, POE_BASE_URL,
POE_UPLOAD_URL, POE_PROXY, POE_MAX_FILE_MB, POE_MAX_BODY_MB and the POE_*_TIMEOUT_S /
POE_HEADER_HOLD_S / POE_KEEPALIVE_S durations.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Mapping

from starlette.applications import Starlette

from addon.app import create_app
from addon.config import (
    DEFAULT_BASE_URL,
    DEFAULT_HOSTS,
    DEFAULT_MAPPINGS,
    DEFAULT_UPLOAD_URL,
    Settings,
    parse_settings,
    split_secrets,
)
from addon.mappings import load_mappings
from addon.poe import PoeClient
from addon.service import Service

INTEGER_OPTIONS = (
    "poe_max_file_mb",
    "poe_max_body_mb",
    "poe_first_event_timeout_s",
    "poe_idle_timeout_s",
    "poe_total_timeout_s",
    "poe_header_hold_s",
    "poe_keepalive_s",
)


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if env is None else env
    integers = {name: int(env[name.upper()]) for name in INTEGER_OPTIONS if env.get(name.upper())}
    return parse_settings(
        poe_api_key=env.get("POE_API_KEY", ""),
        poe_api_key_file=env.get("POE_API_KEY_FILE", ""),
        poe_access_tokens=split_secrets([env.get("POE_ACCESS_TOKENS", "")]),
        poe_mappings=env.get("POE_MAPPINGS", DEFAULT_MAPPINGS),
        poe_hosts=DEFAULT_HOSTS,
        poe_base_url=env.get("POE_BASE_URL", DEFAULT_BASE_URL),
        poe_upload_url=env.get("POE_UPLOAD_URL", DEFAULT_UPLOAD_URL),
        poe_proxy=env.get("POE_PROXY", ""),
        environ=env,
        **integers,
    )


def create(env: Mapping[str, str] | None = None) -> Starlette:
    settings = settings_from_env(env)
    poe = PoeClient(settings.base_url, settings.proxy, settings.upload_url)
    service = Service(settings, load_mappings(settings.mappings_path), poe)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        service.load_tokenizer()
        yield
        await poe.aclose()

    return create_app(service, lifespan)
