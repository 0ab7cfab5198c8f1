"""Egress guard: normal replies pass; images, templates, strings and unknown arrays are stopped."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from client.egress import (
    EGRESS_REFUSED_CODE,
    PRIVACY_RECORD_FIELDS,
    guard_stats,
    make_egress_guard,
    manifest_from_state_dict,
)
from common.models import EmotionNet, FaceEmbedder
from tests.messages import train_message

Reply = Callable[[], RecordDict]


@pytest.fixture(scope="module")
def params(small_models: tuple[FaceEmbedder, EmotionNet]) -> dict[str, np.ndarray]:
    face = small_models[0]
    return {f"face.{k}": v.detach().numpy().copy() for k, v in face.state_dict().items()}


def instruction() -> Message:
    content = RecordDict({"config": ConfigRecord({"server-round": 1})})
    return train_message(content, dst_node_id=7)


def run_client(params: dict[str, np.ndarray], content: RecordDict) -> tuple[Message, Context]:
    """A ClientApp with the guard as its mod whose train handler replies ``content``."""
    app = ClientApp(mods=[make_egress_guard(manifest_from_state_dict(params))])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return Message(content, reply_to=msg)

    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    return app(instruction(), context), context


def normal_reply(params: dict[str, np.ndarray]) -> RecordDict:
    return RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in params.items()}),
            "metrics": MetricRecord({"num-examples": 120, "train_loss": 0.73}),
            "privacy": ConfigRecord(
                {
                    "epsilon-cumulative": 1.25,
                    "delta": 1e-5,
                    "face-steps": 40,
                    "site-signature": bytes(64),
                    "site-public-key": bytes(32),
                }
            ),
        }
    )


def refused(reply: Message, fragment: str) -> bool:
    return (
        reply.has_error()
        and reply.error.code == EGRESS_REFUSED_CODE
        and fragment in (reply.error.reason or "")
    )


def test_normal_reply_passes_unchanged_and_is_counted(params: dict[str, np.ndarray]) -> None:
    reply, context = run_client(params, normal_reply(params))
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics", "privacy"}
    assert guard_stats(context) == {
        "messages_seen": 1,
        "messages_refused": 0,
        "arrays_checked": len(params),
    }


def test_client_sending_an_image_is_stopped(
    params: dict[str, np.ndarray], yale: dict[str, np.ndarray]
) -> None:
    content = normal_reply(params)
    content["debug"] = ArrayRecord({"face": Array(yale["images"][0])})
    reply, context = run_client(params, content)
    assert refused(reply, "debug.face")
    assert not reply.has_content()
    assert guard_stats(context)["messages_refused"] == 1


def test_image_batch_even_as_float_under_a_parameter_key_is_stopped(
    params: dict[str, np.ndarray], yale: dict[str, np.ndarray]
) -> None:
    key = next(iter(params))
    batch = yale["images"][:4, None].astype(np.float32)  # (4, 1, 243, 320)
    arrays = {k: Array(v) for k, v in params.items()} | {key: Array(batch)}
    reply, _ = run_client(params, RecordDict({"arrays": ArrayRecord(arrays)}))
    assert refused(reply, "image-like shape")


def test_client_sending_a_template_is_stopped(params: dict[str, np.ndarray]) -> None:
    template = np.random.default_rng(0).standard_normal(128).astype(np.float32)
    arrays = {k: Array(v) for k, v in params.items()} | {"template": Array(template)}
    reply, _ = run_client(params, RecordDict({"arrays": ArrayRecord(arrays)}))
    assert refused(reply, "arrays.template")


def test_template_smuggled_as_a_metric_list_is_stopped(params: dict[str, np.ndarray]) -> None:
    metrics = MetricRecord({"loss": 0.5, "embedding": [0.1] * 128})
    reply, _ = run_client(params, RecordDict({"metrics": metrics}))
    assert refused(reply, "metrics.embedding")


def test_wrong_shape_or_integer_dtype_for_a_parameter_is_stopped(
    params: dict[str, np.ndarray],
) -> None:
    key, value = next((k, v) for k, v in params.items() if v.ndim == 4)
    wrong_shape = {k: Array(v) for k, v in params.items()} | {key: Array(value[:1])}
    reply, _ = run_client(params, RecordDict({"arrays": ArrayRecord(wrong_shape)}))
    assert refused(reply, f"has shape {value[:1].shape}")
    as_int = {k: Array(v) for k, v in params.items()} | {key: Array(value.astype(np.int32))}
    reply, _ = run_client(params, RecordDict({"arrays": ArrayRecord(as_int)}))
    assert refused(reply, "dtype int32")


@pytest.mark.parametrize(
    ("record", "fragment"),
    [
        (ConfigRecord({"identity": "alice"}), "'config'"),
        (ConfigRecord({"epsilon-cumulative": "1.0"}), "must be a finite number"),
        (ConfigRecord({"site-signature": bytes(63)}), "exactly 64 bytes"),
        (ConfigRecord({"site-public-key": "ab" * 16}), "exactly 32 bytes"),
        (ConfigRecord({"note": 1.0}), "not in the allow-list"),
        (ConfigRecord({"epsilon-cumulative": float("nan")}), "finite"),
    ],
)
def test_strings_and_unlisted_config_fields_are_stopped(
    params: dict[str, np.ndarray], record: ConfigRecord, fragment: str
) -> None:
    name = "config" if "identity" in record else "privacy"
    reply, _ = run_client(params, RecordDict({name: record}))
    assert refused(reply, fragment)


def test_nan_metric_is_stopped(params: dict[str, np.ndarray]) -> None:
    reply, _ = run_client(params, RecordDict({"metrics": MetricRecord({"loss": float("inf")})}))
    assert refused(reply, "not a finite scalar")


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
