"""Checks every training reply before it can reach aggregation (fail closed).

A reply must carry exactly the arrays the coordinator sent (same keys, shapes and dtypes), all finite,
with an update (reply minus the model sent) whose global L2 norm is within ``max-update-norm``, and a
metrics record of finite scalars with the keys every facefed site sends. A malformed or poisoned reply
is refused with a reason; the round goes on with the remaining replies.

The arrays are decoded once: a valid reply's record is replaced by one holding the checked values
(read-only), so aggregation reads exactly what was validated, without decoding the bytes again.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, RecordDict

from common.errors import IntegrityError
from common.serde import decode

REQUIRED_METRICS = ("num-examples", "site-index", "epsilon", "delta", "steps", "dp")


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
        raise IntegrityError(
            f"array keys differ: missing {sorted(missing)[:3]}, extra {sorted(extra)[:3]}"
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
    metrics = content.metric_records.get("metrics")
    if metrics is None:
        raise IntegrityError("reply has no 'metrics' record")
    for key in REQUIRED_METRICS:
        metric = metrics.get(key)
        if (
            isinstance(metric, bool)
            or not isinstance(metric, int | float)
            or not math.isfinite(metric)
        ):
            raise IntegrityError(f"metric {key!r} must be a finite number, got {metric!r}")
    validated = ArrayRecord()  # filled in place: ArrayRecord(dict) would copy into plain Arrays
    for key, array in checked.items():
        validated[key] = array
    return validated
