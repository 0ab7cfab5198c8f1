"""The exception types that the ``facefed`` command turns into a one-line error and an exit code.

Library code raises :class:`FacefedError` (or a subclass) for every problem a user can fix: a missing
dataset, a corrupt image, a bad config key, a privacy precondition that is not met. The message must say
what is wrong *and* what to do about it. The CLI prints it on one line and exits with the subclass's
code; it never shows a traceback for these.

The exit codes are one table for every command (docs/exit-codes.md):

====  ===============================================================================================
0     success; ``site verify``: a match
1     a well-formed negative answer: ``site verify`` found no match, ``deploy submit``'s run failed
2     bad input: a command-line flag, a config value, an image or a dataset (:class:`DataError`,
      :class:`ConfigError`; argparse's usage errors too)
3     not found or refused: no such store or identity (:class:`NotFoundError`), a privacy budget
      that would be exceeded (:class:`PrivacyBudgetError`), an unsafe folder (:class:`RefusedError`)
4     integrity or key failure: tampered or damaged state, a wrong key, a key that cannot be
      read (:class:`IntegrityError`, :class:`KeyUnavailableError`)
130   interrupted (Ctrl-C)
====  ===============================================================================================
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_NEGATIVE = 1
EXIT_BAD_INPUT = 2
EXIT_NOT_FOUND_OR_REFUSED = 3
EXIT_INTEGRITY = 4
EXIT_INTERRUPTED = 130


class FacefedError(Exception):
    """A problem the user can fix; the message names the problem and the fix."""

    exit_code: int = EXIT_BAD_INPUT


class DataError(FacefedError):
    """A dataset or input file is missing, unreadable or malformed."""


class ConfigError(FacefedError):
    """A configuration key or value is invalid."""


class NotFoundError(FacefedError):
    """The thing the command acts on (a template store, an enrolled identity) does not exist."""

    exit_code = EXIT_NOT_FOUND_OR_REFUSED


class RefusedError(FacefedError):
    """The command refuses to act because acting would be unsafe (e.g. a shared store folder)."""

    exit_code = EXIT_NOT_FOUND_OR_REFUSED


class PrivacyBudgetError(FacefedError):
    """Training would exceed, or cannot prove it stays within, the privacy budget (fails closed)."""

    exit_code = EXIT_NOT_FOUND_OR_REFUSED


class IntegrityError(FacefedError):
    """Stored state (checkpoint, ledger, template record) failed an integrity or authenticity check."""

    exit_code = EXIT_INTEGRITY


class KeyUnavailableError(ConfigError):
    """The master key cannot be obtained: a missing key file, a failing key command, an empty fd.

    A :class:`ConfigError` (the operator can fix it) with the key-failure exit code.
    """

    exit_code = EXIT_INTEGRITY
