"""The auditor's check of a ledger: integrity, then every epsilon recomputed from the mechanisms.

:func:`verify_ledger` needs nothing but the ledger file (and, ideally, the coordinator's public key
obtained out of band). It trusts no number the sites or the coordinator wrote: for each entry it
recomputes epsilon for the round and cumulatively, with the accountant the entry names, from the
recorded ``(noise_multiplier, sample_rate, steps)`` of that site's entries so far, and flags any
recorded value more than 1% off. For each site's final total it also runs every available accountant
(PRV, RDP, PLD) as an independent cross-check.

A site's *lifetime* epsilon composes every run it ever took part in; one run's ledger holds only that
run's events, so the auditor cannot recompute it. It checks what one ledger can show: the lifetime is
at least the run's recomputed cumulative epsilon, and it never decreases from entry to entry. With
``require_secret_noise`` every entry must record ``"noise": "secret"`` (OS CSPRNG, fresh per release);
the first ``"seeded"`` one is an error.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from common.crypto.signing import Ed25519PublicKey, fingerprint
from common.errors import FacefedError
from common.privacy.accounting import available_accountants, compute_epsilon
from common.privacy.chain import ChainEntry, Finding, check_chain
from common.privacy.entry import EntryBody, NoiseKind
from common.privacy.ledger import (
    EPSILON_TOLERANCE,
    lifetime_problem,
    read_rows,
    relative_mismatch,
)

CROSS_CHECK_TOLERANCE = 0.05  # relative gap between PRV and PLD that earns a warning


@dataclass(frozen=True)
class RoundCheck:
    """One round entry with the epsilons the auditor recomputed for it."""

    seq: int
    body: EntryBody
    epsilon_round: float
    epsilon_cumulative: float


@dataclass
class SiteSummary:
    """One site's spending under one guarantee kind."""

    site_id: str
    guarantee: str
    privacy_unit: str
    delta: float
    rounds: list[RoundCheck] = field(default_factory=list)
    cross_check: dict[str, float] = field(default_factory=dict)

    @property
    def budget(self) -> float:
        """The approved budget, as recorded in the site's last entry."""
        return self.rounds[-1].body.budget_epsilon

    @property
    def cumulative(self) -> float:
        """The recomputed cumulative epsilon after the site's last entry."""
        return self.rounds[-1].epsilon_cumulative

    @property
    def remaining(self) -> float:
        """Budget minus spent (negative if exceeded)."""
        return self.budget - self.cumulative

    @property
    def lifetime(self) -> float:
        """The site's lifetime epsilon (all runs) as recorded in its last entry; not recomputable."""
        return self.rounds[-1].body.epsilon_lifetime

    @property
    def units(self) -> dict[str, str]:
        """Each model's privacy unit, e.g. ``{"face": "person", "emotion": "example"}``."""
        return {m.name: m.unit for r in self.rounds for m in r.body.mechanisms}

    @property
    def noise_kinds(self) -> tuple[NoiseKind, ...]:
        """The noise kinds of the site's entries, ``("secret",)`` when every release was secret."""
        return tuple(sorted({r.body.noise for r in self.rounds}))


@dataclass
class VerificationResult:
    """Everything ``facefed audit verify`` and ``report`` show."""

    path: str
    run_id: str | None
    coordinator_fingerprint: str | None
    coordinator_pinned: bool
    closed: bool
    entries: list[ChainEntry]
    errors: list[Finding]
    warnings: list[str]
    sites: list[SiteSummary]
    secret_noise_required: bool = False

    @property
    def ok(self) -> bool:
        """True when no error was found."""
        return not self.errors

    @property
    def first_error(self) -> Finding | None:
        """The error at the lowest entry number, or None."""
        return min(self.errors, key=lambda f: f.seq) if self.errors else None


def _recompute(entries: list[ChainEntry], errors: list[Finding]) -> list[SiteSummary]:
    sites: dict[tuple[str, str], SiteSummary] = {}
    for entry in entries:
        body = entry.body
        if body is None:
            continue
        site = sites.setdefault(
            body.stream, SiteSummary(body.site_id, body.guarantee, body.privacy_unit, body.delta)
        )
        history = [m for r in site.rounds for m in r.body.mechanisms] + list(body.mechanisms)

        def bad(message: str, body: EntryBody = body, seq: int = entry.seq) -> None:
            errors.append(Finding(seq, message, body.site_id, body.round))

        try:
            eps_round = compute_epsilon(body.mechanisms, body.delta, body.accountant)
            eps_cum = compute_epsilon(history, body.delta, body.accountant)
        except FacefedError as exc:
            bad(f"cannot recompute epsilon: {exc}")
            continue
        for name, recorded, recomputed in (
            ("round", body.epsilon_round, eps_round),
            ("cumulative", body.epsilon_cumulative, eps_cum),
        ):
            if relative_mismatch(recorded, recomputed) > EPSILON_TOLERANCE:
                bad(
                    f"recorded {name} epsilon {recorded:.4f} but {body.accountant} recomputes "
                    f"{recomputed:.4f} from the recorded mechanisms"
                )
        for m in body.mechanisms:
            before = {e.unit for e in history if e.name == m.name} - {m.unit}
            if before:
                bad(
                    f"the {m.name} model changes privacy unit from {sorted(before)[0]} to {m.unit} "
                    "within one site's stream; its cumulative epsilon holds for neither unit"
                )
        if eps_cum > body.budget_epsilon:
            bad(f"cumulative epsilon {eps_cum:.4f} exceeds the budget {body.budget_epsilon:.4f}")
        problem = lifetime_problem(body, site.rounds[-1].body if site.rounds else None, eps_cum)
        if problem is not None:
            bad(problem)
        site.rounds.append(RoundCheck(entry.seq, body, eps_round, eps_cum))
    return list(sites.values())


def _cross_check(sites: list[SiteSummary], warnings: list[str]) -> None:
    for site in sites:
        events = [m for r in site.rounds for m in r.body.mechanisms]
        for accountant in available_accountants():
            try:
                site.cross_check[accountant] = compute_epsilon(events, site.delta, accountant)
            except FacefedError as exc:
                warnings.append(f"site {site.site_id}: {accountant} cross-check failed: {exc}")
        prv, pld = site.cross_check.get("prv"), site.cross_check.get("pld")
        if (
            prv is not None
            and pld is not None
            and relative_mismatch(prv, pld) > CROSS_CHECK_TOLERANCE
        ):
            warnings.append(
                f"site {site.site_id}: PRV {prv:.4f} and PLD {pld:.4f} differ by more than "
                f"{CROSS_CHECK_TOLERANCE:.0%}; check the accountants' numerical settings"
            )


def _first_seeded(entries: list[ChainEntry]) -> Finding | None:
    seeded = [(e.seq, e.body) for e in entries if e.body is not None and e.body.noise == "seeded"]
    if not seeded:
        return None
    seq, body = seeded[0]
    return Finding(
        seq,
        f"noise was seeded (reproducible from a seed), not secret (seeded entries in all: "
        f"{len(seeded)}); --require-secret-noise accepts only noise from the OS CSPRNG",
        body.site_id,
        body.round,
    )


def verify_ledger(
    path: str | os.PathLike[str],
    *,
    coordinator_key: Ed25519PublicKey | None = None,
    site_keys: Mapping[str, Ed25519PublicKey] | None = None,
    require_closed: bool = False,
    require_secret_noise: bool = False,
    cross_check: bool = True,
) -> VerificationResult:
    """Verify a ledger file end to end; see the module docstring.

    Args:
        path: the ledger database.
        coordinator_key: pin the coordinator's public key (strongly recommended).
        site_keys: pin sites' public keys, by site id.
        require_closed: make a ledger without its closing entry an error (a finished run must have
            one; without it the last entries could have been cut off).
        require_secret_noise: make the first entry whose noise is ``"seeded"`` an error (a
            deployment must draw noise from the OS CSPRNG; only research simulations may seed it).
        cross_check: also compute each site's total with every available accountant.

    Raises:
        IntegrityError: the file is missing or not a ledger.
    """
    rows, keys = read_rows(path)
    chain = check_chain(rows, keys, pinned_coordinator=coordinator_key, pinned_sites=site_keys)
    errors, warnings = list(chain.errors), list[str]()
    sites = _recompute(chain.entries, errors)
    if cross_check:
        _cross_check(sites, warnings)
    if not chain.closed:
        message = "the run has no closing entry: still running, or its last entries were cut off"
        if require_closed:
            errors.append(Finding(len(rows), message))
        else:
            warnings.append(message)
    seeded = _first_seeded(chain.entries) if require_secret_noise else None
    if seeded is not None:
        errors.append(seeded)
    if coordinator_key is None:
        warnings.append(
            "coordinator key not pinned: compare its fingerprint with the one the coordinator "
            "published, or pass --coordinator-key"
        )
    return VerificationResult(
        path=str(path),
        run_id=chain.run_id,
        coordinator_fingerprint=fingerprint(chain.coordinator_key)
        if chain.coordinator_key
        else None,
        coordinator_pinned=coordinator_key is not None,
        closed=chain.closed,
        entries=chain.entries,
        errors=sorted(errors, key=lambda f: f.seq),
        warnings=warnings,
        sites=sites,
        secret_noise_required=require_secret_noise,
    )
