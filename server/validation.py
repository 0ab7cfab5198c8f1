"""Checks every training reply before it can reach aggregation (fail closed).

A reply must carry exactly the arrays the coordinator sent (same keys, shapes and dtypes), all finite,
with an update (reply minus the model sent) whose global L2 norm is within ``max-update-norm``; one
metrics record whose keys are all in :data:`METRIC_RULES` (a whitelist: the required ones present,
every value a finite number in its range); and no other record than the site's signed privacy
records. A malformed, poisoned or over-full reply is refused with a reason that names the rule it
broke, never the content it carried; the round goes on with the remaining replies.

Nothing a site sends decides how much its update weighs: the strategy sets the aggregation weights
itself (:mod:`server.strategy`). A site that claims a weight (``num-examples``, ``dp-weight``, or any
other metric outside the whitelist) is refused here, because an honest site's egress guard would not
have let the key out: the site is misconfigured or compromised.

The arrays are decoded once: a valid reply's record is replaced by one holding the checked values
(read-only), so aggregation reads exactly what was validated, without decoding the bytes again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

import numpy as np
from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict

from common.errors import IntegrityError
from common.privacy.site_record import PREVIOUS_PREFIX, RECORD_NAME
from common.serde import decode


@dataclass(frozen=True, kw_only=True)
class MetricRule:
    """What one metric of a reply may hold: a finite number in ``[low, high]`` (or ``sentinel``)."""

    required: bool
    integer: bool = False
    low: float = 0.0
    high: float = math.inf
    sentinel: float | None = None  # a value outside the range that stands for "not applicable"

    def allows(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if not math.isfinite(value) or (self.integer and not float(value).is_integer()):
            return False
        return self.low <= value <= self.high or value == self.sentinel


# The whole metrics record a site may send (client/training/round.py and the egress mod of client/training/app.py).
# epsilon is -1 when the site trains without DP (dp = 0). epsilon-lifetime and secret-noise are also
# in the site's signed privacy record, which is what the ledger keeps; the egress counts are stamped
# by the site's egress mod. These four are optional here: the metrics are informational.
METRIC_RULES: Mapping[str, MetricRule] = MappingProxyType(
    {
        "site-index": MetricRule(required=True, integer=True),
        "dp": MetricRule(required=True, integer=True, high=1),
        "epsilon": MetricRule(required=True, sentinel=-1.0),
        "epsilon-lifetime": MetricRule(required=False, sentinel=-1.0),
        "delta": MetricRule(required=True, high=1.0),
        "steps": MetricRule(required=True, integer=True),
        "noise-multiplier": MetricRule(required=True),
        "secret-noise": MetricRule(required=False, integer=True, high=1),
        "egress-checked": MetricRule(required=False, integer=True),
        "egress-refused": MetricRule(required=False, integer=True),
    }
)


class ValidatedArray(Array):
    """An array that passed validation; ``numpy()`` returns the checked values (read-only)."""

    def __init__(self, array: Array, value: np.ndarray) -> None:
        # No super().__init__(): the same fields as ``array``, which Array's constructor would check
        # and copy again.
        self.__dict__.update(array.__dict__)
        value = value.view()
        value.flags.writeable = False
        self.__dict__["_value"] = value

    def numpy(self) -> np.ndarray:
        return self.__dict__["_value"]


def validate_reply(
    content: RecordDict, sent: Mapping[str, np.ndarray], max_update_norm: float
) -> ArrayRecord:
    """Return the reply's arrays as validated; raise IntegrityError naming its first problem."""
    records = content.array_records
    if set(records) != {"arrays"}:
        raise IntegrityError(f"expected one ArrayRecord 'arrays', got {sorted(records)}")
    arrays: ArrayRecord = records["arrays"]
    if list(arrays.keys()) != list(sent.keys()):
        missing, extra = set(sent) - set(arrays.keys()), set(arrays.keys()) - set(sent)
        raise IntegrityError(  # the coordinator's own names only: the extra ones are the site's
            f"array keys differ: missing {sorted(missing)[:3]}, {len(extra)} not sent"
        )
    squared = 0.0
    checked: dict[str, Array] = {}
    for key, array in arrays.items():
        try:
            value = decode(array)
        except Exception as exc:  # undecodable bytes
            raise IntegrityError(f"array {key!r} cannot be decoded: {exc}") from None
        if value.shape != tuple(array.shape) or str(value.dtype) != array.dtype:
            raise IntegrityError(
                f"array {key!r} declares {array.dtype}{list(array.shape)} but holds "
                f"{value.dtype}{list(value.shape)}"
            )
        reference = sent[key]
        if value.shape != reference.shape or value.dtype != reference.dtype:
            raise IntegrityError(
                f"array {key!r} is {value.dtype}{list(value.shape)}, expected "
                f"{reference.dtype}{list(reference.shape)}"
            )
        if not np.isfinite(value).all():
            raise IntegrityError(f"array {key!r} has NaN or infinite values")
        update = value.astype(np.float64).ravel()
        update -= reference.ravel()
        squared += float(np.dot(update, update))
        checked[key] = ValidatedArray(array, value)
    norm = math.sqrt(squared)
    if not norm <= max_update_norm:
        raise IntegrityError(f"update norm {norm:.3g} exceeds max-update-norm {max_update_norm:g}")
    _check_metrics(content)
    _check_other_records(content)
    validated = ArrayRecord()  # filled in place: ArrayRecord(dict) would copy into plain Arrays
    for key, array in checked.items():
        validated[key] = array
    return validated


def _check_metrics(content: RecordDict) -> None:
    """The one metrics record holds only whitelisted keys, each within its rule."""
    if set(content.metric_records) != {"metrics"}:
        raise IntegrityError(
            f"expected one MetricRecord 'metrics', got {len(content.metric_records)} metric records"
        )
    metrics: MetricRecord = content.metric_records["metrics"]
    unknown = sum(1 for key in metrics if key not in METRIC_RULES)
    if unknown:  # the site chose these names: count them, do not echo them
        raise IntegrityError(
            f"metrics hold {unknown} key(s) outside the agreed set {sorted(METRIC_RULES)}"
        )
    for key, rule in METRIC_RULES.items():
        if key not in metrics:
            if rule.required:
                raise IntegrityError(f"metric {key!r} is missing")
            continue
        if not rule.allows(metrics[key]):
            kind = "an integer" if rule.integer else "a finite number"
            extra = "" if rule.sentinel is None else f" or {rule.sentinel:g}"
            raise IntegrityError(
                f"metric {key!r} must be {kind} in [{rule.low:g}, {rule.high:g}]{extra}"
            )


def _check_other_records(content: RecordDict) -> None:
    """Besides arrays and metrics, only the site's signed privacy records (recorded in the ledger)."""
    others = [
        name
        for name in content.config_records
        if name != RECORD_NAME and not name.startswith(PREVIOUS_PREFIX)
    ]
    if others:
        raise IntegrityError(
            f"reply carries {len(others)} config record(s) besides the privacy records"
        )
