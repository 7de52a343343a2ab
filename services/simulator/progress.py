"""A one-line progress display on stderr (rewritten in place on a terminal, a line every few seconds
otherwise, so logs stay readable)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["ProgressLine"]


class ProgressLine:
    def __init__(
        self, stream: TextIO | None = None, *, enabled: bool = True, interval_s: float | None = None
    ) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = enabled
        self._tty = self._stream.isatty()
        self._interval = interval_s if interval_s is not None else (0.25 if self._tty else 5.0)
        self._last = 0.0

    def update(self, text: str, *, force: bool = False) -> None:
        if not self._enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < self._interval:
            return
        self._last = now
        if self._tty:
            self._stream.write("\r\x1b[K" + text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def finish(self, text: str) -> None:
        """Show the final state and end the line."""
        if not self._enabled:
            return
        if self._tty:
            self._stream.write("\r\x1b[K" + text + "\n")
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
