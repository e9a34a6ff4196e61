"""Pictures and files in chat messages: OpenAI content parts -> what to upload to Poe.

Pure functions and plain data only; poe.py does the uploading.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import mimetypes
import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from addon.errors import OpenAIError, bad_request

DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?((?:;[\w-]+=[^;,]*)*)(;base64)?,(.*)$", re.S)


@dataclass(frozen=True)
class FileInput:
    """One picture or file to hand to Poe: bytes to upload, or a URL for Poe to fetch."""

    name: str
    mime: str
    data: bytes | None = None
    url: str | None = None

    @property
    def digest(self) -> str:
        """The cache key: the same bytes (or URL) are uploaded once."""
        source = self.data if self.data is not None else (self.url or "").encode()
        kind = "b" if self.data is not None else "u"
        return kind + hashlib.sha256(source).hexdigest()


def too_large(where: str, size: int, limit: int) -> OpenAIError:
    return OpenAIError(
        413,
        f"{where}: the file is {size} bytes; this proxy accepts at most {limit} bytes per file.",
        "invalid_request_error",
        "file_too_large",
        where,
    )


def _extension(mime: str) -> str:
    ext = mimetypes.guess_extension(mime) or ".bin"
    return ".jpg" if ext == ".jpe" else ext


def from_data_url(url: str, where: str, limit: int, name: str | None = None) -> FileInput:
    match = DATA_URL.match(url)
    if match is None or not match.group(3):
        raise bad_request(f"{where}: expected a base64 data: URL.", where, "invalid_data_url")
    mime = match.group(1) or "application/octet-stream"
    payload = match.group(4)
    # the decoded size, without decoding: padding ("=") carries no bytes
    size = len(payload) * 3 // 4 - (2 if payload.endswith("==") else payload.endswith("="))
    if size > limit:
        raise too_large(where, size, limit)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{where}: the data: URL is not valid base64.", where) from None
    return FileInput(name=name or "image" + _extension(mime), mime=mime, data=data)


def image_part(part: dict[str, object], where: str, limit: int) -> FileInput:
    image = part.get("image_url")
    url = image.get("url") if isinstance(image, dict) else image
    if not isinstance(url, str) or not url:
        raise bad_request(f"{where}.image_url.url is required.", f"{where}.image_url.url")
    if url.startswith("data:"):
        return from_data_url(url, f"{where}.image_url.url", limit)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise bad_request(
            f"{where}.image_url.url must be an http(s) or data: URL.", f"{where}.image_url.url"
        )
    # Poe fetches it (upload_file with file_url): the proxy never fetches client URLs itself.
    name = parts.path.rsplit("/", 1)[-1] or "image"
    return FileInput(name=name, mime=mimetypes.guess_type(parts.path)[0] or "image/*", url=url)


def file_part(part: dict[str, object], where: str, limit: int) -> FileInput:
    spec = part.get("file")
    if not isinstance(spec, dict):
        raise bad_request(f"{where}.file must be an object.", f"{where}.file")
    if spec.get("file_id") and not spec.get("file_data"):
        raise bad_request(
            f"{where}.file.file_id refers to OpenAI's Files API, which is not available through "
            "Poe; send the file inline as file_data.",
            f"{where}.file.file_id",
            "unsupported_content",
        )
    data = spec.get("file_data")
    if not isinstance(data, str) or not data:
        raise bad_request(f"{where}.file.file_data is required.", f"{where}.file.file_data")
    filename = spec.get("filename") if isinstance(spec.get("filename"), str) else None
    if data.startswith("data:"):
        return from_data_url(data, f"{where}.file.file_data", limit, filename or "file")
    mime = (mimetypes.guess_type(filename)[0] if filename else None) or "application/pdf"
    url = f"data:{mime};base64,{data}"
    return from_data_url(
        url, f"{where}.file.file_data", limit, filename or "file" + _extension(mime)
    )
