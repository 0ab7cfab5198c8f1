"""Live progress of a round while the coordinator waits for the sites' replies.

A long round (minutes of DP training on each site) otherwise shows nothing between "round N: start"
and its result line. :class:`RoundProgress` reports how many of the sampled sites have replied and
how long the round has waited:

* on a terminal, one status line rewritten in place (carriage return), cleared when the round's
  wait ends, so that the log lines around it stay readable;
* anywhere else (a log file, a deployment's SuperExec), a plain log line every ``interval_s``
  seconds, and one when the wait ends; nothing for a wait shorter than ``interval_s``.

The clock and the stream are injected, so tests drive it without waiting.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 30.0


class RoundProgress:
    """Reports ``replied / sampled`` and the elapsed time of one round's wait for replies."""

    def __init__(
        self,
        server_round: int,
        sampled: int,
        *,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float = DEFAULT_INTERVAL_S,
        tty: bool | None = None,
    ) -> None:
        """Start the round's clock.

        Args:
            server_round: the round being waited on.
            sampled: how many sites were sent the round's model.
            stream: where a terminal status line goes (default: standard error).
            clock: seconds, monotonic (injected by tests).
            interval_s: seconds between log lines when ``stream`` is not a terminal.
            tty: whether ``stream`` is a terminal (default: ask the stream).
        """
        if not interval_s > 0:
            raise ValueError(f"Expected interval_s > 0, got {interval_s=}")
        self.server_round = server_round
        self.sampled = sampled
        self.stream = stream if stream is not None else sys.stderr
        self.clock = clock
        self.interval_s = interval_s
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.started = clock()
        self.replied = 0
        self._last_logged = self.started
        self._line = StatusLine(self.stream)
        self._drawn = self.started  # when it was last drawn
        self._logged = False

    def text(self) -> str:
        """The status, e.g. ``round 3: 2/4 sites replied, 1 min 05 s``."""
        return (
            f"round {self.server_round}: {self.replied}/{self.sampled} sites replied, "
            f"{format_elapsed(self.clock() - self.started)}"
        )

    def update(self, replied: int) -> None:
        """Note that ``replied`` sites have answered so far; show or log it as due.

        On a terminal the line is redrawn when the count changes and at most once a second
        otherwise; without one, a line is logged every ``interval_s``.
        """
        changed, self.replied = replied != self.replied, replied
        if self.tty:
            # redraw when there is news: the count, a cleared line, or the next whole second
            if changed or not self._line.width or self.clock() - self._drawn >= 1.0:
                self._show(self.text())
        elif self.clock() - self._last_logged >= self.interval_s:
            self._last_logged = self.clock()
            self._logged = True
            logger.info("%s", self.text())

    def clear(self) -> None:
        """Blank the terminal status line, e.g. before work that may log (the next update redraws)."""
        if self.tty:
            self._line.clear()

    def close(self) -> None:
        """The wait is over: clear the terminal line, or log the final count if lines were logged."""
        self.clear()
        if not self.tty and self._logged:
            logger.info("%s (wait over)", self.text())

    def _show(self, line: str) -> None:
        self._line.show(line)
        self._drawn = self.clock()


class StatusLine:
    """One terminal line rewritten in place: each ``show`` overwrites the last, ``clear`` blanks it."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.width = 0  # length of the line on screen, to blank it out

    def show(self, line: str) -> None:
        padding = " " * max(0, self.width - len(line))
        self.stream.write(f"\r{line}{padding}")
        self.stream.flush()
        self.width = len(line)

    def clear(self) -> None:
        if self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def format_elapsed(seconds: float) -> str:
    """``42 s``, ``3 min 07 s`` or ``1 h 02 min``."""
    whole = max(0, int(seconds))
    if whole < 60:
        return f"{whole} s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or stream-like object without a terminal
        return False
