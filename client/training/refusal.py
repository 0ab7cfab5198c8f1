"""A site's refusals as the coordinator sees them: fixed texts, never data or exception text.

A site that will not train a round (its policy, its budget, a replayed round, its state) says so in
one line built only from a code name, its index and a short setting name,
``site-N refused: <code> (<setting>)``, with the code's number as the error code. Anything else
that goes wrong leaves as :data:`SITE_INTERNAL_ERROR_REASON`. The numbers and the full reason stay in
the site's own log. The egress guard (:mod:`client.training.egress`) lets no other error text leave.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from types import MappingProxyType

from flwr.app import Error

SITE_INTERNAL_ERROR_CODE = 4_100
SITE_INTERNAL_ERROR_REASON = "site-internal-error"
REFUSAL_CODES: Mapping[str, int] = MappingProxyType(
    {"policy": 4_101, "budget": 4_102, "replay": 4_103, "state": 4_104, "data": 4_105}
)
MAX_SITE_INDEX = 999_999
_SETTING = re.compile(r"[a-z][a-z0-9-]{0,39}")
_SITE_REFUSAL = re.compile(
    r"site-(0|[1-9][0-9]{0,5}) refused: ([a-z]+) \(" + _SETTING.pattern + r"\)"
)


class SiteRefusal(Exception):
    """A site's deliberate refusal, sent as one fixed text: ``site-N refused: <code> (<setting>)``.

    Raise it from the handler; the guard replies ``Error(REFUSAL_CODES[code_name], reason)``. The
    text is built only from a code name, the site index and a short setting name; ``detail`` (say,
    the numbers) is logged at the site and never sent.
    """

    def __init__(self, code_name: str, site_index: int, setting: str, *, detail: str = "") -> None:
        if code_name not in REFUSAL_CODES:
            raise ValueError(
                f"unknown refusal code {code_name!r}; use one of {list(REFUSAL_CODES)}"
            )
        if isinstance(site_index, bool) or not 0 <= site_index <= MAX_SITE_INDEX:
            raise ValueError(f"Expected 0 <= {site_index=} <= {MAX_SITE_INDEX}")
        if not isinstance(setting, str) or not _SETTING.fullmatch(setting):
            raise ValueError(f"setting must match {_SETTING.pattern!r}, got {str(setting)[:60]!r}")
        self.code = REFUSAL_CODES[code_name]
        self.reason = f"site-{site_index} refused: {code_name} ({setting})"
        self.detail = detail
        super().__init__(self.reason)


def is_site_refusal(error: Error) -> bool:
    """Whether ``error`` is exactly one of the texts :class:`SiteRefusal` produces, with its code."""
    match = _SITE_REFUSAL.fullmatch(error.reason or "")
    return match is not None and REFUSAL_CODES.get(match.group(2)) == error.code
