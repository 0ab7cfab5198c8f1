"""Fuzzing the egress guard with hostile replies: it never raises, and whatever leaves fits the schema.

Hypothesis, derandomized. Each reply mixes valid and hostile records, names, metric keys and values;
the guard either sends a reply whose every part is allowed, or one of its fixed error texts.
"""

from __future__ import annotations

import os

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
from flwr.common.serde import message_to_proto
from hypothesis import given, settings
from hypothesis import strategies as st

from client.training.egress import (
    METRIC_RULES,
    PRIVACY_RECORD_FIELDS,
    Rule,
    make_egress_guard,
)
from client.training.refusal import SiteRefusal, is_site_refusal
from common.privacy.site_record import PREVIOUS_PREFIX
from tests.messages import train_message

FUZZ = settings(
    max_examples=int(os.environ.get("FACEFED_FUZZ_EXAMPLES", "150")),
    derandomize=True,
    deadline=None,
)
MANIFEST = {"w": (2, 3), "b": (3,)}
ROUND = 4
FIXED_REASONS = {f"egress-refused:{rule}" for rule in Rule} | {"site-internal-error"}


def _privacy(round_: int) -> ConfigRecord:
    return ConfigRecord(
        {
            key: (bytes(rule.size) if rule.size else float(round_ if key == "round" else 0.5))
            for key, rule in PRIVACY_RECORD_FIELDS.items()
        }
    )


STORED = {r: _privacy(r) for r in (1, 2, 3)}


def _valid() -> dict[str, ArrayRecord | MetricRecord]:
    """A well-formed base reply that the drawn records then replace or add to."""
    values: dict[str, int | float] = {"site-index": 1, "dp": 1, "secret-noise": 1, "steps": 3}
    values |= {"epsilon": 0.5, "epsilon-lifetime": 1.0, "delta": 1e-5, "noise-multiplier": 1.0}
    return {
        "arrays": ArrayRecord({k: Array(np.ones(s, np.float32)) for k, s in MANIFEST.items()}),
        "metrics": MetricRecord(dict(values)),
    }


numbers = st.one_of(
    st.integers(-(2**63), 2**63 - 1), st.floats(allow_nan=True), st.lists(st.floats(), max_size=3)
)
metric_keys = st.sampled_from([*METRIC_RULES, "loss", "x" * 64, ""])
arrays = st.fixed_dictionaries(
    {},
    optional={
        "w": st.sampled_from(
            [np.ones((2, 3), np.float32), np.ones((3, 2), np.float32), np.ones((2, 3))]
        ),
        "b": st.sampled_from([np.zeros(3, np.float32), np.array([np.nan] * 3, np.float32)]),
        "extra": st.just(np.zeros(3, np.float32)),
    },
)
valid_records = st.sampled_from(
    [("privacy", _privacy(ROUND))] + [(f"{PREVIOUS_PREFIX}{r}", _privacy(r)) for r in (1, 2, 3)]
)
records = st.one_of(
    valid_records,
    valid_records,
    st.tuples(
        st.just("arrays"), arrays.map(lambda d: ArrayRecord({k: Array(v) for k, v in d.items()}))
    ),
    st.tuples(
        st.sampled_from(["metrics", "metrics-2"]),
        st.dictionaries(metric_keys, numbers, max_size=12).map(lambda d: MetricRecord(dict(d))),
    ),
    st.tuples(st.just("privacy"), st.sampled_from([_privacy(ROUND), _privacy(ROUND - 1)])),
    st.tuples(
        st.sampled_from([f"{PREVIOUS_PREFIX}{r}" for r in ("1", "2", "3", "01", "4", "x")]),
        st.sampled_from([_privacy(1), _privacy(2), _privacy(3)]),
    ),
    st.tuples(st.text(max_size=8), st.just(ConfigRecord({"s": "SMUGGLED"}))),
)


def _reply(content: RecordDict | str) -> object:
    def handler(msg: Message, context: Context) -> Message:
        if content == "raise":
            raise RuntimeError("SMUGGLED")
        if content == "refuse":
            raise SiteRefusal("budget", 1, "max-epsilon", detail="SMUGGLED")
        if isinstance(content, str):
            return Message(error=Error(4_102, content), reply_to=msg)
        return Message(content, reply_to=msg)

    return handler


@FUZZ
@given(
    st.one_of(
        st.lists(records, max_size=4).map(lambda items: RecordDict({**_valid(), **dict(items)})),
        st.sampled_from(["raise", "refuse", "site-1 refused: budget (max-epsilon)", "SMUGGLED"]),
    )
)
def test_guard_sends_only_schema_replies_or_fixed_errors(content: RecordDict | str) -> None:
    guard = make_egress_guard(MANIFEST, stored_record=lambda ctx, msg, r: STORED.get(r))
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    request = train_message(RecordDict({"config": ConfigRecord({"server-round": ROUND})}))

    reply = guard(request, context, _reply(content))  # type: ignore[arg-type]

    assert b"SMUGGLED" not in message_to_proto(reply).SerializeToString()
    if reply.has_error():
        assert reply.error.reason in FIXED_REASONS or is_site_refusal(reply.error)
        return
    names = list(reply.content.keys())
    assert names[:2] == ["arrays", "metrics"]
    assert all(n == "privacy" or n.startswith(PREVIOUS_PREFIX) for n in names[2:])
    assert {k: tuple(a.shape) for k, a in reply.content.array_records["arrays"].items()} == MANIFEST
    for key, value in reply.content.metric_records["metrics"].items():
        assert METRIC_RULES[key].allows(value)
