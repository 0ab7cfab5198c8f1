"""Fuzzing the template store's ``meta`` rows: whatever an attacker writes there, opening,
unlocking and reading the store raise only facefed's one-line errors, and a refused store is left
byte for byte as it was. Hypothesis, derandomized so CI is reproducible.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client.recogniser.templates import DB_NAME, TemplateStore
from common.crypto import keys
from common.errors import FacefedError

FUZZ = settings(
    max_examples=int(os.environ.get("FACEFED_FUZZ_EXAMPLES", "150")),
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TAG = "m"
CALIBRATION = {
    "threshold": 0.4,
    "far": 0.001,
    "tar": 0.9,
    "heldout_tar": 0.88,
    "heldout_far": 0.0012,
    "n_genuine": 10,
    "n_impostor": 2000,
    "n_folds": 2,
    "model_tag": TAG,
    "source": "LFW",
}
NAMES = ["schema_version", "store_id", "embedding_dim", "key_info", "state", f"calibration:{TAG}"]


def _base_store() -> tuple[Path, keys.MasterKey]:
    """One enrolled, calibrated store (keyfile key), built once and copied for each example."""
    root = Path(tempfile.mkdtemp(prefix="facefed-meta-fuzz-"))
    key = keys.new_key_file(root / "k.key")
    with TemplateStore.create(root / "store", key, dim=8) as store:
        store.enroll("alice", np.ones(8, np.float32) / np.sqrt(8), model_tag=TAG, n_images=1)
        store.set_meta(f"calibration:{TAG}", CALIBRATION)
    return root / "store" / DB_NAME, key


BASE_DB, KEY = _base_store()

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
calibration_edits = st.dictionaries(
    st.sampled_from([*CALIBRATION, "extra"]), json_values, min_size=1, max_size=3
).map(lambda edit: json.dumps(CALIBRATION | edit))
key_info_edits = st.fixed_dictionaries(
    {"n": st.integers(0, 2**64), "r": st.integers(-1, 2**20), "p": st.integers(-1, 2**20)}
).map(
    lambda s: json.dumps(
        {"kind": "passphrase", "verifier": "00" * 32, "scrypt": {"salt": "00" * 16, **s}}
    )
)
values = st.one_of(
    st.text(max_size=40),
    st.binary(max_size=40),
    st.integers(-(2**63), 2**63 - 1),  # what SQLite can hold
    st.floats(allow_nan=False),
    json_values.map(json.dumps),
    calibration_edits,
    key_info_edits,
)
rows = st.tuples(
    st.sampled_from(NAMES) | st.text(max_size=16),
    values,
    st.none() | st.binary(min_size=0, max_size=40) | st.just(b"keep"),
)


def _files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@FUZZ
@given(st.lists(rows, min_size=1, max_size=3), st.booleans())
def test_only_facefed_errors_escape_from_edited_meta_rows(
    edits: list[tuple[str, object, bytes | None]], delete_first: bool
) -> None:
    # Arrange: a copy of the base store with meta rows replaced, added or removed
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        shutil.copy(BASE_DB, directory / DB_NAME)
        conn = sqlite3.connect(directory / DB_NAME)
        for name, value, mac in edits:
            if delete_first:
                conn.execute("DELETE FROM meta WHERE name = ?", (name,))
            if mac == b"keep":
                conn.execute("UPDATE meta SET value = ? WHERE name = ?", (value, name))
            else:
                conn.execute(
                    "INSERT OR REPLACE INTO meta VALUES (?, ?, ?)", (name, value, mac or b"")
                )
        conn.commit()
        conn.close()
        before = _files(directory)

        # Act: what `facefed site verify` does with the store
        refused = False
        try:
            with TemplateStore.open(directory) as store:
                store.unlock(KEY)
                store.get_meta(f"calibration:{TAG}")
                store.get("alice")
        except FacefedError as exc:  # anything else fails the test with its traceback
            refused = True
            assert "\n" not in str(exc)

        # Assert: a refused store is untouched
        if refused:
            assert _files(directory) == before
