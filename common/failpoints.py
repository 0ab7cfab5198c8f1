"""Named crash points for fault-injection runs (``bench/faults.py``); inert unless the variable is set.

``FACEFED_FAILPOINT=NAME`` or ``NAME:N`` makes the process kill its own process group with SIGKILL at the
N-th time (default: first) execution passes :func:`failpoint` with that name, as a machine losing power at
exactly that instruction would. Only a process-group leader fires (the ``facefed`` process started in its
own session), so the Ray workers of a simulation, which inherit the variable, never do. The names used
in facefed:

* ``atomic.before-rename``: a file's bytes are written and fsynced, the rename has not happened;
* ``ledger.before-commit``: a ledger row is inserted, its transaction not committed;
* ``round.replied``: a round's replies are in, nothing of it is aggregated or recorded yet;
* ``round.aggregated``: a round is aggregated and recorded in the ledger, not yet checkpointed.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "FACEFED_FAILPOINT"

_hits: Counter[str] = Counter()


def failpoint(name: str) -> None:
    """Crash here (SIGKILL to the whole process group) if ``FACEFED_FAILPOINT`` selects this point."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, nth = spec.partition(":")
    if target != name or os.getpgid(0) != os.getpid():
        return
    _hits[name] += 1
    if _hits[name] >= int(nth or 1):
        os.killpg(os.getpgid(0), signal.SIGKILL)
