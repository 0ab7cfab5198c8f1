"""The coordinator's side of the privacy ledger: record every site's signed round, and enforce budgets.

* Every training reply of a DP run must carry the site's signed privacy record. The coordinator rebuilds
  the entry body from it (:mod:`common.privacy.site_record`), and the ledger verifies the signature,
  recomputes epsilon and countersigns. A reply whose record is missing, malformed, mis-signed or over
  budget is refused, and its update is not aggregated (fail closed).
* Before each round the coordinator leaves out every site whose next round, at the mechanisms it ran
  last time, would take its recorded cumulative epsilon past its recorded budget.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from common.crypto.signing import (
    canonical_bytes,
    generate_private_key,
    load_private_key,
    public_key_from_bytes,
    save_private_key,
    save_public_key,
    verify,
)
from common.errors import FacefedError, IntegrityError
from common.privacy.accounting import Accountant, compute_epsilon, would_exceed
from common.privacy.entry import b64encode, make_entry_body, parse_entry_body
from common.privacy.events import DpSgdEvent
from common.privacy.ledger import Ledger
from common.privacy.site_record import RoundReport, site_id

logger = logging.getLogger(__name__)

COORDINATOR = "coordinator"


def coordinator_key(out_dir: Path) -> Ed25519PrivateKey:
    """The coordinator's signing key in ``OUT/keys/``, created on first use (0600)."""
    private, public = out_dir / "keys" / "coordinator.key", out_dir / "keys" / "coordinator.pub"
    if private.exists():
        return load_private_key(private)
    key = generate_private_key()
    save_private_key(key, private)
    save_public_key(key.public_key(), public)
    return key


class LedgerKeeper:
    """Owns the run's ledger; maps Flower node ids to sites as their records arrive."""

    def __init__(self, path: Path, accountant: Accountant, delta: float, run_id: str | None = None):
        self.run_id = run_id or uuid.uuid4().hex
        self.accountant = accountant
        self.delta = delta
        self.ledger = Ledger.open(
            path, run_id=self.run_id, coordinator_key=coordinator_key(path.parent)
        )
        self.site_of_node: dict[int, str] = {}
        self.model_hash = ""
        self.last_mechanisms: dict[str, tuple] = {}
        for entry in self.ledger.entries():  # a resumed run: what each site ran last
            if entry.guarantee == "example-level":
                self.last_mechanisms[entry.site_id] = entry.mechanisms

    def record(
        self, node_id: int, server_round: int, model_hash: str, record: object
    ) -> RoundReport:
        """Verify and append one reply's privacy record; raise FacefedError to refuse the update."""
        if record is None:
            raise IntegrityError(
                "reply carries no privacy record; a DP run accepts none without one"
            )
        report, signature, public_key = RoundReport.from_record(record)  # type: ignore[arg-type]
        if report.round != server_round:
            raise IntegrityError(f"privacy record is for round {report.round}, not {server_round}")
        site = site_id(report.site_index)
        known = self.site_of_node.get(node_id)
        if known is not None and known != site:
            raise IntegrityError(f"node {node_id} reported as {site} after reporting as {known}")
        body = report.entry_body(self.run_id, model_hash, self.accountant)
        if self._already_recorded(site, body, public_key, signature):
            # A resent round (after a resume, or an earlier round's record riding along): not charged again.
            logger.debug("%s round %d is already in the ledger", site, server_round)
        else:
            self.ledger.append(body, public_key_from_bytes(public_key), signature)
        self.site_of_node[node_id] = site
        self.last_mechanisms[site] = report.mechanisms
        return report

    def record_previous(self, node_id: int, record: object, hashes: dict[int, str]) -> None:
        """Record a site's resent earlier round, unless the ledger already holds it.

        ``hashes`` maps rounds to the global model's hash sent that round (the ledger's own entries
        for that round are used when the map lacks it, e.g. after a resume).
        """
        report, _, _ = RoundReport.from_record(record)  # type: ignore[arg-type]
        model_hash = hashes.get(report.round) or next(
            (e.model_hash for e in self.ledger.entries() if e.round == report.round), None
        )
        if model_hash is None:
            raise IntegrityError(
                f"resent record of round {report.round}: that round's model is unknown"
            )
        self.record(node_id, report.round, model_hash, record)

    def _already_recorded(self, site: str, body: dict, public_key: bytes, signature: bytes) -> bool:
        """True if the ledger holds exactly this entry: a site resending a round after a resume.

        Sites resend a stored reply byte for byte (:mod:`client.training.site_store`), so the signed body is
        identical and is not charged again; any other entry for a recorded round is refused by
        :meth:`Ledger.append` (rounds must increase).
        """
        recorded = [e for e in self.ledger.entries() if e.stream == (site, "example-level")]
        if not recorded or recorded[-1].round < int(body["round"]):
            return False
        key = public_key_from_bytes(public_key)
        if self.ledger.site_key(site) != b64encode(public_key) or not verify(
            key, canonical_bytes(body), signature
        ):
            raise IntegrityError(f"{site} resent round {body['round']} without its valid signature")
        return parse_entry_body(body) in recorded

    def can_train(self, node_id: int) -> bool:
        """False if the site's next round would exceed its recorded budget (unknown sites may train)."""
        site = self.site_of_node.get(node_id)
        if site is None or site not in self.last_mechanisms:
            return True
        budget = self.ledger.budget(site)
        if budget is None:
            return True
        history = self.ledger.history(site)
        return not would_exceed(
            history, self.last_mechanisms[site], budget, self.delta, self.accountant
        )

    def record_central(
        self, server_round: int, event: DpSgdEvent, budget: float, *, secret_noise: bool = True
    ) -> None:
        """Record one noised release of client-level central DP as the coordinator's own guarantee.

        Sites are sampled as a fixed-size cohort; the sampling rate cohort/sites is accounted as Poisson
        sampling (the standard approximation, McMahan et al. 2018), with RDP. The coordinator's
        guarantee lives in this run only, so its lifetime epsilon is its cumulative epsilon.
        ``secret_noise`` says whether the release's noise came from the OS CSPRNG.
        """
        history = self.ledger.history(COORDINATOR, guarantee="client-level")
        cumulative = compute_epsilon([*history, event], self.delta, "rdp")
        body = make_entry_body(
            run_id=self.run_id,
            site_id=COORDINATOR,
            round=server_round,
            mechanisms=[event],
            accountant="rdp",
            epsilon_round=compute_epsilon([event], self.delta, "rdp"),
            epsilon_cumulative=cumulative,
            delta=self.delta,
            budget_epsilon=budget,
            model_hash=self.model_hash or "unknown",
            secret_noise=secret_noise,
            epsilon_lifetime=cumulative,
            guarantee="client-level",
        )
        self.ledger.append_coordinator(body)

    def finish(self, reason: str) -> None:
        try:
            self.ledger.finish(reason)
        except FacefedError as exc:
            logger.warning("could not close the ledger: %s", exc)
        self.ledger.close()
