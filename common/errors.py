"""The one exception type that the ``facefed`` command turns into a one-line error.

Library code raises :class:`FacefedError` (or a subclass) for every problem a user can fix: a missing
dataset, a corrupt image, a bad config key, a privacy precondition that is not met. The message must say
what is wrong *and* what to do about it. The CLI prints it on one line and exits non-zero; it never shows
a traceback for these.
"""

from __future__ import annotations


class FacefedError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code: int = 2


class DataError(FacefedError):
    """A dataset or input file is missing, unreadable or malformed."""


class ConfigError(FacefedError):
    """A configuration key or value is invalid."""


class PrivacyBudgetError(FacefedError):
    """Training would exceed, or cannot prove it stays within, the privacy budget (fails closed)."""

    exit_code = 3


class IntegrityError(FacefedError):
    """Stored state (checkpoint, ledger, template record) failed an integrity or authenticity check."""

    exit_code = 4
