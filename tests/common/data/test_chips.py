"""Dataset chips (common.data.chips): detection rates, the on-disk cache, its reuse and repair."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from common.data.chips import LandmarkDetector, build_chips, dataset_chips
from common.data.lfw import load_lfw
from common.data.npz_sets import load_extended_yale_b, load_yale_faces
from common.data.orl import load_orl
from common.errors import ConfigError
from common.paths import data_dir

YUNET = data_dir() / "face_detection_yunet_2026may.onnx"
pytestmark = pytest.mark.skipif(not YUNET.is_file(), reason="YuNet model not in the data dir")

# Floors under the rates measured on the full sets (LFW 100%, ORL 100%, Yale 100%, Extended Yale B
# 86.1%: its darkest illuminations hide the face from YuNet).
RATE_FLOORS = {"lfw": 0.98, "orl": 0.97, "yale": 0.97, "eyaleb": 0.75}


def subset(source: str) -> np.ndarray:
    if source == "lfw":
        return load_lfw().images[::25]
    if source == "orl":
        return load_orl().images[::2]
    if source == "yale":
        return load_yale_faces()[0].images
    return load_extended_yale_b().images[::10]


@pytest.mark.parametrize("source", sorted(RATE_FLOORS))
def test_detection_rate_is_above_its_floor(source: str) -> None:
    images = subset(source)
    arrays = build_chips(images, LandmarkDetector(YUNET).landmarks)
    assert arrays["chips"].shape == (len(images), 150, 150, 3)
    assert arrays["chips"].dtype == np.uint8
    assert arrays["aligned"].mean() >= RATE_FLOORS[source], arrays["aligned"].mean()


def test_undetected_images_fall_back_to_the_median_landmarks() -> None:
    images = load_orl().images[:6]
    real = LandmarkDetector(YUNET).landmarks
    calls = iter(range(len(images)))
    arrays = build_chips(images, lambda img: None if next(calls) == 0 else real(img))
    assert not arrays["aligned"][0] and arrays["aligned"][1:].all()
    relative = arrays["landmarks"][1:] / np.array([92, 112], np.float32)
    expected = np.median(relative, axis=0) * np.array([92, 112], np.float32)
    np.testing.assert_allclose(arrays["landmarks"][0], expected, rtol=1e-5)


def test_cache_is_reused_and_a_corrupt_cache_is_rebuilt(
    isolated_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = dataset_chips("orl")
    assert len(first) == 400 and first.detection_rate >= RATE_FLOORS["orl"]
    np.testing.assert_array_equal(first.labels, load_orl().labels)
    (cache_file,) = isolated_cache.glob("chips-orl-*.npz")

    def no_detection(self: LandmarkDetector, image: np.ndarray) -> None:
        raise AssertionError("the cached chips must be reused")

    with monkeypatch.context() as patch:
        patch.setattr(LandmarkDetector, "landmarks", no_detection)
        again = dataset_chips("orl")
    np.testing.assert_array_equal(again.chips, first.chips)
    assert again.seconds == 0.0

    cache_file.write_bytes(b"not an npz file")
    rebuilt = dataset_chips("orl")
    np.testing.assert_array_equal(rebuilt.chips, first.chips)
    assert rebuilt.seconds > 0
    with np.load(cache_file) as npz:  # and written back intact
        assert npz["chips"].shape == (400, 150, 150, 3)


def test_missing_yunet_model_is_a_one_line_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"YuNet model .*nope\.onnx not found") as info:
        dataset_chips("orl", yunet_path=tmp_path / "nope.onnx")
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="unknown chip source"):
        dataset_chips("casia")
