"""Checks every training reply before it can reach aggregation (fail closed).

A reply must carry exactly the arrays the coordinator sent (same keys, shapes and dtypes), all finite,
with an update (reply minus the model sent) whose global L2 norm is within ``max-update-norm``, and a
metrics record of finite scalars with the keys every facefed site sends. A malformed or poisoned reply
is refused with a reason; the round goes on with the remaining replies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from flwr.app import ArrayRecord, RecordDict

from common.errors import IntegrityError

REQUIRED_METRICS = ("num-examples", "site-index", "epsilon", "delta", "steps", "dp")


def validate_reply(
    content: RecordDict, sent: Mapping[str, np.ndarray], max_update_norm: float
) -> None:
    """Raise IntegrityError naming the first problem of a reply; return None if it is well-formed."""
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
    for key, array in arrays.items():
        try:
            value = array.numpy()
        except Exception as exc:  # undecodable bytes
            raise IntegrityError(f"array {key!r} cannot be decoded: {exc}") from None
        reference = sent[key]
        if value.shape != reference.shape or value.dtype != reference.dtype:
            raise IntegrityError(
                f"array {key!r} is {value.dtype}{list(value.shape)}, expected "
                f"{reference.dtype}{list(reference.shape)}"
            )
        if not np.isfinite(value).all():
            raise IntegrityError(f"array {key!r} has NaN or infinite values")
        squared += float(np.sum((value.astype(np.float64) - reference) ** 2))
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
