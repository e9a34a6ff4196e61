"""Text that grows by appending, one Poe event at a time.

``self.text += piece`` copies the whole text on every event (CPython can extend a string in
place only through a local variable), which makes a long answer quadratic: about 70 us per
event at 100,000 events. A buffer keeps the pieces and joins them when the text is read.
"""

from __future__ import annotations


class TextBuffer:
    __slots__ = ("_parts", "length")

    # Joined into one string past this many pieces: bounds the memory of the piece objects,
    # and the join costs (text length / MAX_PARTS) per append, amortised.
    MAX_PARTS = 1024

    def __init__(self, text: str = "") -> None:
        self._parts: list[str] = [text] if text else []
        self.length = len(text)

    def append(self, text: str) -> None:
        if not text:
            return
        self._parts.append(text)
        self.length += len(text)
        if len(self._parts) > self.MAX_PARTS:
            self._parts = ["".join(self._parts)]

    def since(self, start: int) -> str:
        """``str(self)[start:]``, without joining when that is just the last piece."""
        if start >= self.length:
            return ""
        last = self._parts[-1]
        if start == self.length - len(last):
            return last
        return str(self)[start:]

    def __str__(self) -> str:
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def __len__(self) -> int:
        return self.length
