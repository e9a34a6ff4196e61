"""OpenAI's error envelope, and how each kind of Poe failure maps onto it (pure functions)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any


@dataclass
class OpenAIError(Exception):
    """An answer in OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""

    status: int
    message: str
    type: str = "invalid_request_error"
    code: str | None = None
    param: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return f"{self.status} {self.code or self.type}: {self.message}"

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


# The openai SDK retries 408/409/429/5xx unless told not to; a retry spends Poe points again.
NO_RETRY = {"x-should-retry": "false"}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, "invalid_request_error", code, param)


def not_found(message: str, code: str | None = None) -> OpenAIError:
    return OpenAIError(404, message, "invalid_request_error", code)


def invalid_api_key(message: str) -> OpenAIError:
    return OpenAIError(401, message, "invalid_request_error", "invalid_api_key")


def internal_error(message: str = "The proxy failed to answer this request.") -> OpenAIError:
    # The same request would fail the same way, after Poe answered (and charged) again.
    return OpenAIError(500, message, "server_error", None, None, dict(NO_RETRY))


@dataclass(frozen=True)
class PoeFailure:
    """What went wrong talking to Poe, as plain data.

    ``status`` is set when Poe answered with an HTTP error instead of an event stream; ``event``
    when it sent an in-band ``error`` event; ``transport`` when it could not be reached at all.
    """

    bot: str
    status: int | None = None
    body: str = ""
    retry_after: str | None = None
    event: dict[str, Any] | None = None
    transport: str | None = None
    upload: bool = False  # the failure was an attachment upload, not a bot query
    timeout: str | None = None  # "first event", "idle" or "total": Poe took too long


TIMEOUT_OPTIONS = {
    "first event": "poe_first_event_timeout_s",
    "idle": "poe_idle_timeout_s",
    "total": "poe_total_timeout_s",
}
_RATE_LIMIT = re.compile(r"rate.?limit|too many requests", re.I)
_NO_BOT = re.compile(r"bot .*(does not exist|not found|doesn't exist)|unknown bot", re.I)
_NO_POINTS = re.compile(
    r"(insufficient|out of|not enough) (compute )?points|insufficient.fund", re.I
)


def _poe_message(body: str) -> str:
    """The human part of a Poe JSON error body, or the body itself (shortened)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:300]
    if isinstance(data, dict):
        for key in ("text", "detail", "message", "error"):
            value = data.get(key)
            if isinstance(value, str):
                return value[:300]
            if isinstance(value, dict) and isinstance(value.get("message"), str):
                return value["message"][:300]
    return body.strip()[:300]


def _rate_limited(detail: str, retry_after: str | None) -> OpenAIError:
    headers = {"retry-after": retry_after} if retry_after else {}
    return OpenAIError(
        429, f"Poe rate limit reached: {detail}", "requests", "rate_limit_exceeded", None, headers
    )


def _out_of_points(detail: str) -> OpenAIError:
    return OpenAIError(
        429,
        f"Poe points exhausted: {detail}",
        "insufficient_quota",
        "insufficient_quota",
        None,
        dict(NO_RETRY),
    )


def _unknown_bot(bot: str, detail: str) -> OpenAIError:
    return not_found(
        f"The model `{bot}` does not exist: Poe has no bot of that name ({detail}).",
        "model_not_found",
    )


def classify_failure(failure: PoeFailure, *, client_key: bool, key_tag: str = "") -> OpenAIError:
    """Map a Poe failure to the OpenAI error a client expects.

    ``client_key`` tells whether the Poe key was the client's own (pass-through): a rejected
    client key is the client's problem (401); a rejected configured key is the proxy's (502,
    naming the key by ``key_tag``, its fingerprint).
    """
    if failure.timeout is not None:
        headers = dict(NO_RETRY) if failure.timeout == "total" else {}
        return OpenAIError(
            504,
            f"Poe took too long ({failure.timeout} timeout; see "
            f"{TIMEOUT_OPTIONS.get(failure.timeout, 'the poe_*_timeout_s options')}).",
            "server_error",
            "timeout",
            None,
            headers,
        )
    if failure.transport is not None:
        return OpenAIError(
            502, f"Could not reach Poe: {failure.transport}", "server_error", "poe_unreachable"
        )
    if failure.event is not None:
        return _classify_event(failure)
    status = failure.status or 502
    detail = _poe_message(failure.body) or f"HTTP {status}"
    if failure.upload and status not in (401, 403, 402, 429):
        if status == 413:
            return OpenAIError(
                413,
                f"Poe refused the file {failure.bot}: too large ({detail})",
                "invalid_request_error",
                "file_too_large",
            )
        return OpenAIError(
            502,
            f"Poe could not take the file {failure.bot}: {detail}",
            "server_error",
            "poe_upload_failed",
        )
    if status in (401, 403):
        if client_key:
            return invalid_api_key(f"Poe rejected the API key: {detail}")
        tag = f" {key_tag}" if key_tag else ""
        return OpenAIError(
            502,
            f"Poe rejected the proxy's configured key{tag}: {detail}. Set a valid key in "
            "poe_api_key (or poe_api_key_file).",
            "server_error",
            "poe_key_rejected",
            None,
            dict(NO_RETRY),
        )
    if status == 402:
        return _out_of_points(detail)
    if status == 404:
        return _unknown_bot(failure.bot, detail)
    if status == 429:
        return _rate_limited(detail, failure.retry_after)
    if status in (400, 413, 422):
        return bad_request(f"Poe refused the request: {detail}")
    return OpenAIError(502, f"Poe answered HTTP {status}: {detail}", "server_error", "poe_error")


def _classify_event(failure: PoeFailure) -> OpenAIError:
    event = failure.event or {}
    text = str(event.get("text") or "The bot reported an error.")
    error_type = event.get("error_type")
    if error_type == "insufficient_fund" or _NO_POINTS.search(text):
        return _out_of_points(text)
    if _RATE_LIMIT.search(text):
        return _rate_limited(text, failure.retry_after)
    if error_type == "user_message_too_long":
        return bad_request(text, "messages", "context_length_exceeded")
    if error_type == "user_caused_error":
        return bad_request(text)
    if error_type == "privacy_authorization_error":
        return OpenAIError(403, text, "invalid_request_error", "permission_denied")
    if _NO_BOT.search(text):
        return _unknown_bot(failure.bot, text)
    headers = {} if event.get("allow_retry", True) else dict(NO_RETRY)
    return OpenAIError(502, f"Poe bot error: {text}", "server_error", "poe_error", None, headers)


def method_not_allowed(method: str, path: str) -> OpenAIError:
    return OpenAIError(
        405,
        f"Method {method} is not allowed on {path}.",
        "invalid_request_error",
        "method_not_allowed",
    )
