"""Fuzzing every parser of outside input: whatever arrives, the only exception is facefed's one-line
error type (never a crash with a traceback). Hypothesis, derandomized so CI is reproducible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from client.recogniser.imageio import decode_image
from client.recogniser.templates import TemplateStore
from client.training.site_store import SiteStore
from common.checkpoint import read_checkpoint
from common.config import parse_run_config
from common.crypto import keys
from common.crypto.signing import generate_private_key
from common.data.fer2013 import _read_index
from common.data.lfw import parse_pairs, parse_people
from common.errors import FacefedError
from common.models import EmotionNet, FaceEmbedder
from common.privacy.accounting import compute_epsilon
from common.privacy.chain import check_chain
from common.privacy.entry import make_entry_body, parse_entry_body
from common.privacy.events import DpSgdEvent
from common.privacy.ledger import Ledger, read_rows
from common.privacy.site_record import BYTES_FIELDS, SCALAR_FIELDS, RoundReport
from common.serde import to_arrays
from server.validation import validate_reply
from simulations.scenarios import load_scenario

FUZZ = settings(
    max_examples=int(os.environ.get("FACEFED_FUZZ_EXAMPLES", "150")),  # bench: many more
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


EVENTS = [DpSgdEvent(noise_multiplier=1.0, sample_rate=0.01, steps=10, clip_norm=1.0, name="face")]
EPSILON = compute_epsilon(EVENTS, 1e-5, "rdp")
GOOD_BODY = make_entry_body(
    run_id="fuzz",
    site_id="site-0",
    round=1,
    mechanisms=EVENTS,
    accountant="rdp",
    epsilon_round=EPSILON,
    epsilon_cumulative=EPSILON,
    delta=1e-5,
    budget_epsilon=8.0,
    model_hash="h",
    secret_noise=True,
    epsilon_lifetime=EPSILON,
)
ENTRY_FIELDS = sorted(GOOD_BODY)


def _ledger_rows() -> tuple[list, list]:
    import tempfile

    path = Path(tempfile.mkdtemp()) / "ledger.db"
    coordinator, site = generate_private_key(), generate_private_key()
    with Ledger.open(path, run_id="fuzz", coordinator_key=coordinator) as ledger:
        from common.crypto.signing import canonical_bytes, sign

        ledger.append(GOOD_BODY, site.public_key(), sign(site, canonical_bytes(GOOD_BODY)))
        ledger.finish("fuzz")
    return read_rows(path)


LEDGER_ROWS, LEDGER_KEYS = _ledger_rows()


def template_store(directory: Path) -> TemplateStore:
    store = TemplateStore.create(directory / "store", keys.new_key_file(directory / "k.key"), dim=8)
    store.enroll("alice", np.ones(8, np.float32) / np.sqrt(8), model_tag="m", n_images=1)
    return store


entry_values = st.one_of(
    scalars,
    st.sampled_from(["secret", "seeded"]),
    st.lists(st.dictionaries(st.text(max_size=8), scalars, max_size=4), max_size=2),
)


@FUZZ
@given(st.dictionaries(st.sampled_from([*ENTRY_FIELDS, "extra"]), entry_values))
def test_ledger_entry_bodies(fields: dict) -> None:
    with contextlib.suppress(FacefedError):
        parse_entry_body({**GOOD_BODY, **fields})


@FUZZ
@given(st.integers(0, len(LEDGER_ROWS) - 1), st.binary(max_size=400) | st.integers(0, 10**6))
def test_stored_ledger_rows(index: int, change: bytes | int) -> None:
    rows = list(LEDGER_ROWS)
    row = rows[index]
    if isinstance(change, bytes):  # the stored record replaced by arbitrary bytes
        rows[index] = dataclasses.replace(row, record=change)
    else:  # one bit of the stored record flipped
        data = bytearray(row.record)
        data[change % len(data)] ^= 1 << (change % 8)
        rows[index] = dataclasses.replace(row, record=bytes(data))
    check = check_chain(rows, LEDGER_KEYS)
    assert not check.ok  # every change is caught, and reported rather than raised


@FUZZ
@given(
    st.sampled_from(["nonce", "ciphertext", "wrap_nonce", "wrapped_key"]),
    st.binary(max_size=80),
)
def test_stored_template_records(tmp_path_factory, column: str, value: bytes) -> None:
    store = template_store(Path(tmp_path_factory.mktemp("tpl")))
    store._conn.execute(f"UPDATE templates SET {column} = ? WHERE identity = 'alice'", (value,))
    with contextlib.suppress(FacefedError):
        store.get("alice")
        raise AssertionError("a changed record decrypted")  # only reachable if nothing changed
    store.close()


@FUZZ
@given(st.binary(max_size=600), st.sampled_from(["state", "checkpoint"]))
def test_site_state_and_checkpoint_files(tmp_path_factory, raw: bytes, kind: str) -> None:
    directory = Path(tmp_path_factory.mktemp("files"))
    if kind == "state":
        (directory / "release-00000001.state").write_bytes(raw)
        with contextlib.suppress(FacefedError):
            SiteStore(directory).lifetime()
    else:
        (directory / "round_001.ckpt").write_bytes(raw)
        with contextlib.suppress(FacefedError):
            read_checkpoint(directory / "round_001.ckpt")


@FUZZ
@given(
    st.lists(
        st.text(alphabet='ab,"\n 0123456789/.-PrivateTestTrainingPublic', max_size=40), max_size=8
    )
)
def test_fer2013_index_files(tmp_path_factory, lines: list[str]) -> None:
    index = Path(tmp_path_factory.mktemp("fer")) / "index.csv"
    index.write_text("path,label,emotion,usage\n" + "\n".join(lines))
    with contextlib.suppress(FacefedError):
        _read_index(index, "Training")
