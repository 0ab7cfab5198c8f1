"""Fuzzing every parser of outside input: whatever arrives, the only exception is facefed's one-line
error type (never a crash with a traceback). Hypothesis, derandomized so CI is reproducible.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from client.imageio import decode_image
from common.config import parse_run_config
from common.data.lfw import parse_pairs, parse_people
from common.errors import FacefedError
from common.models import EmotionNet, FaceEmbedder
from common.privacy.site_record import BYTES_FIELDS, SCALAR_FIELDS, RoundReport
from common.serde import to_arrays
from server.validation import validate_reply
from simulations.scenarios import load_scenario

FUZZ = settings(
    max_examples=150,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
scalars = st.one_of(
    st.booleans(), st.integers(-(10**6), 10**6), st.floats(allow_nan=True), st.text(max_size=20)
)
config_keys = st.sampled_from(
    [
        "num-rounds",
        "max-epsilon",
        "delta",
        "strategy",
        "face-sources",
        "lfw-eval-sets",
        "site-budgets",
        "dp",
        "cohort-size",
        "num-sites",
        "noise-multiplier",
        "central-clip",
        "unknown-key",
    ]
)


@FUZZ
@given(st.dictionaries(config_keys, scalars, max_size=6))
def test_run_config_parser(config: dict) -> None:
    with contextlib.suppress(FacefedError):
        parse_run_config(config)


@FUZZ
@given(st.binary(max_size=300))
def test_scenario_files(tmp_path_factory, raw: bytes) -> None:
    path = Path(tmp_path_factory.mktemp("scn")) / "s.toml"
    path.write_bytes(raw)
    with contextlib.suppress(FacefedError):
        load_scenario(str(path))


def _png() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64 * 48, dtype=np.uint8).reshape(64, 48)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


@FUZZ
@given(
    st.binary(max_size=2000)
    | st.builds(
        lambda i, b: PNG[:i] + b + PNG[i + len(b) :],
        st.integers(0, len(PNG)),
        st.binary(max_size=16),
    )
)
def test_image_decoder(raw: bytes) -> None:
    try:
        image = decode_image(raw)
    except FacefedError:
        return
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


@FUZZ
@given(st.lists(st.text(alphabet="ab_\t 0123456789\n-", max_size=30), max_size=12))
def test_lfw_text_files(lines: list[str]) -> None:
    for parse in (parse_pairs, parse_people):
        with contextlib.suppress(FacefedError):
            parse(lines, "fuzz.txt")


record_values = st.one_of(scalars, st.binary(max_size=70), st.lists(st.integers(0, 5), max_size=3))


@FUZZ
@given(st.dictionaries(st.sampled_from([*SCALAR_FIELDS, *BYTES_FIELDS, "extra"]), record_values))
def test_privacy_records_from_sites(fields: dict) -> None:
    with contextlib.suppress(FacefedError):
        RoundReport.from_record(fields)


SENT = to_arrays(FaceEmbedder(8), EmotionNet(8))
REFERENCE = {k: a.numpy() for k, a in SENT.items()}
KEYS = list(REFERENCE)


@FUZZ
@given(st.data())
def test_incoming_updates(data: st.DataObject) -> None:
    state = {k: torch.from_numpy(v.copy()) for k, v in REFERENCE.items()}
    for _ in range(data.draw(st.integers(0, 3))):
        key = data.draw(st.sampled_from(sorted(state)))
        action = data.draw(st.sampled_from(["nan", "scale", "reshape", "drop", "dtype"]))
        if action == "nan":
            state[key] = state[key] * float("nan")
        elif action == "scale":
            state[key] = state[key] * data.draw(st.floats(-1e9, 1e9))
        elif action == "reshape":
            state[key] = state[key].flatten()
        elif action == "drop":
            state.pop(key)
        else:
            state[key] = state[key].double()
    metrics = data.draw(
        st.dictionaries(
            st.sampled_from(["num-examples", "site-index", "epsilon", "delta", "steps", "dp"]),
            st.one_of(st.integers(0, 9), st.floats(allow_nan=True)),
        )
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord(torch_state_dict=state),
            "metrics": MetricRecord(metrics),
            "x": ConfigRecord({}),
        }
    )
    with contextlib.suppress(FacefedError):
        validate_reply(content, REFERENCE, max_update_norm=1e3)
