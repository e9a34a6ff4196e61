"""Turns Poe's answer events into the text an OpenAI client should see, as it streams.

Poe's protocol has two ways to grow an answer: ``text`` appends, ``replace_response`` replaces
everything so far. Bots use replacements for transient status ("Thinking... (3s)", "Generating
image (40%)") and sometimes for cumulative answers. A stream cannot take back text it has sent,
so this module holds back whatever might still be replaced:

* the content of a ``replace_response`` is held until an event confirms it: a following ``text``
  or ``file`` event, a following replacement that extends it (a cumulative answer), or the end;
* an answer that so far is only a status line ("Thinking...") is held the same way, even when it
  arrived as plain ``text``, until something that is not status follows.

If a replacement rewrites text the client already has (rare), the client keeps what it has and
receives only what follows the replacement; nothing is ever sent twice. The non-streamed answer
is always Poe's final text.
"""

from __future__ import annotations

import re

from fastapi_poe.types import Attachment

from addon.textbuffer import TextBuffer

# One line of transient status, as Poe bots write it; optional markdown emphasis or quote.
STATUS_LINE = re.compile(
    r"[>*_\s]*(?:thinking|searching|generating|analy[sz]ing|reading|browsing|processing|"
    r"loading|waiting|running|fetching|looking|working|creating|rendering|queued)\b"
    r"[^\n.…]{0,60}(?:\.{2,}|…|\(\d{1,3}%\))(?:\s*\([^\n)]{0,40}\))?[*_\s]*",
    re.IGNORECASE,
)


# No status line is this long (the pattern allows ~150 characters plus runs of dots and
# spaces), so a longer answer is not checked again on every event.
STATUS_MAX = 400


def is_status_text(text: str) -> bool:
    return text.strip() == "" or STATUS_LINE.fullmatch(text.strip()) is not None


def attachment_markdown(attachment: Attachment) -> str:
    """A markdown link for a file a bot returned: images inline, other files as links."""
    name = attachment.name or "file"
    if attachment.inline_ref:
        # The bot's text refers to it as [..][inline_ref] (before or after this event, which
        # Poe sends first): define the reference. AnswerStream puts it on a line of its own.
        return f"[{attachment.inline_ref}]: {attachment.url}"
    if (attachment.content_type or "").startswith("image/"):
        return f"![{name}]({attachment.url})"
    return f"[{name}]({attachment.url})"


class AnswerStream:
    """Feed Poe events in; get back the text deltas that are safe to send now."""

    def __init__(self) -> None:
        self._answer = TextBuffer()  # Poe's answer as Poe defines it
        self._client = TextBuffer()  # what the client has been sent
        self._held = False  # is answer[self._replaced_at ...] still provisional?
        self._replaced = False  # did a replacement happen since the last commit?
        self._replaced_len = 0
        self._cursor = 0  # answer[:cursor] is accounted for on the client side
        self.files: list[Attachment] = []  # files the bot returned (Poe's own URLs)
        # A file's markdown ends the answer so far: text that follows starts a new paragraph,
        # or it would glue onto the URL ("[ref]: https://.../cat.png![cat][ref]").
        self._after_file = False
        # Files that came while the text was only status ("Generating image..."): Poe's
        # replacements rewrite the text, never the files, so their links wait for the text
        # that stays and follow it (or are the whole answer if only status came).
        self._pending: list[Attachment] = []

    @property
    def answer(self) -> str:
        return str(self._answer)

    @property
    def client(self) -> str:
        return str(self._client)

    def text(self, text: str) -> str:
        if self._after_file and text:
            self._after_file = False
            if not text.startswith("\n"):
                text = "\n\n" + text
        self._answer.append(text)
        self._held = self._status_only()
        return self._commit()

    def replace(self, text: str) -> str:
        previous, was_held = self.answer, self._held
        delta = ""
        if (
            was_held
            and self._replaced
            and text.startswith(previous)
            and not is_status_text(previous)
        ):
            # A cumulative answer: the earlier replacement is confirmed by this one.
            self._held = False
            delta = self._commit()
        self._answer = TextBuffer(text)
        self._after_file = False
        self._replaced = True
        self._replaced_len = len(text)
        self._held = True
        return delta

    def file(self, attachment: Attachment) -> str:
        self.files.append(attachment)
        if self._held and self._status_only():
            self._pending.append(attachment)
            return ""
        self._held = False  # a file confirms a (non-status) replacement before it
        self._link(attachment)
        return self._commit()

    def _link(self, attachment: Attachment) -> str:
        """Append a file's markdown to the answer (unless the text links it already)."""
        answer = self.answer
        if not attachment.inline_ref and f"]({attachment.url}" in answer:
            return ""  # the bot's text already links this very file: once is enough
        link = attachment_markdown(attachment)
        if answer and not answer.endswith("\n"):
            link = "\n\n" + link
        elif attachment.inline_ref and answer.endswith("\n") and not answer.endswith("\n\n"):
            link = "\n" + link  # a definition cannot interrupt a paragraph: a blank line first
        self._answer.append(link)
        self._after_file = True
        self._held = False
        return ""

    def finish(self) -> str:
        if self._pending and self._held and self._status_only():
            # Only status ("Generating image...") came before the files: the files are the
            # answer, the status was never part of it.
            self._answer = TextBuffer()
            self._replaced = True
            self._replaced_len = 0
        self._held = False
        return self._commit()

    def abandon(self) -> str:
        """The end of an answer that failed: held text goes out, unless it is only status
        ("Thinking..."), which means nothing once the bot has failed."""
        if self._held and self._status_only():
            return ""
        return self.finish()

    def _status_only(self) -> bool:
        if self._replaced and not is_status_text(self.answer[: self._replaced_len]):
            return False  # text after a real (non-status) replacement confirms it
        if len(self._answer) > STATUS_MAX:
            return False  # checked per event: never the whole of a long answer
        answer = self.answer
        return bool(answer.strip()) and is_status_text(answer)

    def _commit(self) -> str:
        if self._held:
            return ""
        while self._pending:
            self._link(self._pending.pop(0))
        if self._replaced:
            self._replaced = False
            if self.answer.startswith(self.client):
                self._cursor = len(self._client)
            else:
                # The replacement rewrote text the client already has: skip it, keep going.
                self._cursor = self._replaced_len
        delta = self._answer.since(self._cursor)
        self._cursor = len(self._answer)
        self._client.append(delta)
        return delta
