"""``facefed audit``: verify a privacy ledger, render its report, make signing keys.

* ``facefed audit verify LEDGER [--coordinator-key PUB] [--site-key SITE=PUB] [--require-closed]
  [--require-secret-noise]`` exits 0 only if the chain, both signatures, the run id, the rounds, every
  epsilon and what can be checked of the lifetime epsilon check out (and, with the options, the run
  was closed and every release's noise was secret); otherwise it names the first bad entry and
  exits 4 (:class:`IntegrityError`'s code).
* ``facefed audit report LEDGER --html FILE [--json FILE]`` writes the officer's report (and exits 4
  after writing it if verification failed).
* ``facefed audit keygen PRIVATE PUBLIC`` writes an Ed25519 key pair (private key mode 0600).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from common.atomic import atomic_write_text
from common.crypto.signing import (
    Ed25519PublicKey,
    fingerprint,
    generate_private_key,
    load_public_key,
    save_private_key,
    save_public_key,
)
from common.errors import ConfigError, IntegrityError
from common.privacy.verify import VerificationResult, verify_ledger

LIFETIME_NOTE = (
    "note: eps is this run's, recomputed; lifetime is each site's own total over all its runs, "
    "which this ledger cannot recompute: checked only to be >= eps and never to decrease"
)


def _site_keys(pairs: list[str]) -> dict[str, Ed25519PublicKey]:
    keys = {}
    for pair in pairs:
        site, sep, path = pair.partition("=")
        if not sep or not site or not path:
            raise ConfigError(f"--site-key {pair!r} must look like SITE_ID=path/to/site.pub")
        keys[site] = load_public_key(path)
    return keys


def _verify(args: argparse.Namespace) -> VerificationResult:
    return verify_ledger(
        args.ledger,
        coordinator_key=load_public_key(args.coordinator_key) if args.coordinator_key else None,
        site_keys=_site_keys(args.site_key),
        require_closed=args.require_closed,
        require_secret_noise=args.require_secret_noise,
        cross_check=not getattr(args, "no_cross_check", False),
    )


def format_result(result: VerificationResult) -> str:
    """Return the human-readable verification text that ``audit verify`` prints."""
    pinned = "pinned" if result.coordinator_pinned else "NOT pinned"
    unit_width = max([8, *(len(s.privacy_unit) for s in result.sites)])
    lines = [
        f"ledger      {result.path}",
        f"run         {result.run_id}",
        f"coordinator {result.coordinator_fingerprint} ({pinned})",
        f"entries     {len(result.entries)}; run closed: {'yes' if result.closed else 'no'}",
        "",
        f"{'site':<16} {'guarantee':<14} {'unit':<{unit_width}} {'rounds':>6} {'noise':<13} {'eps':>9} "
        f"{'lifetime':>9} {'budget':>9} {'left':>9}   cross-check at delta",
    ]
    for s in result.sites:
        cross = "  ".join(f"{a.upper()} {v:.4f}" for a, v in s.cross_check.items())
        lines.append(
            f"{s.site_id:<16} {s.guarantee:<14} {s.privacy_unit:<{unit_width}} {len(s.rounds):>6} "
            f"{'+'.join(s.noise_kinds):<13} {s.cumulative:>9.4f} {s.lifetime:>9.4f} "
            f"{s.budget:>9.4f} {s.remaining:>9.4f}   {cross}  (δ={s.delta:g})"
        )
    if result.sites:
        lines.append(LIFETIME_NOTE)
    lines += [f"warning: {w}" for w in result.warnings]
    if result.ok:
        secret = "; every release's noise secret" if result.secret_noise_required else ""
        lines.append(f"OK: chain, signatures, run id, rounds and every epsilon verified{secret}")
    else:
        lines.append(f"FAIL: first bad entry: {result.first_error}")
        lines += [f"  {f}" for f in result.errors]
    return "\n".join(lines)


def _cmd_verify(args: argparse.Namespace) -> int:
    result = _verify(args)
    print(format_result(result))
    return 0 if result.ok else IntegrityError.exit_code


def _cmd_report(args: argparse.Namespace) -> int:
    from server.audit_report import render_html, summary  # matplotlib only when needed

    empirical = None
    if args.empirical:
        from server.audit_empirical import load_report

        empirical = load_report(args.empirical)
    result = _verify(args)
    atomic_write_text(args.html, render_html(result, empirical))
    if args.json:
        data: dict[str, Any] = summary(result)
        if empirical is not None:
            data["empirical_audit"] = empirical
        atomic_write_text(args.json, json.dumps(data, indent=2, sort_keys=True) + "\n")
    print(format_result(result))
    print(f"report written to {args.html}" + (f" and {args.json}" if args.json else ""))
    return 0 if result.ok else IntegrityError.exit_code


def _cmd_keygen(args: argparse.Namespace) -> int:
    for path in (args.private, args.public):
        if os.path.exists(path) and not args.force:
            raise ConfigError(f"{path} already exists; pass --force to overwrite it")
    key = generate_private_key()
    passphrase = os.environ.get(args.passphrase_env, "").encode() if args.passphrase_env else None
    save_private_key(key, args.private, passphrase=passphrase or None)
    save_public_key(key.public_key(), args.public)
    print(
        f"wrote {args.private} (0600) and {args.public}; "
        f"fingerprint {fingerprint(key.public_key())}"
    )
    return 0


def _add_verify_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("ledger", metavar="LEDGER", help="the ledger.db of a run")
    parser.add_argument(
        "--coordinator-key", metavar="PUB", help="pin the coordinator's public key (PEM)"
    )
    parser.add_argument(
        "--site-key",
        metavar="SITE=PUB",
        action="append",
        default=[],
        help="pin a site's public key (repeatable)",
    )
    parser.add_argument(
        "--require-closed",
        action="store_true",
        help="fail if the run has no closing entry (use for finished runs)",
    )
    parser.add_argument(
        "--require-secret-noise",
        action="store_true",
        help="fail if any release's noise was seeded rather than drawn from the OS CSPRNG "
        "(use for deployments; only research simulations may seed it)",
    )


def register(subparsers: Any) -> None:
    """Add ``audit`` and its subcommands to the ``facefed`` parser."""
    audit = subparsers.add_parser("audit", help="verify a privacy ledger and render its report")
    sub = audit.add_subparsers(dest="audit_command", metavar="SUBCOMMAND", required=True)

    verify = sub.add_parser(
        "verify", help="check chain, signatures, rounds; recompute every epsilon"
    )
    _add_verify_options(verify)
    verify.add_argument("--no-cross-check", action="store_true", help="skip PRV/RDP/PLD totals")
    verify.set_defaults(func=_cmd_verify)

    report = sub.add_parser("report", help="write the self-contained HTML (and JSON) report")
    _add_verify_options(report)
    report.add_argument("--html", required=True, metavar="FILE", help="HTML report to write")
    report.add_argument("--json", metavar="FILE", help="also write the report data as JSON")
    report.add_argument(
        "--empirical",
        metavar="FILE",
        help="add an `audit empirical --json` result: its lower bounds beside the claimed epsilon",
    )
    report.set_defaults(func=_cmd_report)

    from server import audit_empirical

    audit_empirical.register(sub)

    keygen = sub.add_parser("keygen", help="write an Ed25519 key pair for a site or coordinator")
    keygen.add_argument("private", metavar="PRIVATE", help="private key file to write (0600)")
    keygen.add_argument("public", metavar="PUBLIC", help="public key file to write")
    keygen.add_argument(
        "--passphrase-env", metavar="VAR", help="encrypt with the passphrase in $VAR"
    )
    keygen.add_argument("--force", action="store_true", help="overwrite existing files")
    keygen.set_defaults(func=_cmd_keygen)
