"""Egress guard: a Flower client mod that lets a reply leave the site only if it fits an exact schema.

Every reply of the ClientApp passes through :class:`EgressGuard` (``ClientApp(mods=[guard])``). A
content reply must consist of exactly:

* one ``ArrayRecord`` named ``arrays`` holding every key of the agreed parameter manifest and no
  other, each with the manifest's exact shape and the one agreed float dtype, finite values;
* one ``MetricRecord`` named ``metrics`` whose keys are those of :data:`METRIC_RULES` (the
  ``egress-*`` counters stamped after the check may be absent), each value in its range;
* optionally the current round's ``privacy`` record (exactly :data:`PRIVACY_RECORD_FIELDS`, its
  ``round`` equal to the request's ``server-round``), and at most :data:`MAX_PREVIOUS` records
  ``privacy-previous-<round>`` of earlier rounds, each equal byte for byte to the site's own stored
  record of that round (the injected ``stored_record``; without one, none may leave).

What leaves is rebuilt from the checked values (the metadata from the request, the arrays
re-encoded as plain ``.npy``, records in a fixed order), so neither bytes hidden in an array's
encoding nor the order of keys can carry anything. An error reply leaves only as one of the fixed
texts of :class:`SiteRefusal`; an exception in the handler leaves as ``site-internal-error``.

Refusals name the rule that failed (:class:`Rule`), never the content: the reply becomes
``Error(EGRESS_REFUSED_CODE, "egress-refused:<rule>")``, and the detail is only logged at the site,
truncated. The guard counts what it saw in ``context.state`` (:data:`STATS_RECORD`).

Limits: the guard checks structure and ranges, not meaning. Values inside those bounds (an array's
floats, a metric's float, a privacy record's numbers, signature and public key) can still carry a
few bytes chosen by a compromised site; DP-SGD noise bounds what the arrays reveal.
"""

from __future__ import annotations

import logging
import math
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Literal

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp.typing import ClientAppCallable

from client.training.refusal import (
    MAX_SITE_INDEX,
    SITE_INTERNAL_ERROR_CODE,
    SITE_INTERNAL_ERROR_REASON,
    SiteRefusal,
    is_site_refusal,
)
from common.privacy.site_record import BYTES_FIELDS, PREVIOUS_PREFIX, RECORD_NAME, SCALAR_FIELDS
from common.serde import decode, encode

logger = logging.getLogger(__name__)

EGRESS_REFUSED_CODE = 4_030
ARRAYS_RECORD_NAME = "arrays"
METRICS_RECORD_NAME = "metrics"
PRIVACY_RECORD_NAME = RECORD_NAME
MAX_PREVIOUS = 3  # the site store keeps its last 3 rounds
STATS_RECORD = "egress_guard"
FLOAT_DTYPES = frozenset({"float16", "float32", "float64"})
_MIN_IMAGE_SIDE = 16
_CHANNELS = (1, 3, 4)
_LOG_CHARS = 200

StoredRecord = Callable[[Context, Message, int], ConfigRecord | None]
"""``(context, request, round) -> the site's own stored privacy record of that round, or None``."""


class Rule(StrEnum):
    """The rule a refused reply broke: the only thing a refusal tells the coordinator."""

    UNKNOWN_RECORD = "unknown-record"
    MISSING_RECORD = "missing-record"
    ARRAY_KEYS = "array-keys"
    ARRAY_SHAPE = "array-shape"
    ARRAY_DTYPE = "array-dtype"
    ARRAY_VALUES = "array-values"
    METRIC_KEYS = "metric-keys"
    METRIC_RANGE = "metric-range"
    PRIVACY_FIELDS = "privacy-fields"
    PRIVACY_ROUND = "privacy-round"
    PREVIOUS_RECORDS = "previous-records"
    ERROR_TEXT = "error-text"
    EXCEPTION = "exception"  # the check itself failed (e.g. the site store could not be read)


@dataclass(frozen=True)
class MetricRule:
    """An allowed metric: its kind and range ``[low, high]`` (open at both ends if ``open``).

    ``unset`` is one more allowed value outside the range (``-1`` for "not applicable").
    """

    kind: Literal["int", "float"]
    low: float = 0.0
    high: float = math.inf
    open: bool = False
    unset: float | None = None

    def allows(self, value: object) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if (self.kind == "int" and not isinstance(value, int)) or not math.isfinite(value):
            return False
        if value == self.unset:
            return True
        return self.low < value < self.high if self.open else self.low <= value <= self.high


# The metrics a site may send, in the order they leave. The last two are stamped by the app's wrapper
# after the check (STAMPED_METRICS): a reply may come with or without them; all others are required.
METRIC_RULES: Mapping[str, MetricRule] = MappingProxyType(
    {
        "site-index": MetricRule("int", high=MAX_SITE_INDEX),
        "dp": MetricRule("int", high=1),
        "epsilon": MetricRule("float", unset=-1.0),
        "epsilon-lifetime": MetricRule("float", unset=-1.0),
        "delta": MetricRule("float", high=1.0, open=True),
        "steps": MetricRule("int"),
        "noise-multiplier": MetricRule("float"),
        "secret-noise": MetricRule("int", high=1),
        "egress-checked": MetricRule("int"),
        "egress-refused": MetricRule("int"),
    }
)
STAMPED_METRICS = ("egress-checked", "egress-refused")


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
_PREVIOUS_NAME = re.compile(re.escape(PREVIOUS_PREFIX) + r"(0|[1-9][0-9]{0,8})")


class EgressRefused(Exception):
    """A reply broke the egress policy (internal: turned into an error reply)."""

    def __init__(self, rule: Rule, detail: str) -> None:
        super().__init__(detail)
        self.rule = rule


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


def _clip(text: object) -> str:
    """``repr`` of at most :data:`_LOG_CHARS` characters of ``text`` (for the site's own log)."""
    text = str(text)
    return repr(text[:_LOG_CHARS]) + ("..." if len(text) > _LOG_CHARS else "")


def _same_value(a: object, b: object) -> bool:
    if type(a) is not type(b):
        return False
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("<d", a) == struct.pack("<d", b)  # bit for bit: -0.0 and NaNs differ
    return a == b


def same_record(a: ConfigRecord, b: ConfigRecord) -> bool:
    """Field by field, byte for byte: same names, same types, same values (floats by their bits)."""
    return set(a) == set(b) and all(_same_value(a[k], b[k]) for k in a)


def _request_round(msg: Message) -> int | None:
    config = msg.content.config_records.get("config") if msg.has_content() else None
    value = None if config is None else config.get("server-round")
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


class EgressGuard:
    """The mod; ``make_egress_guard`` builds one. Called as ``(msg, context, call_next)``."""

    def __init__(
        self,
        allowed: Mapping[str, tuple[int, ...]],
        *,
        stored_record: StoredRecord | None = None,
        dtype: str = "float32",
    ) -> None:
        if not allowed:
            raise ValueError(
                "the egress manifest is empty; pass the shared model's parameter shapes"
            )
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"Expected a float dtype in {sorted(FLOAT_DTYPES)}, got {dtype=}")
        self.allowed = MappingProxyType({k: tuple(int(d) for d in s) for k, s in allowed.items()})
        for key, shape in self.allowed.items():
            if looks_like_image(shape):
                raise ValueError(
                    f"manifest entry {key!r} has an image-like shape {shape}; refusing it"
                )
        self.dtype = dtype
        self.stored_record = stored_record

    def __call__(self, msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
        try:
            reply = call_next(msg, context)
        except SiteRefusal as exc:
            logger.warning(
                "site refused a %s: %s %s", msg.metadata.message_type, exc, _clip(exc.detail)
            )
            self._count(context, refused=False, arrays=0)
            return Message(error=Error(code=exc.code, reason=exc.reason), reply_to=msg)
        except Exception:  # its text could carry anything: it stays in the site's log
            logger.exception(
                "the %s handler raised; sending %s",
                msg.metadata.message_type,
                SITE_INTERNAL_ERROR_REASON,
            )
            self._count(context, refused=True, arrays=0)
            error = Error(code=SITE_INTERNAL_ERROR_CODE, reason=SITE_INTERNAL_ERROR_REASON)
            return Message(error=error, reply_to=msg)
        try:
            checked = self.check(reply, msg, context)
        except EgressRefused as exc:
            return self._refuse(msg, context, exc.rule, str(exc))
        except Exception as exc:  # a failing check (e.g. an unreadable store) fails closed
            logger.exception("the egress check itself failed")
            return self._refuse(msg, context, Rule.EXCEPTION, type(exc).__name__)
        self._count(
            context, refused=False, arrays=len(self.allowed) if checked.has_content() else 0
        )
        return checked

    def _refuse(self, msg: Message, context: Context, rule: Rule, detail: str) -> Message:
        self._count(context, refused=True, arrays=0)
        logger.error(
            "egress guard refused a %s reply [%s]: %s",
            msg.metadata.message_type,
            rule,
            _clip(detail),
        )
        error = Error(code=EGRESS_REFUSED_CODE, reason=f"egress-refused:{rule}")
        return Message(error=error, reply_to=msg)

    def check(self, reply: Message, msg: Message, context: Context) -> Message:
        """Check ``reply`` to request ``msg``; return the reply rebuilt from what was checked.

        Raises:
            EgressRefused: with the rule that the first offending part broke.
        """
        if reply.has_error():
            if not is_site_refusal(reply.error):
                raise EgressRefused(
                    Rule.ERROR_TEXT, f"error {reply.error.code}: {reply.error.reason}"
                )
            error = Error(code=reply.error.code, reason=reply.error.reason)
            return Message(error=error, reply_to=msg)
        if not reply.has_content():
            raise EgressRefused(Rule.MISSING_RECORD, "the reply has no content")
        n_previous = sum(name.startswith(PREVIOUS_PREFIX) for name in reply.content)
        if n_previous > MAX_PREVIOUS:
            raise EgressRefused(Rule.PREVIOUS_RECORDS, f"{n_previous} > {MAX_PREVIOUS} records")
        server_round = _request_round(msg)
        out = RecordDict()
        previous: dict[int, ConfigRecord] = {}
        for name, record in reply.content.items():
            if name == ARRAYS_RECORD_NAME and isinstance(record, ArrayRecord):
                out[name] = self._check_arrays(record)
            elif name == METRICS_RECORD_NAME and isinstance(record, MetricRecord):
                out[name] = _check_metrics(record)
            elif name == PRIVACY_RECORD_NAME and isinstance(record, ConfigRecord):
                out[name] = _check_privacy(record, server_round)
            elif name.startswith(PREVIOUS_PREFIX) and isinstance(record, ConfigRecord):
                round_, stored = self._check_previous(name, record, server_round, context, msg)
                previous[round_] = stored
            else:
                raise EgressRefused(Rule.UNKNOWN_RECORD, f"{type(record).__name__} {_clip(name)}")
        for name in (ARRAYS_RECORD_NAME, METRICS_RECORD_NAME):
            if name not in out:
                raise EgressRefused(Rule.MISSING_RECORD, f"no {name} record")
        content = RecordDict({k: out[k] for k in (ARRAYS_RECORD_NAME, METRICS_RECORD_NAME)})
        if PRIVACY_RECORD_NAME in out:
            content[PRIVACY_RECORD_NAME] = out[PRIVACY_RECORD_NAME]
        for round_ in sorted(previous):
            content[f"{PREVIOUS_PREFIX}{round_}"] = previous[round_]
        return Message(content=content, reply_to=msg)

    def _check_arrays(self, record: ArrayRecord) -> ArrayRecord:
        if set(record) != set(self.allowed):
            extra, missing = (
                len(set(record) - set(self.allowed)),
                len(set(self.allowed) - set(record)),
            )
            raise EgressRefused(Rule.ARRAY_KEYS, f"{extra} unknown and {missing} missing keys")
        out = ArrayRecord()
        for key, shape in self.allowed.items():
            out[key] = self._check_array(key, record[key], shape)
        return out

    def _check_array(self, key: str, array: Array, shape: tuple[int, ...]) -> Array:
        if tuple(int(d) for d in array.shape) != shape:
            raise EgressRefused(Rule.ARRAY_SHAPE, f"{key}: {tuple(array.shape)} is not {shape}")
        if array.dtype != self.dtype:
            raise EgressRefused(
                Rule.ARRAY_DTYPE, f"{key}: {_clip(array.dtype)} is not {self.dtype}"
            )
        try:
            decoded = decode(array)
        except Exception as exc:  # any failure to decode is a refusal (fail closed)
            raise EgressRefused(Rule.ARRAY_VALUES, f"{key} does not decode ({exc})") from None
        if decoded.shape != shape or decoded.dtype != np.dtype(self.dtype):
            raise EgressRefused(Rule.ARRAY_DTYPE, f"{key} holds {decoded.shape} {decoded.dtype}")
        if not np.all(np.isfinite(decoded)):
            raise EgressRefused(Rule.ARRAY_VALUES, f"{key} holds NaN or infinite values")
        return encode(np.ascontiguousarray(decoded))  # plain .npy bytes: nothing hidden around them

    def _check_previous(
        self,
        name: str,
        record: ConfigRecord,
        server_round: int | None,
        context: Context,
        msg: Message,
    ) -> tuple[int, ConfigRecord]:
        match = _PREVIOUS_NAME.fullmatch(name)
        if match is None:
            raise EgressRefused(Rule.PREVIOUS_RECORDS, f"malformed name {_clip(name)}")
        round_ = int(match.group(1))
        if server_round is None or round_ >= server_round:
            raise EgressRefused(
                Rule.PREVIOUS_RECORDS, f"round {round_} is not before {server_round}"
            )
        if self.stored_record is None:
            raise EgressRefused(
                Rule.PREVIOUS_RECORDS, "no site store: no previous record may leave"
            )
        stored = self.stored_record(context, msg, round_)
        if stored is None or not same_record(record, stored):
            raise EgressRefused(
                Rule.PREVIOUS_RECORDS, f"round {round_} differs from the stored one"
            )
        return round_, ConfigRecord(dict(stored.items()))

    @staticmethod
    def _count(context: Context, *, refused: bool, arrays: int) -> None:
        stats = guard_stats(context)
        stats["messages_seen"] = stats.get("messages_seen", 0) + 1
        stats["messages_refused"] = stats.get("messages_refused", 0) + int(refused)
        stats["arrays_checked"] = stats.get("arrays_checked", 0) + arrays
        context.state[STATS_RECORD] = MetricRecord(dict(stats))


def _check_metrics(record: MetricRecord) -> MetricRecord:
    keys = set(record)
    required = set(METRIC_RULES) - set(STAMPED_METRICS)
    stamped = keys & set(STAMPED_METRICS)
    if (
        not required <= keys
        or not keys <= set(METRIC_RULES)
        or stamped not in (set(), set(STAMPED_METRICS))
    ):
        raise EgressRefused(
            Rule.METRIC_KEYS,
            f"{len(keys - set(METRIC_RULES))} unknown keys, {len(required - keys)} missing",
        )
    out = MetricRecord()
    for key, rule in METRIC_RULES.items():
        if key in record:
            value = record[key]
            if not rule.allows(value):
                raise EgressRefused(Rule.METRIC_RANGE, f"{key} = {_clip(value)}")
            out[key] = int(value) if rule.kind == "int" else float(value)  # type: ignore[arg-type]
    return out


def _check_privacy(record: ConfigRecord, server_round: int | None) -> ConfigRecord:
    if set(record) != set(PRIVACY_RECORD_FIELDS):
        raise EgressRefused(
            Rule.PRIVACY_FIELDS,
            f"{len(record)} fields, not the agreed {len(PRIVACY_RECORD_FIELDS)}",
        )
    for key, rule in PRIVACY_RECORD_FIELDS.items():
        value = record[key]
        if rule.kind == "scalar" and not _is_finite_scalar(value):
            raise EgressRefused(Rule.PRIVACY_FIELDS, f"{key} is not a finite number")
        if rule.kind == "bytes" and not (isinstance(value, bytes) and len(value) == rule.size):
            raise EgressRefused(Rule.PRIVACY_FIELDS, f"{key} is not exactly {rule.size} bytes")
    if server_round is None or record["round"] != server_round:
        raise EgressRefused(
            Rule.PRIVACY_ROUND, f"round {_clip(record['round'])} is not {server_round}"
        )
    return ConfigRecord({key: record[key] for key in PRIVACY_RECORD_FIELDS})


def make_egress_guard(
    allowed: Mapping[str, tuple[int, ...]],
    *,
    stored_record: StoredRecord | None = None,
    dtype: str = "float32",
) -> EgressGuard:
    """Return the egress-guard mod for the parameter manifest ``{key: shape}`` (see EgressGuard)."""
    return EgressGuard(allowed, stored_record=stored_record, dtype=dtype)


def guard_stats(context: Context) -> dict[str, int]:
    """The guard's counters for this node: messages seen and refused, arrays checked."""
    record = context.state.get(STATS_RECORD)
    if not isinstance(record, MetricRecord):
        return {}
    return {k: int(v) for k, v in record.items() if isinstance(v, int | float)}
