"""The ``facefed`` command: one entry point, one module per subcommand group.

Each subcommand module exposes ``register(subparsers) -> None``; it adds its parser and sets
``func=callable(args) -> int`` as the parser default. Modules are imported only when their command is
named, so ``facefed --help`` stays fast and a broken optional piece cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys
from collections.abc import Callable, Sequence
from typing import NoReturn

from common.errors import EXIT_BAD_INPUT, EXIT_INTERRUPTED, FacefedError

logger = logging.getLogger(__name__)

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulations.cli", "run a federated simulation on one machine or a Ray cluster"),
    "evaluate": ("common.evaluate_cli", "score a checkpoint on LFW / FER2013-layout folders"),
    "site": ("client.recogniser.site_cli", "on-device face pipeline and encrypted template store"),
    "audit": ("server.audit_cli", "verify a privacy ledger and render its report"),
    "deploy": ("server.deploy_cli", "provision and start a real SuperLink / SuperNode federation"),
    "report": ("server.run_report_cli", "render runs' accuracy, privacy and timing as HTML"),
    "data": ("common.data.check_cli", "check a data folder before a run; clear the face cache"),
    "convert-dlib": (
        "common.facenet.convert_cli",
        "convert dlib's pretrained face network into a facefed weights file",
    ),
}


class OneLineParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one ``facefed: error:`` line and exit code 2.

    Sub-parsers inherit the class (``add_subparsers`` uses ``type(self)``), so every command's
    bad flag reads the same way as a :class:`FacefedError`.
    """

    def error(self, message: str) -> NoReturn:
        message = " ".join(message.split("\n"))  # a typed value may hold a newline
        self.exit(EXIT_BAD_INPUT, f"facefed: error: {message} (see `{self.prog} --help`)\n")


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def bounded_int(low: int, high: int) -> Callable[[str], int]:
    """argparse type: an integer in ``[low, high]``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"must be a whole number in [{low}, {high}], got {text!r}"
            )
        return value

    parse.__name__ = f"whole number in [{low}, {high}]"
    return parse


def bounded_float(low: float, high: float, *, open_low: bool = False) -> Callable[[str], float]:
    """argparse type: a finite float in ``[low, high]`` (``(low, high]`` with ``open_low``)."""
    interval = f"{'(' if open_low else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        below = value <= low if open_low else value < low
        if not math.isfinite(value) or below or value > high:
            raise argparse.ArgumentTypeError(f"must be a number in {interval}, got {text!r}")
        return value

    parse.__name__ = f"number in {interval}"
    return parse


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Build the top-level parser, importing only the subcommand that ``argv`` names."""
    parser = OneLineParser(
        prog="facefed", description="Privacy-preserving federated face recognition."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = next((a for a in argv if a in COMMANDS), None)
    for name, (module, help_text) in COMMANDS.items():
        if name == wanted:
            try:
                importlib.import_module(module).register(sub)
            except ModuleNotFoundError as exc:
                if exc.name != module:
                    raise
                sub.add_parser(name, help=f"{help_text} (not available in this build)")
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def configure_logging(verbose: bool) -> None:
    # Opacus and Flower configure loggers at import; reset the root logger here, in the entry point.
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    # Flower logs through its own console handler; keep it from printing every line twice.
    logging.getLogger("flwr").propagate = False
    for noisy in ("alembic", "ray", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``facefed`` command; return the process exit code."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(args_list)
    try:
        args = parser.parse_args(args_list)
    except SystemExit as exc:  # --help (0) or a usage error (2), already printed on one line
        return exc.code if isinstance(exc.code, int) else EXIT_BAD_INPUT
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    configure_logging(args.verbose)
    return report_errors("facefed", lambda: int(args.func(args) or 0))


def report_errors(prog: str, command: Callable[[], int]) -> int:
    """Run ``command``; turn a FacefedError into one ``prog: error: ...`` line and its exit code.

    The codes are the table in :mod:`common.errors` (docs/exit-codes.md).
    """
    try:
        return command()
    except FacefedError as exc:
        message = " ".join(str(exc).split("\n"))  # one line, whatever the message holds
        print(f"{prog}: error: {message}", file=sys.stderr)
        return exc.exit_code
    except OSError as exc:  # a file the command was pointed at: unreadable, a folder, gone
        logger.debug("%s failed", prog, exc_info=True)
        where = f" {exc.filename}" if exc.filename else ""
        print(
            f"{prog}: error: cannot use{where} ({exc.strerror or exc}); check the path and its "
            "permissions (-v shows where it happened)",
            file=sys.stderr,
        )
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
