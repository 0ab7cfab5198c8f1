"""Egress guard: a well-formed reply passes; every channel that carried a face out is closed.

Each attack test plays a compromised site that tries to send a real face (a Yale photo, 243x320, or
the 128-float template of one) through one channel, and checks both that the reply is refused and
that no piece of the face is anywhere in the bytes the coordinator would receive.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Callable

import cv2
import numpy as np
import pytest
import torch
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
from flwr.clientapp import ClientApp
from flwr.common.serde import message_to_proto

from client.training.egress import (
    EGRESS_REFUSED_CODE,
    MAX_PREVIOUS,
    METRIC_RULES,
    PRIVACY_RECORD_FIELDS,
    Rule,
    StoredRecord,
    guard_stats,
    make_egress_guard,
    manifest_from_state_dict,
)
from client.training.refusal import REFUSAL_CODES, SITE_INTERNAL_ERROR_CODE, SiteRefusal
from common.models import EmotionNet, FaceEmbedder
from common.privacy.site_record import PREVIOUS_PREFIX
from tests.messages import train_message

ROUND = 5
Handler = Callable[[Message, Context], Message]


@pytest.fixture(scope="module")
def params(small_models: tuple[FaceEmbedder, EmotionNet]) -> dict[str, np.ndarray]:
    face = small_models[0]
    return {f"face.{k}": v.detach().numpy().copy() for k, v in face.state_dict().items()}


@pytest.fixture(scope="module")
def photo(yale: dict[str, np.ndarray]) -> np.ndarray:
    """A whole Yale photo, (243, 320) uint8."""
    return yale["images"][0]


@pytest.fixture(scope="module")
def template(photo: np.ndarray, small_models: tuple[FaceEmbedder, EmotionNet]) -> np.ndarray:
    """The 128-float face template of that photo (what a site's template store decrypts to)."""
    face = cv2.resize(photo, (112, 112)).astype(np.float32)
    x = torch.from_numpy((face - face.mean()) / face.std())[None, None]
    with torch.no_grad():
        return small_models[0](x)[0].numpy()


# ------------------------------------------------------------------ helpers
def instruction(server_round: int = ROUND) -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    return train_message(content, dst_node_id=7)


def run_client(
    params: dict[str, np.ndarray],
    reply: RecordDict | Handler,
    stored: dict[int, ConfigRecord] | None = None,
    server_round: int = ROUND,
) -> tuple[Message, Context]:
    """A ClientApp with the guard as its mod; its train handler replies ``reply`` (or is it)."""
    stored_record: StoredRecord | None = None
    if stored is not None:
        stored_record = lambda context, msg, round_: stored.get(round_)  # noqa: E731
    guard = make_egress_guard(manifest_from_state_dict(params), stored_record=stored_record)
    app = ClientApp(mods=[guard])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        if callable(reply):
            return reply(msg, context)
        return Message(reply, reply_to=msg)

    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    return app(instruction(server_round), context), context


def metrics(**changes: float) -> MetricRecord:
    values: dict[str, int | float] = {
        "site-index": 3,
        "dp": 1,
        "epsilon": 1.25,
        "epsilon-lifetime": 2.5,
        "delta": 1e-5,
        "steps": 40,
        "noise-multiplier": 1.1,
        "secret-noise": 1,
    }
    return MetricRecord({**values, **changes})


def privacy(round_: int = ROUND, /, **changes: object) -> ConfigRecord:
    fields: dict[str, object] = {
        key: (bytes(range(rule.size)) if rule.size else 0.5)
        for key, rule in PRIVACY_RECORD_FIELDS.items()
    }
    fields.update({"round": round_, "site-index": 3, **changes})
    return ConfigRecord(fields)  # type: ignore[arg-type]


def normal_reply(params: dict[str, np.ndarray], **records: object) -> RecordDict:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in params.items()}),
            "metrics": metrics(),
            "privacy": privacy(),
        }
    )
    for name, record in records.items():
        content[name] = record  # type: ignore[assignment]
    return content


def wire(reply: Message) -> bytes:
    """The bytes the coordinator receives: the reply as Flower serializes it."""
    return bytes(message_to_proto(reply).SerializeToString())


def leaks(reply: Message, payload: bytes, chunk: int = 8) -> bool:
    """Whether any ``chunk``-byte piece of ``payload`` (one that is not a run of few byte values)
    appears in the serialized reply."""
    sent = wire(reply)
    pieces = (payload[i : i + chunk] for i in range(0, len(payload) - chunk + 1, chunk))
    return any(len(set(p)) >= 4 and p in sent for p in pieces)


def refused(reply: Message, rule: Rule) -> bool:
    return (
        reply.has_error()
        and reply.error.code == EGRESS_REFUSED_CODE
        and reply.error.reason == f"egress-refused:{rule}"
        and not reply.has_content()
    )


# ------------------------------------------------------------------ the seven channels (attacks)
def test_template_in_128_scalar_metrics_is_refused(
    params: dict[str, np.ndarray], template: np.ndarray
) -> None:
    smuggled = {f"m{i:03d}": float(v) for i, v in enumerate(template)}
    content = normal_reply(params, metrics=MetricRecord({**metrics(), **smuggled}))

    reply, context = run_client(params, content)

    assert refused(reply, Rule.METRIC_KEYS)
    assert not leaks(reply, template.astype(np.float64).tobytes())
    assert guard_stats(context)["messages_refused"] == 1


def test_template_in_metric_keys_is_refused(
    params: dict[str, np.ndarray], template: np.ndarray
) -> None:
    hexed = template.tobytes().hex()
    names = {f"x{hexed[i : i + 32]}": 0 for i in range(0, len(hexed), 32)}
    content = normal_reply(params, metrics=MetricRecord({**metrics(), **names}))

    reply, _ = run_client(params, content)

    assert refused(reply, Rule.METRIC_KEYS)
    assert not leaks(reply, hexed.encode())


def test_photo_in_unlimited_previous_records_is_refused(
    params: dict[str, np.ndarray], photo: np.ndarray
) -> None:
    raw = photo.tobytes()
    forged = {
        f"{PREVIOUS_PREFIX}{i}": privacy(
            i,
            **{
                "site-signature": raw[i * 96 : i * 96 + 64],
                "site-public-key": raw[i * 96 + 64 : i * 96 + 96],
            },
        )
        for i in range(len(raw) // 96)
    }

    reply, _ = run_client(params, normal_reply(params, **forged), stored={}, server_round=10_000)

    assert refused(reply, Rule.PREVIOUS_RECORDS)
    assert not leaks(reply, raw)


@pytest.mark.parametrize("stored", [None, "genuine"], ids=["no-store", "store"])
def test_forged_bytes_in_few_previous_records_are_refused(
    params: dict[str, np.ndarray], template: np.ndarray, stored: str | None
) -> None:
    raw = template.tobytes()
    forged = {
        f"{PREVIOUS_PREFIX}{r}": privacy(
            r,
            **{
                "site-signature": raw[r * 96 : r * 96 + 64],
                "site-public-key": raw[r * 96 + 64 : r * 96 + 96],
            },
        )
        for r in range(1, 4)
    }
    genuine = {r: privacy(r) for r in range(1, 4)} if stored else None

    reply, _ = run_client(params, normal_reply(params, **forged), stored=genuine)

    assert refused(reply, Rule.PREVIOUS_RECORDS)
    assert not leaks(reply, raw)


def test_second_array_record_reusing_an_allowed_key_is_refused(
    params: dict[str, np.ndarray], template: np.ndarray
) -> None:
    key, value = next((k, v) for k, v in params.items() if v.size >= template.size)
    carrier = np.zeros(value.size, np.float32)
    carrier[: template.size] = template
    second = ArrayRecord({key: Array(carrier.reshape(value.shape))})

    reply, _ = run_client(params, normal_reply(params, **{"arrays-2": second}))

    assert refused(reply, Rule.UNKNOWN_RECORD)
    assert not leaks(reply, template.tobytes())


@pytest.mark.parametrize(
    "prefix", ["", "site-3 refused: budget (max-epsilon)", "egress-refused:error-text "]
)
def test_template_in_an_error_reply_text_is_refused(
    params: dict[str, np.ndarray], template: np.ndarray, prefix: str
) -> None:
    encoded = base64.b64encode(template.tobytes()).decode()  # 684 characters

    def handler(msg: Message, context: Context) -> Message:
        error = Error(code=REFUSAL_CODES["budget"], reason=prefix + encoded)
        return Message(error=error, reply_to=msg)

    reply, _ = run_client(params, handler)

    assert refused(reply, Rule.ERROR_TEXT)
    assert not leaks(reply, encoded.encode())


def _named(channel: str, name: str, params: dict[str, np.ndarray]) -> RecordDict:
    """A reply whose one offending part is called ``name`` (the refusal used to echo it)."""
    if channel == "record":
        return normal_reply(params, **{name: ConfigRecord({"x": 1})})
    if channel == "array-key":
        arrays = {k: Array(v) for k, v in params.items()} | {name: Array(np.zeros(2, np.float32))}
        return normal_reply(params, arrays=ArrayRecord(arrays))
    if channel == "metric-key":
        return normal_reply(params, metrics=MetricRecord({**metrics(), name: 1}))
    return normal_reply(params, **{PREVIOUS_PREFIX + name: privacy(1)})


@pytest.mark.parametrize("channel", ["record", "array-key", "metric-key", "previous-name"])
def test_refusal_never_echoes_the_offending_name(
    params: dict[str, np.ndarray],
    template: np.ndarray,
    channel: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    hexed = template.tobytes().hex()

    with caplog.at_level(logging.ERROR, logger="client.training.egress"):
        reply, _ = run_client(params, _named(channel, hexed, params), stored={})

    assert reply.has_error() and reply.error.code == EGRESS_REFUSED_CODE
    assert reply.error.reason in {f"egress-refused:{rule}" for rule in Rule}
    assert not leaks(reply, hexed.encode())
    # The site's own log says which rule and (truncated) what, not the whole content.
    assert caplog.records and all(len(r.getMessage()) < 400 for r in caplog.records)


def test_exception_text_in_training_never_leaves(
    params: dict[str, np.ndarray], photo: np.ndarray, caplog: pytest.LogCaptureFixture
) -> None:
    hexed = photo.tobytes().hex()

    def handler(msg: Message, context: Context) -> Message:
        raise ValueError(hexed)

    with caplog.at_level(logging.ERROR, logger="client.training.egress"):
        reply, context = run_client(params, handler)

    assert reply.has_error()
    assert (reply.error.code, reply.error.reason) == (
        SITE_INTERNAL_ERROR_CODE,
        "site-internal-error",
    )
    assert not leaks(reply, hexed.encode())
    assert any(r.exc_info for r in caplog.records)  # the traceback stays in the site's log
    assert guard_stats(context)["messages_refused"] == 1


# ------------------------------------------------------------------ further hiding places
def test_bytes_appended_to_an_array_encoding_are_dropped(
    params: dict[str, np.ndarray], photo: np.ndarray
) -> None:
    key, value = next(iter(params.items()))
    padded = Array(
        "float32", tuple(value.shape), "numpy.ndarray", Array(value).data + photo.tobytes()
    )
    arrays = {k: Array(v) for k, v in params.items()} | {key: padded}

    reply, _ = run_client(params, normal_reply(params, arrays=ArrayRecord(arrays)))

    assert not reply.has_error()
    np.testing.assert_array_equal(reply.content.array_records["arrays"][key].numpy(), value)
    assert not leaks(reply, photo.tobytes())


def test_metadata_set_by_the_handler_is_not_sent(
    params: dict[str, np.ndarray], template: np.ndarray
) -> None:
    hexed = template.tobytes().hex()

    def handler(msg: Message, context: Context) -> Message:
        reply = Message(normal_reply(params), reply_to=msg)
        reply.metadata.group_id = hexed
        return reply

    reply, _ = run_client(params, handler)

    assert not reply.has_error()
    assert reply.metadata.group_id == "1"
    assert not leaks(reply, hexed.encode())


# ------------------------------------------------------------------ what may leave
@pytest.mark.parametrize("stamped", [False, True])
def test_well_formed_reply_passes_and_is_counted(
    params: dict[str, np.ndarray], stamped: bool
) -> None:
    extra = {"egress-checked": 4, "egress-refused": 0} if stamped else {}
    content = normal_reply(params, metrics=metrics(**extra))

    reply, context = run_client(params, content)

    assert not reply.has_error()
    assert list(reply.content.keys()) == ["arrays", "metrics", "privacy"]
    assert dict(reply.content["metrics"]) == dict(content["metrics"])
    assert dict(reply.content["privacy"]) == dict(content["privacy"])
    for key, value in params.items():
        np.testing.assert_array_equal(reply.content.array_records["arrays"][key].numpy(), value)
    assert guard_stats(context) == {
        "messages_seen": 1,
        "messages_refused": 0,
        "arrays_checked": len(params),
    }


def test_reply_without_privacy_record_passes(params: dict[str, np.ndarray]) -> None:
    content = normal_reply(params)
    del content["privacy"]
    reply, _ = run_client(params, content)
    assert not reply.has_error()


def test_matching_stored_previous_records_pass(params: dict[str, np.ndarray]) -> None:
    stored = {r: privacy(r) for r in (2, 3, 4)}
    previous = {f"{PREVIOUS_PREFIX}{r}": privacy(r) for r in (4, 2, 3)}

    reply, _ = run_client(params, normal_reply(params, **previous), stored=stored)

    assert not reply.has_error()
    assert list(reply.content.keys())[3:] == [f"{PREVIOUS_PREFIX}{r}" for r in (2, 3, 4)]


@pytest.mark.parametrize(
    "change",
    [
        {"site-signature": bytes(range(63)) + b"\xff"},
        {"epsilon-round": 0.5000000000000001},
        {"round": 2.0},  # same number, other type
        {"note": 1},
    ],
    ids=["signature-byte", "float-bit", "int-as-float", "extra-field"],
)
def test_previous_record_differing_from_the_stored_one_is_refused(
    params: dict[str, np.ndarray], change: dict[str, object]
) -> None:
    stored = {2: privacy(2)}
    record = privacy(2, **change)

    reply, _ = run_client(params, normal_reply(params, **{f"{PREVIOUS_PREFIX}2": record}), stored)

    assert refused(reply, Rule.PREVIOUS_RECORDS)


def test_more_than_max_previous_records_are_refused(params: dict[str, np.ndarray]) -> None:
    rounds = range(1, MAX_PREVIOUS + 2)
    stored = {r: privacy(r) for r in rounds}
    previous = {f"{PREVIOUS_PREFIX}{r}": privacy(r) for r in rounds}

    reply, _ = run_client(params, normal_reply(params, **previous), stored)

    assert refused(reply, Rule.PREVIOUS_RECORDS)


@pytest.mark.parametrize(
    ("name_round", "stored"),
    [("5", True), ("6", True), ("02", True), ("2", False)],
    ids=["this-round", "later-round", "leading-zero", "no-store"],
)
def test_previous_record_name_round_and_store_are_enforced(
    params: dict[str, np.ndarray], name_round: str, stored: bool
) -> None:
    store = {int(name_round): privacy(int(name_round))} if stored else None
    previous = {f"{PREVIOUS_PREFIX}{name_round}": privacy(int(name_round))}

    reply, _ = run_client(params, normal_reply(params, **previous), store)

    assert refused(reply, Rule.PREVIOUS_RECORDS)


def test_previous_record_store_failure_fails_closed(params: dict[str, np.ndarray]) -> None:
    def broken(context: Context, msg: Message, round_: int) -> ConfigRecord | None:
        raise OSError("state file unreadable")

    guard = make_egress_guard(manifest_from_state_dict(params), stored_record=broken)
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    content = normal_reply(params, **{f"{PREVIOUS_PREFIX}1": privacy(1)})

    reply = guard(instruction(), context, lambda m, c: Message(content, reply_to=m))

    assert refused(reply, Rule.EXCEPTION)


@pytest.mark.parametrize("round_", [ROUND - 1, ROUND + 1])
def test_privacy_record_round_must_be_the_requested_round(
    params: dict[str, np.ndarray], round_: int
) -> None:
    reply, _ = run_client(params, normal_reply(params, privacy=privacy(round_)))
    assert refused(reply, Rule.PRIVACY_ROUND)


@pytest.mark.parametrize(
    "record",
    [
        ConfigRecord({"round": ROUND}),
        privacy(note=1.0),
        privacy(**{"epsilon-cumulative": "1.0"}),
        privacy(**{"epsilon-cumulative": float("nan")}),
        privacy(**{"site-signature": bytes(63)}),
        privacy(**{"site-public-key": "ab" * 16}),
    ],
    ids=["missing-fields", "extra-field", "string", "nan", "short-signature", "key-as-text"],
)
def test_privacy_record_must_have_exactly_the_agreed_fields(
    params: dict[str, np.ndarray], record: ConfigRecord
) -> None:
    reply, _ = run_client(params, normal_reply(params, privacy=record))
    assert refused(reply, Rule.PRIVACY_FIELDS)


@pytest.mark.parametrize(
    "change",
    [
        {"site-index": -1},
        {"site-index": 3.0},
        {"dp": 2},
        {"site-index": 1_000_000},
        {"epsilon": -0.5},
        {"epsilon": float("inf")},
        {"epsilon-lifetime": float("nan")},
        {"delta": 0.0},
        {"delta": 1.0},
        {"steps": 1.5},
        {"noise-multiplier": -0.1},
        {"secret-noise": 2},
        {"egress-checked": -1, "egress-refused": 0},
        {"steps": [1, 2]},
    ],
    ids=str,
)
def test_metric_out_of_range_is_refused(
    params: dict[str, np.ndarray], change: dict[str, object]
) -> None:
    content = normal_reply(params, metrics=MetricRecord({**metrics(), **change}))  # type: ignore[dict-item]
    reply, _ = run_client(params, content)
    assert refused(reply, Rule.METRIC_RANGE)


@pytest.mark.parametrize(
    "change",
    [{"epsilon": -1.0, "epsilon-lifetime": -1.0, "dp": 0}, {"epsilon": 0, "delta": 0.999}],
    ids=["dp-off", "edges"],
)
def test_metric_edge_values_pass(params: dict[str, np.ndarray], change: dict[str, float]) -> None:
    reply, _ = run_client(params, normal_reply(params, metrics=metrics(**change)))
    assert not reply.has_error()


@pytest.mark.parametrize("drop", ["steps", "egress-refused"])
def test_metrics_must_be_complete(params: dict[str, np.ndarray], drop: str) -> None:
    values = dict(metrics(**{"egress-checked": 1, "egress-refused": 0}))
    del values[drop]
    reply, _ = run_client(params, normal_reply(params, metrics=MetricRecord(values)))
    assert refused(reply, Rule.METRIC_KEYS)


def test_metric_allow_list_is_the_agreed_one() -> None:
    assert list(METRIC_RULES) == [
        "site-index",
        "dp",
        "epsilon",
        "epsilon-lifetime",
        "delta",
        "steps",
        "noise-multiplier",
        "secret-noise",
        "egress-checked",
        "egress-refused",
    ]


def test_arrays_must_hold_exactly_the_manifest(
    params: dict[str, np.ndarray], yale: dict[str, np.ndarray]
) -> None:
    arrays = {k: Array(v) for k, v in params.items()}
    key, value = next((k, v) for k, v in params.items() if v.ndim == 4)
    cases = {
        Rule.ARRAY_KEYS: {k: a for k, a in arrays.items() if k != key},
        Rule.ARRAY_SHAPE: arrays | {key: Array(yale["images"][:4, None].astype(np.float32))},
        Rule.ARRAY_DTYPE: arrays | {key: Array(value.astype(np.float64))},
        Rule.ARRAY_VALUES: arrays | {key: Array(np.full_like(value, np.nan))},
    }
    for rule, case in cases.items():
        reply, _ = run_client(params, normal_reply(params, arrays=ArrayRecord(case)))
        assert refused(reply, rule), rule
    reply, _ = run_client(params, RecordDict({"metrics": metrics()}))
    assert refused(reply, Rule.MISSING_RECORD)


def test_a_known_name_with_the_wrong_record_type_is_refused(params: dict[str, np.ndarray]) -> None:
    content = normal_reply(params)
    content["privacy"] = MetricRecord({"round": ROUND})
    reply, _ = run_client(params, content)
    assert refused(reply, Rule.UNKNOWN_RECORD)


# ------------------------------------------------------------------ errors the site may send
def test_site_refusal_leaves_with_its_fixed_reason(params: dict[str, np.ndarray]) -> None:
    def handler(msg: Message, context: Context) -> Message:
        raise SiteRefusal("budget", 3, "max-epsilon", detail="epsilon 7.31 > budget 5")

    reply, context = run_client(params, handler)

    assert (reply.error.code, reply.error.reason) == (
        REFUSAL_CODES["budget"],
        "site-3 refused: budget (max-epsilon)",
    )
    assert b"7.31" not in wire(reply)
    assert guard_stats(context)["messages_refused"] == 0


@pytest.mark.parametrize(
    ("code", "reason", "passes"),
    [
        (4_103, "site-0 refused: replay (round-3)", True),
        (4_101, "site-0 refused: replay (round-3)", False),  # code of another refusal
        (4_103, "site-0 refused: replay (Round 3)", False),
        (4_103, "site-00 refused: replay (round-3)", False),
        (4_103, "site-0 refused: replay (round-3)\n", False),
    ],
)
def test_error_reply_passes_only_as_a_site_refusal_text(
    params: dict[str, np.ndarray], code: int, reason: str, passes: bool
) -> None:
    reply, _ = run_client(params, lambda m, c: Message(error=Error(code, reason), reply_to=m))
    if passes:
        assert (reply.error.code, reply.error.reason) == (code, reason)
    else:
        assert refused(reply, Rule.ERROR_TEXT)


@pytest.mark.parametrize(
    ("code_name", "site_index", "setting"),
    [("budget", 3, "Max epsilon"), ("free", 3, "x"), ("budget", -1, "x"), ("budget", 1, "a" * 41)],
)
def test_site_refusal_accepts_only_its_template(
    code_name: str, site_index: int, setting: str
) -> None:
    with pytest.raises(ValueError):
        SiteRefusal(code_name, site_index, setting)


# ------------------------------------------------------------------ guard set-up and counters
def test_guard_counts_every_message_over_several_rounds(params: dict[str, np.ndarray]) -> None:
    guard = make_egress_guard(manifest_from_state_dict(params))
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    contents = [normal_reply(params), RecordDict({"config": ConfigRecord({"s": "x"})})] * 3
    for content in contents:

        def handler(msg: Message, ctx: Context, c: RecordDict = content) -> Message:
            return Message(c, reply_to=msg)

        guard(instruction(), context, handler)
    assert guard_stats(context) == {
        "messages_seen": 6,
        "messages_refused": 3,
        "arrays_checked": 3 * len(params),
    }


def test_manifest_with_an_image_shape_is_rejected() -> None:
    with pytest.raises(ValueError, match="image-like"):
        make_egress_guard({"face": (112, 112, 3)})


def test_privacy_allow_list_has_the_signature_fields() -> None:
    assert PRIVACY_RECORD_FIELDS["site-signature"].size == 64
    assert PRIVACY_RECORD_FIELDS["site-public-key"].size == 32
