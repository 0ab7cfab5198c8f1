"""Helpers that build a small, realistic signed ledger for the privacy tests.

Two sites train a face model and an emotion model each round with DP-SGD (sigma 1.1;
q = 256/12800 and 64/1600); the coordinator adds client-level DP. The numbers are synthetic but
typical: this is an accounting/crypto fixture, not an accuracy claim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.crypto.signing import Ed25519PrivateKey, canonical_bytes, sign
from common.privacy.accounting import Accountant, compute_epsilon
from common.privacy.entry import make_round_body
from common.privacy.events import DpSgdEvent
from common.privacy.ledger import Ledger

DELTA = 1e-5
BUDGET = 8.0


def site_mechanisms() -> list[DpSgdEvent]:
    """One round on a site: a face-model epoch and an emotion-model epoch."""
    return [
        DpSgdEvent(noise_multiplier=1.1, sample_rate=0.02, steps=50, clip_norm=1.0, name="face"),
        DpSgdEvent(noise_multiplier=1.1, sample_rate=0.04, steps=25, clip_norm=1.0, name="emotion"),
    ]


def client_level_mechanism() -> list[DpSgdEvent]:
    """One round of client-level DP: 2 of 2 sites sampled, update clip 0.5."""
    return [
        DpSgdEvent(noise_multiplier=2.0, sample_rate=1.0, steps=1, clip_norm=0.5, name="update")
    ]


@dataclass(frozen=True)
class Keys:
    coordinator: Ed25519PrivateKey
    sites: dict[str, Ed25519PrivateKey]


def lifetime(
    earlier_runs: Sequence[DpSgdEvent],
    history: Sequence[DpSgdEvent],
    mechanisms: Sequence[DpSgdEvent],
    accountant: Accountant = "prv",
) -> float:
    """A site's lifetime epsilon: its earlier runs' events, this run's history and this round."""
    return compute_epsilon([*earlier_runs, *history, *mechanisms], DELTA, accountant)


def signed_round(
    ledger: Ledger,
    key: Ed25519PrivateKey,
    site_id: str,
    rnd: int,
    *,
    secret_noise: bool = True,
    earlier_runs: Sequence[DpSgdEvent] = (),
) -> None:
    """Build, sign (as the site) and append one realistic round entry.

    ``earlier_runs``: the site's events of its previous runs, which only its lifetime epsilon holds.
    """
    history = ledger.history(site_id)
    body = make_round_body(
        run_id=ledger.run_id,
        site_id=site_id,
        round=rnd,
        mechanisms=site_mechanisms(),
        history=history,
        delta=DELTA,
        budget_epsilon=BUDGET,
        model_hash=f"sha256:{rnd:064x}",
        secret_noise=secret_noise,
        epsilon_lifetime=lifetime(earlier_runs, history, site_mechanisms()),
    )
    ledger.append(body, key.public_key(), sign(key, canonical_bytes(body)))


def build_ledger(path: Path, run_id: str, keys: Keys, rounds: int, *, close: bool = True) -> Path:
    """Write a ledger: every site every round, plus the coordinator's client-level entry."""
    with Ledger.open(path, run_id=run_id, coordinator_key=keys.coordinator) as ledger:
        for rnd in range(1, rounds + 1):
            for site_id, key in keys.sites.items():
                signed_round(ledger, key, site_id, rnd)
            history = ledger.history("coordinator", "client-level")
            body = make_round_body(
                run_id=run_id,
                site_id="coordinator",
                round=rnd,
                mechanisms=client_level_mechanism(),
                history=history,
                secret_noise=True,
                epsilon_lifetime=lifetime((), history, client_level_mechanism(), "rdp"),
                delta=DELTA,
                budget_epsilon=20.0,
                model_hash=f"sha256:{rnd:064x}",
                guarantee="client-level",
                accountant="rdp",
            )
            ledger.append_coordinator(body)
        if close:
            ledger.finish("test run complete")
    return path
