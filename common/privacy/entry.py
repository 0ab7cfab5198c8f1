"""The schema of one privacy-ledger entry: what a site signs, and what the coordinator chains.

Two layers, both canonical JSON (:func:`common.crypto.signing.canonical_bytes`):

* the **body** -- built by :func:`make_entry_body` on the site and signed there with the site's key.
  It says who spent what: run, site, round, guarantee kind and privacy unit, the list of mechanisms
  (one :class:`~common.privacy.events.DpSgdEvent` per model trained that round), delta, accountant
  and its version, epsilon for the round and cumulatively, the approved budget, the model hash and
  timestamps.
* the **record** -- built by the coordinator around the body: ledger format, sequence number, hash
  of the previous record, run id, append time, the site's public key and signature. The coordinator
  signs the record bytes, and the record's SHA-256 is the link the next record chains to.

Privacy unit: each mechanism names its own (:data:`common.privacy.events.UNITS`), and the body's
``privacy_unit`` is derived from them. For example-level DP-SGD the unit is one *example* (one image).
One person can own many images, so a per-example epsilon does not bound what is learned about a person
with k images; group privacy gives roughly k * epsilon. Person-level DP-SGD (unit: *person*) samples
and clips each person's images together, so its epsilon is per person. The site's DP-SGD stream keeps
the name ``"example-level"`` (the guarantee that composes a site's rounds) whatever its units; a round
of a person-level face model and the example-level emotion model reads
``privacy_unit = "person (face), example (emotion)"``. Client-level DP (unit: *site*) covers
everything one site holds.

Noise: ``"secret"`` means the release's Gaussian noise and Poisson sampling were drawn from the OS
CSPRNG, fresh for that release; ``"seeded"`` means they are reproducible from a seed, which only a
research simulation may do, by explicit opt-in. A seeded release's DP guarantee holds only against
someone who cannot learn the seed.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, cast

from common.errors import ConfigError, FacefedError, IntegrityError
from common.privacy.accounting import (
    ACCOUNTANT_OF_RECORD,
    Accountant,
    accountant_version,
    compute_epsilon,
    parse_accountant,
)
from common.privacy.events import DpSgdEvent

BODY_FORMAT = "facefed-ledger-entry/2"
RECORD_FORMAT = "facefed-ledger/1"
GENESIS_HASH = "0" * 64

Guarantee = Literal["example-level", "client-level"]
PRIVACY_UNIT: dict[str, str] = {"example-level": "example", "client-level": "site"}
RecordKind = Literal["header", "round", "close"]
NoiseKind = Literal["secret", "seeded"]
NOISE_KINDS: tuple[NoiseKind, ...] = ("secret", "seeded")
LIFETIME_TOLERANCE = 1e-9  # relative: float rounding only; the lifetime composes more, never less

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


def utc_now() -> str:
    """Return the current UTC time as ISO 8601 with microseconds (the ledger's timestamp format)."""
    return datetime.now(UTC).isoformat(timespec="microseconds")


def _timestamp(value: str | datetime | None) -> str:
    if value is None:
        return utc_now()
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ConfigError("timestamps must be timezone-aware; use datetime.now(UTC)")
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    datetime.fromisoformat(value)  # raises ValueError on junk
    return value


def check_id(kind: str, value: object) -> str:
    """Return ``value`` if it is a valid run or site id, else raise ConfigError."""
    if not isinstance(value, str) or not _ID_RE.fullmatch(value):
        raise ConfigError(
            f"{kind} {value!r} is invalid; use 1-128 letters, digits, '.', '_', ':' or '-'"
        )
    return value


def _epsilon(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name}={value!r} must be finite and >= 0")
    return float(value)


def noise_kind(secret_noise: bool) -> NoiseKind:
    """Return the body's ``noise`` value: ``"secret"`` (OS CSPRNG) or ``"seeded"`` (reproducible)."""
    if not isinstance(secret_noise, bool):
        raise ConfigError(f"secret_noise must be True or False, got {secret_noise!r}")
    return "secret" if secret_noise else "seeded"


def at_least(value: float, bound: float, tolerance: float) -> bool:
    """True if ``value >= bound`` up to a relative ``tolerance`` of ``bound``."""
    return value >= bound * (1 - tolerance)


def _lifetime(epsilon_lifetime: float, epsilon_cumulative: float) -> float:
    lifetime = _epsilon("epsilon_lifetime", epsilon_lifetime)
    if not at_least(lifetime, epsilon_cumulative, LIFETIME_TOLERANCE):
        raise ConfigError(
            f"epsilon_lifetime={lifetime!r} is below epsilon_cumulative={epsilon_cumulative!r}; "
            "the lifetime composes every run of the site, this one included"
        )
    return lifetime


def privacy_unit(guarantee: str, mechanisms: Sequence[DpSgdEvent]) -> str:
    """The body's unit: the mechanisms' common unit, or each model's unit where they differ."""
    units = {m.unit for m in mechanisms}
    if guarantee == "client-level" or units == {PRIVACY_UNIT[guarantee]}:
        return PRIVACY_UNIT[guarantee]
    if len(units) == 1:
        return units.pop()
    return ", ".join(f"{m.unit} ({m.name})" for m in mechanisms)


def make_entry_body(
    *,
    run_id: str,
    site_id: str,
    round: int,
    mechanisms: Sequence[DpSgdEvent],
    accountant: Accountant,
    epsilon_round: float,
    epsilon_cumulative: float,
    delta: float,
    budget_epsilon: float,
    model_hash: str,
    secret_noise: bool,
    epsilon_lifetime: float,
    guarantee: Guarantee = "example-level",
    started_at: str | datetime | None = None,
    finished_at: str | datetime | None = None,
) -> dict[str, Any]:
    """Build the JSON-able body of one ledger entry (the part the site signs).

    Args:
        run_id: the training run this entry belongs to.
        site_id: the site that spent the budget (``"coordinator"`` for client-level DP).
        round: the federated round (>= 0); strictly increasing per site and guarantee.
        mechanisms: every DP-SGD mechanism run this round (e.g. face and emotion models).
        accountant: the accountant that computed the epsilons (``"prv"`` is the one of record).
        epsilon_round: epsilon of this round's mechanisms alone, at ``delta``.
        epsilon_cumulative: epsilon of all of this site's rounds so far, this one included.
        delta: the delta at which both epsilons are stated.
        budget_epsilon: the site's approved epsilon budget at ``delta``.
        model_hash: hash of the model version the site trained from.
        secret_noise: True if the noise and Poisson sampling of this release came from the OS
            CSPRNG, fresh per release (``"noise": "secret"``); False if reproducible from a seed
            (``"noise": "seeded"``, research simulations only, by explicit opt-in).
        epsilon_lifetime: epsilon of every DP event the site ever released, in every run, composed
            with the same accountant at ``delta``; >= ``epsilon_cumulative``. Client-level entries
            pass ``epsilon_cumulative``.
        guarantee: ``"example-level"`` (DP-SGD on the site) or ``"client-level"`` (coordinator).
        started_at: when the round started on the site (default: now).
        finished_at: when it finished (default: now).

    Returns:
        A dict of JSON types; sign ``canonical_bytes(body)``.

    Raises:
        ConfigError: any field is missing, of the wrong type or out of range.
    """
    if guarantee not in PRIVACY_UNIT:
        raise ConfigError(f"guarantee {guarantee!r} must be one of {sorted(PRIVACY_UNIT)}")
    if isinstance(round, bool) or not isinstance(round, int) or round < 0:
        raise ConfigError(f"round={round!r} must be an integer >= 0")
    if not mechanisms or not all(isinstance(m, DpSgdEvent) for m in mechanisms):
        raise ConfigError("mechanisms must be a non-empty list of DpSgdEvent")
    if not (isinstance(delta, int | float) and 0 < delta < 1):
        raise ConfigError(f"delta={delta!r} must be in (0, 1)")
    budget = _epsilon("budget_epsilon", budget_epsilon)
    if budget <= 0:
        raise ConfigError("budget_epsilon must be > 0; every site needs an approved budget")
    if not isinstance(model_hash, str) or not model_hash:
        raise ConfigError("model_hash must be a non-empty string (e.g. the SHA-256 of the weights)")
    try:
        started, finished = _timestamp(started_at), _timestamp(finished_at)
    except ValueError as exc:
        raise ConfigError(f"bad timestamp: {exc}; use ISO 8601 with a timezone") from exc
    name = parse_accountant(accountant)
    cumulative = _epsilon("epsilon_cumulative", epsilon_cumulative)
    return {
        "format": BODY_FORMAT,
        "run_id": check_id("run id", run_id),
        "site_id": check_id("site id", site_id),
        "round": round,
        "guarantee": guarantee,
        "privacy_unit": privacy_unit(guarantee, mechanisms),
        "mechanisms": [m.to_dict() for m in mechanisms],
        "delta": float(delta),
        "accountant": name,
        "accountant_version": accountant_version(name),
        "epsilon_round": _epsilon("epsilon_round", epsilon_round),
        "epsilon_cumulative": cumulative,
        "epsilon_lifetime": _lifetime(epsilon_lifetime, cumulative),
        "noise": noise_kind(secret_noise),
        "budget_epsilon": budget,
        "model_hash": model_hash,
        "started_at": started,
        "finished_at": finished,
    }


def make_round_body(
    *,
    run_id: str,
    site_id: str,
    round: int,
    mechanisms: Sequence[DpSgdEvent],
    history: Sequence[DpSgdEvent],
    delta: float,
    budget_epsilon: float,
    model_hash: str,
    secret_noise: bool,
    epsilon_lifetime: float,
    accountant: Accountant = ACCOUNTANT_OF_RECORD,
    guarantee: Guarantee = "example-level",
    started_at: str | datetime | None = None,
    finished_at: str | datetime | None = None,
) -> dict[str, Any]:
    """Compute both epsilons from ``history`` + ``mechanisms`` and build the body.

    ``history`` must be the site's mechanisms as the ledger recorded them (``Ledger.history``, or
    the site's own copy of its acknowledged rounds); otherwise the ledger refuses the entry.
    ``epsilon_lifetime`` is the site's own number: it composes events of other runs too, which this
    run's ledger does not hold.
    """
    return make_entry_body(
        run_id=run_id,
        site_id=site_id,
        round=round,
        mechanisms=mechanisms,
        accountant=accountant,
        epsilon_round=compute_epsilon(mechanisms, delta, accountant),
        epsilon_cumulative=compute_epsilon([*history, *mechanisms], delta, accountant),
        delta=delta,
        budget_epsilon=budget_epsilon,
        model_hash=model_hash,
        secret_noise=secret_noise,
        epsilon_lifetime=epsilon_lifetime,
        guarantee=guarantee,
        started_at=started_at,
        finished_at=finished_at,
    )


@dataclass(frozen=True, kw_only=True)
class EntryBody:
    """A parsed, validated entry body (see :func:`make_entry_body` for the fields)."""

    run_id: str
    site_id: str
    round: int
    guarantee: Guarantee
    privacy_unit: str
    mechanisms: tuple[DpSgdEvent, ...]
    delta: float
    accountant: Accountant
    accountant_version: str
    epsilon_round: float
    epsilon_cumulative: float
    epsilon_lifetime: float
    noise: NoiseKind
    budget_epsilon: float
    model_hash: str
    started_at: str
    finished_at: str

    @property
    def stream(self) -> tuple[str, str]:
        """The ``(site_id, guarantee)`` whose epsilons compose with this entry's."""
        return (self.site_id, self.guarantee)


def parse_entry_body(body: Mapping[str, Any]) -> EntryBody:
    """Validate a body as built by :func:`make_entry_body`.

    Raises:
        IntegrityError: wrong format, unknown or missing fields, invalid values.
    """
    if not isinstance(body, Mapping) or body.get("format") != BODY_FORMAT:
        raise IntegrityError(f"entry body is not in format {BODY_FORMAT!r}")
    fields = {k: v for k, v in body.items() if k != "format"}
    expected = set(EntryBody.__dataclass_fields__)
    if set(fields) != expected:
        raise IntegrityError(
            f"entry body fields differ from the schema: unknown {sorted(set(fields) - expected)}, "
            f"missing {sorted(expected - set(fields))}"
        )
    if fields["noise"] not in NOISE_KINDS:
        raise IntegrityError(f"entry body noise {fields['noise']!r} is not one of {NOISE_KINDS}")
    try:
        # a mechanism written before units existed was example-level (client-level: per site)
        legacy = "site" if fields["guarantee"] == "client-level" else "example"
        mechanisms = tuple(
            DpSgdEvent.from_dict({"unit": legacy, **m}) for m in fields["mechanisms"]
        )
        derived = ("privacy_unit", "accountant_version", "noise")
        rebuilt = make_entry_body(
            **{k: fields[k] for k in fields if k not in derived}
            | {"mechanisms": mechanisms, "secret_noise": fields["noise"] == "secret"}
        )
    except (FacefedError, TypeError, ValueError, AttributeError) as exc:
        raise IntegrityError(f"entry body is invalid: {exc}") from exc
    if rebuilt["privacy_unit"] != fields["privacy_unit"]:
        raise IntegrityError(
            f"privacy unit {fields['privacy_unit']!r} does not match "
            f"guarantee {fields['guarantee']!r}"
        )
    if not isinstance(fields["accountant_version"], str):
        raise IntegrityError("accountant_version must be a string")
    return EntryBody(**(fields | {"mechanisms": mechanisms}))


def record_hash(record_bytes: bytes) -> str:
    """Return the SHA-256 hex digest that the next record chains to."""
    return hashlib.sha256(record_bytes).hexdigest()


def b64encode(data: bytes) -> str:
    """Standard base64 text of ``data``."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: object) -> bytes:
    """Decode strict base64, raising IntegrityError on anything else."""
    if not isinstance(text, str):
        raise IntegrityError("expected a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise IntegrityError(f"invalid base64: {exc}") from exc


def as_kind(value: object) -> RecordKind:
    """Validate a record kind."""
    if value not in ("header", "round", "close"):
        raise IntegrityError(f"unknown record kind {value!r}")
    return cast(RecordKind, value)
