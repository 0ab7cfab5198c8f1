"""The issue 4 benchmark works end to end at a tiny size (a few real LFW faces, one repetition)."""

from __future__ import annotations

import json
import logging
import tarfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from bench import templates_bench as tb
from bench.timing import measure
from common.checkpoint import save_checkpoint
from common.errors import DataError
from common.model_spec import ModelSpec
from common.models import EmotionNet, FaceEmbedder
from common.paths import data_dir

TINY = tb.BenchConfig(sizes=(3, 7), reps=1, warmup=0, verify_reps=1, verify_warmup=0)


@pytest.fixture(scope="module")
def lfw_faces() -> np.ndarray:
    """The first 5 LFW crops of the shipped archive, (5, 112, 112, 3) RGB."""
    archive = data_dir() / "lfw_deepfunneled112_sets1-5.tar.gz"
    if not archive.is_file():
        pytest.skip(f"{archive} not available")
    faces = []
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:
            handle = tar.extractfile(member) if member.name.endswith(".jpg") else None
            if handle is not None:
                bgr = cv2.imdecode(np.frombuffer(handle.read(), np.uint8), cv2.IMREAD_COLOR)
                if bgr is None:
                    pytest.fail(f"{member.name} in {archive} does not decode")
                faces.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            if len(faces) == 5:
                break
    return np.stack(faces)


@pytest.fixture(scope="module", autouse=True)
def single_threaded() -> Iterator[None]:
    """Tiny models on a shared 2-core machine run faster without intra-op threads (``main`` also
    sets torch and OpenCV threads); both settings are restored afterwards."""
    torch_threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    cv2.setNumThreads(cv2_threads)


@pytest.fixture(scope="module")
def embedder() -> FaceEmbedder:
    torch.manual_seed(0)
    return FaceEmbedder(width=8).eval()


def test_measure_reports_median_of_timed_reps_only() -> None:
    # Arrange: count preparations and timed runs
    calls: list[str] = []

    def prepare() -> Callable[[], object]:
        calls.append("prepare")
        return lambda: calls.append("run")

    # Act
    timing = measure(prepare, reps=3, warmup=2)

    # Assert
    assert calls.count("run") == 5 and calls.count("prepare") == 5
    assert timing.reps == 3 and 0 <= timing.min_s <= timing.median_s <= timing.max_s
    with pytest.raises(ValueError, match="reps"):
        measure(prepare, reps=0)


def test_template_pool_adds_distinct_mirror_embeddings(
    embedder: FaceEmbedder, lfw_faces: np.ndarray
) -> None:
    ids, pool = tb.template_pool(embedder, lfw_faces, 8)

    assert ids[:5] == [f"lfw{i:05d}" for i in range(5)]
    assert ids[5:] == [f"lfw{i:05d}.mirror" for i in range(3)]
    assert pool.shape == (8, 128) and len(np.unique(pool, axis=0)) == 8
    np.testing.assert_allclose(np.linalg.norm(pool, axis=1), 1.0, atol=1e-5)
    with pytest.raises(DataError, match="at least 6 face images"):
        tb.template_pool(embedder, lfw_faces, 11)


def test_null_cipher_is_only_active_inside_its_context() -> None:
    with tb.cipher("null"):
        assert tb.templates_module.envelope is tb.NULL_ENVELOPE
    assert tb.templates_module.envelope is tb.envelope


def test_run_measures_every_row_and_renders_tables(
    embedder: FaceEmbedder, lfw_faces: np.ndarray, tmp_path: Path
) -> None:
    # Arrange
    yunet = data_dir() / tb.YUNET_FILE

    # Act
    results = tb.run(
        TINY,
        embedder=embedder,
        faces=lfw_faces,
        workdir=tmp_path,
        yunet=yunet if yunet.is_file() else None,
    )
    table = tb.markdown(results)

    # Assert: every operation at every size, with positive times, and the temporary stores gone
    assert [row["n"] for row in results["store"]] == [3, 7]
    for row in results["store"]:
        for kind in ("aes-gcm", "null"):
            assert all(row[kind][op].median_s > 0 for op in ("encrypt", "decrypt", "rotate"))
    assert results["verify"][0]["detector"] == "haar"
    assert all(t.median_s > 0 for t in results["verify"][0]["stages"].values())
    assert "| encrypt | 7 |" in table and "| rotate | 3 |" in table and "haar (align:" in table
    assert not any(tmp_path.glob("store-*"))
    json.dumps(tb.jsonable(results))  # JSON-ready


def test_main_writes_json_and_prints_table(
    lfw_faces: np.ndarray,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Arrange: a real (tiny, untrained) checkpoint and the LFW loader limited to 5 faces
    torch.manual_seed(0)
    ckpt = save_checkpoint(
        tmp_path / "c.ckpt", FaceEmbedder(width=8), EmotionNet(width=8), ModelSpec(8, 8), 0
    )
    monkeypatch.setattr(tb, "load_lfw", lambda: types.SimpleNamespace(images=lfw_faces))
    out = tmp_path / "r.json"

    # Act
    argv = ["--checkpoint", str(ckpt), "--sizes", "2", "--reps", "1", "--warmup", "0"]
    argv += ["--verify-reps", "1", "--no-yunet", "--output", str(out), "--workdir", str(tmp_path)]
    store_logger = logging.getLogger("client.recogniser.templates")
    level = store_logger.level
    try:
        code = tb.main(argv)
    finally:
        store_logger.setLevel(level)  # main quietens the store's per-rotation log lines

    # Assert
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved["model"]["face_width"] == 8 and saved["store"][0]["n"] == 2
    assert saved["store"][0]["aes-gcm"]["encrypt"]["reps"] == 1
    assert "| decrypt | 2 |" in capsys.readouterr().out


def test_main_refuses_missing_checkpoint_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = tb.main(["--checkpoint", str(tmp_path / "none.ckpt"), "--output", str(tmp_path / "r")])

    assert code == 2
    assert "not found" in capsys.readouterr().err
