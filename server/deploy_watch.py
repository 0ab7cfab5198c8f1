"""What ``facefed deploy submit`` shows while its run is in flight: rounds, privacy, waiting sites.

Flower's ``flwr ls`` knows only that a run is ``running``. The coordinator's ServerApp rewrites the
run's ``results.json`` (in the kit's ``out-dir``) after every round, and the SuperLink knows which
SuperNodes are online (``deploy nodes``). :class:`RunWatch` joins the two into words:

* a line per finished round: LFW and FER accuracy, each site's epsilon against its budget, how many
  of the sampled sites replied;
* the waiting state: ``waiting for site-2 (offline since 21:35)`` before the first round can start,
  ``round 2: training on the sites`` while one runs;
* once, after ``warn_after_s`` seconds of waiting for sites that do not come: that the run will fail
  when the ServerApp's own wait for every site ends (600 s after it started), and what to do.

On a terminal the waiting state is one status line rewritten in place; anywhere else a plain log
line whenever the state changes, and every ``interval_s`` while it does not. A ``results.json`` left
by an earlier run in the same ``out-dir`` is ignored until it changes (:func:`file_stamp`).

Every input is injected (the results path, the node listing, both clocks, the output), so the unit
tests drive it with a growing file, a fake clock and fake node listings.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TextIO

from common.errors import DataError, FacefedError
from server.progress import StatusLine, format_elapsed
from server.run_report import RoundSummary, load_run, site_order

logger = logging.getLogger(__name__)

Stamp = tuple[int, int, int]  # (inode, mtime ns, size) of a file; None when it does not exist
NodeRows = Sequence[Mapping[str, Any]]  # rows of ``deploy nodes`` (server.deploy_cli.site_nodes)

SERVERAPP_SITE_WAIT_S = 600.0  # server/strategy.py: wait_timeout_s, the wait for every site
DEFAULT_WARN_AFTER_S = 60.0
DEFAULT_INTERVAL_S = 60.0
_NOT_RECORDED = "N/A"  # what `flwr supernode list --format json` writes for a time it has not
_GONE = {"online", "revoked", "unregistered", "deleted"}  # not absent: online, or never coming


def file_stamp(path: Path) -> Stamp | None:
    """What identifies one version of ``path`` (None: no such file)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def format_when(value: object, now: dt.datetime) -> str:
    """A Flower ISO timestamp as the local ``21:35`` (today) or ``2026-11-30 21:35``."""
    if not isinstance(value, str) or value in {"", _NOT_RECORDED}:
        return "never"
    try:
        when = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return value
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    local, today = when.astimezone(now.tzinfo), now
    return local.strftime("%H:%M" if local.date() == today.date() else "%Y-%m-%d %H:%M")


def site_absence(row: Mapping[str, Any], now: dt.datetime) -> str:
    """Why a site is not online, in words: ``offline since 21:35``, ``never connected``, ..."""
    status = str(row.get("status", ""))
    if status in {"revoked", "not registered"}:
        return status
    if status == "offline":
        when = row.get("offline-at")
        return (
            "offline"
            if when in {None, "", _NOT_RECORDED}
            else f"offline since {format_when(when, now)}"
        )
    if status == "registered":  # registered, its SuperNode never connected
        return "never connected"
    return status or "unknown"


def _number(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def round_line(r: RoundSummary, num_rounds: int | None) -> str:
    """``round 1/2 done: LFW 0.712, FER 0.431 | epsilon site-1 1.23 of 8 ... | 2/2 replied | 95 s``."""
    parts = [f"LFW {_number(r.lfw_accuracy)}", f"FER {_number(r.fer_accuracy)}"]
    eps = []
    for site, s in sorted(r.sites.items(), key=lambda item: site_order(item[0])):
        value = "inf (no DP)" if math.isinf(s.epsilon) else f"{s.epsilon:.2f}"
        budget = f" of {s.budget:g}" if s.budget is not None else ""
        eps.append(f"{site} {value}{budget}")
    of = f"/{num_rounds}" if num_rounds else ""
    line = f"round {r.round}{of} done: {', '.join(parts)}"
    line += f" | epsilon {', '.join(eps)}" if eps else ""
    if r.sampled is not None and r.replied is not None:
        line += f" | {r.replied}/{r.sampled} sites replied"
    if r.dropouts:
        line += f" ({len(r.dropouts)} dropped out)"
    if r.time_s is not None:
        line += f" | {format_elapsed(r.time_s)}"
    return line


class RunWatch:
    """Turns polls of a run into round lines and a waiting state (see the module docstring)."""

    def __init__(
        self,
        *,
        run_id: int,
        results: Path | None,
        baseline: Stamp | None,
        num_sites: int,
        nodes: Callable[[], NodeRows],
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], dt.datetime] = lambda: dt.datetime.now().astimezone(),
        stream: TextIO | None = None,
        tty: bool | None = None,
        emit: Callable[[str], None] | None = None,
        nodes_every_s: float = 10.0,
        warn_after_s: float = DEFAULT_WARN_AFTER_S,
        interval_s: float = DEFAULT_INTERVAL_S,
    ) -> None:
        """Start watching.

        Args:
            run_id: Flower's run id (for the hints).
            results: the run's ``results.json`` (None: an app that writes none).
            baseline: its :func:`file_stamp` before the run was submitted; that version is ignored.
            num_sites: how many sites the run waits for before its first round.
            nodes: the current ``deploy nodes`` rows (may raise; the last answer is kept).
            clock: monotonic seconds; ``now``: the wall clock, for "offline since".
            stream: where a terminal status line goes (default: standard error); ``tty``: whether
                it is a terminal (default: ask it).
            emit: where lasting lines go (default: an INFO log line).
            nodes_every_s: seconds between node listings (each is a ``flwr`` call).
            warn_after_s: seconds of waiting for absent sites before the early warning.
            interval_s: without a terminal, seconds between repeats of an unchanged state.
        """
        self.run_id, self.results, self.baseline = run_id, results, baseline
        self.num_sites, self._nodes = num_sites, nodes
        self.clock, self.now = clock, now
        self.stream = stream if stream is not None else sys.stderr
        self.tty = _is_tty(self.stream) if tty is None else tty
        self.emit = emit if emit is not None else (lambda line: logger.info("%s", line))
        self.nodes_every_s, self.warn_after_s, self.interval_s = (
            nodes_every_s,
            warn_after_s,
            interval_s,
        )
        self.started = clock()
        self.rows: NodeRows = []
        self._nodes_at: float | None = None
        self.reported = 0  # the last round reported
        self.num_rounds: int | None = None
        self._state = ""  # the last waiting state, without its elapsed time
        self._state_since = self.started
        self._logged_at: float | None = None
        self._absent_since: float | None = None
        self._warned = False
        self._line = StatusLine(self.stream)

    # -- inputs -------------------------------------------------------------------------------
    def new_rounds(self) -> list[RoundSummary]:
        """Rounds of the current run's ``results.json`` not reported yet (none before it changed)."""
        if self.results is None or file_stamp(self.results) in (None, self.baseline):
            return []
        try:
            run = load_run(self.results)
        except DataError:  # a file mid-replacement or damaged: the next poll reads it again
            return []
        rounds = run.config.get("num-rounds")
        if isinstance(rounds, int) and not isinstance(rounds, bool):
            self.num_rounds = rounds
        fresh = [r for r in run.rounds if r.round > self.reported]
        if fresh:
            self.reported = fresh[-1].round
        return fresh

    def node_rows(self) -> NodeRows:
        """The node listing, at most every ``nodes_every_s`` seconds (the last one in between)."""
        if self._nodes_at is None or self.clock() - self._nodes_at >= self.nodes_every_s:
            self._nodes_at = self.clock()
            try:
                self.rows = list(self._nodes())
            except (FacefedError, OSError) as exc:  # a failed listing must not stop the wait
                logger.debug("node listing failed: %s", exc)
        return self.rows

    # -- the state ----------------------------------------------------------------------------
    def absent(self) -> list[str]:
        """``site (why)`` for each kit site that is not online and not revoked."""
        now = self.now()
        return [
            f"{row.get('site') or 'node ' + str(row.get('node-id'))} ({site_absence(row, now)})"
            for row in sorted(self.rows, key=lambda r: site_order(str(r.get("site") or "")))
            if row.get("status") not in _GONE
        ]

    def state(self, status: str) -> str:
        """The waiting state in words, without the elapsed time."""
        online = sum(1 for row in self.rows if row.get("status") == "online")
        absent = self.absent()
        if status.startswith(("pending", "starting")):
            return f"run {self.run_id} {status}: the SuperLink is starting the ServerApp"
        if self.reported == 0:
            if self.rows and online < self.num_sites and absent:
                return (
                    f"waiting for {'; '.join(absent)}: {online} of the {self.num_sites} sites the "
                    "run needs are online"
                )
            return "round 1: waiting for the sites' replies"
        if self.num_rounds and self.reported >= self.num_rounds:
            return f"all {self.num_rounds} rounds done: the ServerApp is closing the run"
        current = self.reported + 1
        text = f"round {current}" + (f"/{self.num_rounds}" if self.num_rounds else "")
        text += ": training on the sites"
        return text + (f"; {'; '.join(absent)}" if absent else "")

    def poll(self, record: Mapping[str, Any]) -> None:
        """One poll of the run (its ``flwr ls`` record): report new rounds and the waiting state."""
        status = str(record.get("status", ""))
        for r in self.new_rounds():
            self._lasting(round_line(r, self.num_rounds))
        if status.startswith("finished"):
            self.close()
            return
        self.node_rows()
        state = self.state(status)
        self._early_warning(status)
        if state != self._state:
            self._state, self._state_since, self._logged_at = state, self.clock(), None
        text = f"{state} ({format_elapsed(self.clock() - self._state_since)})"
        if self.tty:
            self._show(text)
        elif self._logged_at is None or self.clock() - self._logged_at >= self.interval_s:
            self._logged_at = self.clock()
            self.emit(text)

    def _early_warning(self, status: str) -> None:
        """Once: the run will fail if the absent sites do not come before the ServerApp gives up."""
        online = sum(1 for row in self.rows if row.get("status") == "online")
        waiting = (
            status.startswith("running")
            and self.reported == 0
            and bool(self.rows)
            and online < self.num_sites
        )
        if not waiting:
            self._absent_since = None
            return
        if self._absent_since is None:
            self._absent_since = self.clock()
        waited = self.clock() - self._absent_since
        if self._warned or waited < self.warn_after_s:
            return
        self._warned = True
        left = max(0.0, SERVERAPP_SITE_WAIT_S - (self.clock() - self.started))
        self._lasting(
            f"{', '.join(self.absent()) or 'a site'}: not connected after {format_elapsed(waited)}; "
            f"the run fails in about {format_elapsed(left)} unless {self.num_sites} sites are "
            "online. Start the missing SuperNodes (start-site.sh, or systemctl start "
            f"facefed-site on the site), or stop the run: flwr stop {self.run_id}"
        )

    # -- output -------------------------------------------------------------------------------
    def _lasting(self, line: str) -> None:
        self.clear()
        self.emit(line)

    def _show(self, line: str) -> None:
        self._line.show(line)

    def clear(self) -> None:
        """Blank the terminal status line (the next poll draws it again)."""
        if self.tty:
            self._line.clear()

    def close(self) -> None:
        """The run is over: report the rounds not reported yet and clear the status line."""
        for r in self.new_rounds():
            self._lasting(round_line(r, self.num_rounds))
        self.clear()


def _is_tty(stream: TextIO) -> bool:
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False
