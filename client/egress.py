"""Egress guard: a Flower client mod that lets only agreed model arrays and scalar metrics leave.

Every reply of the ClientApp passes through :class:`EgressGuard` (``ClientApp(mods=[guard])``). It
allows:

* ``ArrayRecord`` entries whose key is in the agreed parameter manifest, with exactly the manifest's
  shape and a floating-point dtype, that decode as plain NumPy arrays;
* ``MetricRecord`` values that are single finite ints or floats (lists could carry a template);
* ``ConfigRecord`` entries named :data:`PRIVACY_RECORD_NAME` (this round) or ``privacy-previous-N``
  (the site's signed records of its earlier rounds), whose fields are in
  :data:`PRIVACY_RECORD_FIELDS` (finite scalars, and the site's Ed25519 signature and public key as
  bytes of exactly 64 and 32 bytes).

Everything else is refused: unknown keys, wrong shapes, integer (pixel) dtypes, image-shaped arrays,
strings, any other record. Refusal fails closed: the whole reply is replaced by an error reply
(:data:`EGRESS_REFUSED_CODE`) that names the offending entry, and an error is logged. The guard
counts what it saw in ``context.state`` (:data:`STATS_RECORD`), so a run can show that every reply
was checked.

Limits: the guard checks structure, not content. A malicious client can still hide data in the
values of a correctly shaped parameter array; DP-SGD clipping and noise bound what such values
reveal, and the guard stops the accidental or careless leak of images, templates and identity
strings.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from common.privacy.site_record import BYTES_FIELDS, PREVIOUS_PREFIX, RECORD_NAME, SCALAR_FIELDS
from common.serde import decode

logger = logging.getLogger(__name__)

EGRESS_REFUSED_CODE = 4_030
PRIVACY_RECORD_NAME = RECORD_NAME
STATS_RECORD = "egress_guard"
MAX_ERROR_REASON_CHARS = 1_000
FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})
_MIN_IMAGE_SIDE = 16
_CHANNELS = (1, 3, 4)


@dataclass(frozen=True)
class FieldRule:
    """What one privacy-record field may hold: a finite scalar, or bytes of an exact length."""

    kind: Literal["scalar", "bytes"]
    size: int | None = None


# The one agreed privacy record (see common.privacy.site_record): its scalars and two byte strings.
PRIVACY_RECORD_FIELDS: Mapping[str, FieldRule] = MappingProxyType(
    {
        **{name: FieldRule("scalar") for name in SCALAR_FIELDS},
        **{name: FieldRule("bytes", size) for name, size in BYTES_FIELDS.items()},
    }
)


class EgressRefused(Exception):
    """A reply broke the egress policy (internal: turned into an error reply)."""


def looks_like_image(shape: tuple[int, ...]) -> bool:
    """Whether ``shape`` is laid out like an image or an image batch.

    That is (..., H, W, C) or (..., C, H, W)
    with C in {1, 3, 4} and H, W >= 16. Convolution kernels (..., k, k) with k <= 7 never match.
    """
    if len(shape) < 3:
        return False
    h, w, c = shape[-3:]
    if c in _CHANNELS and min(h, w) >= _MIN_IMAGE_SIDE:
        return True
    c, h, w = shape[-3:]
    return c in _CHANNELS and min(h, w) >= _MIN_IMAGE_SIDE


def manifest_from_state_dict(state: Mapping[str, object]) -> dict[str, tuple[int, ...]]:
    """Build a manifest ``{key: shape}`` from a ``state_dict``-like mapping of arrays/tensors."""
    return {k: tuple(int(d) for d in getattr(v, "shape", ())) for k, v in state.items()}


def _is_finite_scalar(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class EgressGuard:
    """The mod; ``make_egress_guard`` builds one. Called as ``(msg, context, call_next)``."""

    def __init__(self, allowed: Mapping[str, tuple[int, ...]]) -> None:
        if not allowed:
            raise ValueError(
                "the egress manifest is empty; pass the shared model's parameter shapes"
            )
        self.allowed = MappingProxyType({k: tuple(int(d) for d in s) for k, s in allowed.items()})
        for key, shape in self.allowed.items():
            if looks_like_image(shape):
                raise ValueError(
                    f"manifest entry {key!r} has an image-like shape {shape}; refusing it"
                )

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        reply = call_next(msg, context)
        try:
            arrays = self.check(reply)
        except EgressRefused as exc:
            self._count(context, refused=True, arrays=0)
            logger.error("egress guard refused a %s reply: %s", msg.metadata.message_type, exc)
            error = Error(code=EGRESS_REFUSED_CODE, reason=f"egress guard refused the reply: {exc}")
            return Message(error=error, reply_to=msg)
        self._count(context, refused=False, arrays=arrays)
        return reply

    def check(self, reply: Message) -> int:
        """Check a reply; return the number of arrays checked.

        Raises:
            EgressRefused: naming the first entry that breaks the policy.
        """
        if reply.has_error():
            reason = reply.error.reason or ""
            if len(reason) > MAX_ERROR_REASON_CHARS:
                raise EgressRefused(f"error reason of {len(reason)} characters is too long")
            return 0
        if not reply.has_content():
            return 0
        n_arrays = 0
        for name, record in reply.content.items():
            if isinstance(record, ArrayRecord):
                for key, array in record.items():
                    self._check_array(name, key, array)
                    n_arrays += 1
            elif isinstance(record, MetricRecord):
                for key, value in record.items():
                    if not _is_finite_scalar(value):
                        raise EgressRefused(
                            f"metric {name}.{key} is {type(value).__name__}, not a finite scalar"
                        )
            elif isinstance(record, ConfigRecord) and (
                name == PRIVACY_RECORD_NAME or name.startswith(PREVIOUS_PREFIX)
            ):
                self._check_privacy(record)
            else:
                raise EgressRefused(
                    f"record {name!r} ({type(record).__name__}) is not allowed to leave the site"
                )
        return n_arrays

    def _check_array(self, record: str, key: str, array: Array) -> None:
        where = f"array {record}.{key}"
        shape = tuple(int(d) for d in array.shape)
        if key not in self.allowed:
            raise EgressRefused(f"{where} (shape {shape}) is not a parameter of the shared model")
        if looks_like_image(shape):
            raise EgressRefused(f"{where} has an image-like shape {shape}")
        if shape != self.allowed[key]:
            raise EgressRefused(
                f"{where} has shape {shape}, the model parameter has {self.allowed[key]}"
            )
        if array.dtype not in FLOAT_DTYPES:
            raise EgressRefused(f"{where} has dtype {array.dtype}; only float parameters may leave")
        try:
            decoded = decode(array)
        except Exception as exc:  # any failure to decode is a refusal (fail closed)
            raise EgressRefused(f"{where} does not decode as a NumPy array ({exc})") from exc
        if decoded.shape != shape or str(decoded.dtype) != array.dtype:
            raise EgressRefused(f"{where} declares {shape}/{array.dtype} but holds {decoded.shape}")
        if not np.all(np.isfinite(decoded)):
            raise EgressRefused(f"{where} holds NaN or infinite values")

    def _check_privacy(self, record: ConfigRecord) -> None:
        for key, value in record.items():
            rule = PRIVACY_RECORD_FIELDS.get(key)
            if rule is None:
                raise EgressRefused(f"privacy record field {key!r} is not in the allow-list")
            if rule.kind == "scalar" and not _is_finite_scalar(value):
                raise EgressRefused(f"privacy record field {key!r} must be a finite number")
            if rule.kind == "bytes" and not (isinstance(value, bytes) and len(value) == rule.size):
                raise EgressRefused(
                    f"privacy record field {key!r} must be exactly {rule.size} bytes"
                )

    @staticmethod
    def _count(context: Context, *, refused: bool, arrays: int) -> None:
        stats = guard_stats(context)
        stats["messages_seen"] = stats.get("messages_seen", 0) + 1
        stats["messages_refused"] = stats.get("messages_refused", 0) + int(refused)
        stats["arrays_checked"] = stats.get("arrays_checked", 0) + arrays
        context.state[STATS_RECORD] = MetricRecord(dict(stats))


def make_egress_guard(allowed: Mapping[str, tuple[int, ...]]) -> EgressGuard:
    """Return the egress-guard mod for the agreed parameter manifest ``{key: shape}``."""
    return EgressGuard(allowed)


def guard_stats(context: Context) -> dict[str, int]:
    """The guard's counters for this node: messages seen and refused, arrays checked."""
    record = context.state.get(STATS_RECORD)
    if not isinstance(record, MetricRecord):
        return {}
    return {k: int(v) for k, v in record.items() if isinstance(v, int | float)}
