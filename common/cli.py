"""The ``facefed`` command: one entry point, one module per subcommand group.

Each subcommand module exposes ``register(subparsers) -> None``; it adds its parser and sets
``func=callable(args) -> int`` as the parser default. Modules are imported only when their command is
named, so ``facefed --help`` stays fast and a broken optional piece cannot break the others.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Callable, Sequence

from common.errors import FacefedError

# command name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "simulate": ("simulations.cli", "run a federated simulation on one machine or a Ray cluster"),
    "evaluate": ("common.evaluate_cli", "score a checkpoint on LFW / FER2013-layout folders"),
    "site": ("client.site_cli", "on-device face pipeline and encrypted template store"),
    "audit": ("server.audit_cli", "verify a privacy ledger and render its report"),
    "deploy": ("server.deploy_cli", "provision and start a real SuperLink / SuperNode federation"),
}


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """Build the top-level parser, importing only the subcommand that ``argv`` names."""
    parser = argparse.ArgumentParser(
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
    args = parser.parse_args(args_list)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    configure_logging(args.verbose)
    return report_errors("facefed", lambda: int(args.func(args) or 0))


def report_errors(prog: str, command: Callable[[], int]) -> int:
    """Run ``command``; turn a FacefedError into one ``prog: error: ...`` line and its exit code."""
    try:
        return command()
    except FacefedError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
