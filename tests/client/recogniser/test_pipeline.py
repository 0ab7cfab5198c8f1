"""Detection, alignment, embedding and emotion on real uncropped Yale photos and LFW crops."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from client.recogniser.calibration import Calibration, calibrate, is_gray
from client.recogniser.imageio import decode_image
from client.recogniser.pipeline import (
    EMOTION_CHIP_BOX,
    EMOTION_CROP,
    LFW112_TEMPLATE,
    YUNET_ENV,
    ChipAligner,
    FacePipeline,
    FaceStatus,
    HaarDetector,
    PipelineConfig,
    YuNetDetector,
    default_detector,
    emotion_crop_of_chip,
    emotion_names,
    load_pipeline,
)
from common.data.preprocess import emotion_tensor
from common.errors import ConfigError, DataError
from common.facenet.chips import CHIP_SIZE, align_chip, refine_landmarks
from common.facenet.resnet import ChipEmbedder, DlibResNet, chip_tensor
from common.models import EmotionNet, FaceEmbedder

YaleRgb = Callable[[int, str], np.ndarray]
YUNET = Path(__file__).parents[4] / "shared" / "data" / "face_detection_yunet_2026may.onnx"


@pytest.fixture(scope="module")
def pipeline(small_models: tuple[FaceEmbedder, EmotionNet]) -> FacePipeline:
    return FacePipeline(*small_models)


def gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


# ---------------------------------------------------------------------- detection outcomes
def test_haar_finds_exactly_one_face_on_most_yale_photos(
    pipeline: FacePipeline, yale: dict[str, np.ndarray]
) -> None:
    results = [pipeline.locate(gray_to_rgb(img)) for img in yale["images"][::4]]
    ok = [r for r in results if r.status is FaceStatus.OK]
    assert len(ok) >= 0.9 * len(results)
    assert all(r.face is not None and r.face.shape == (112, 112, 3) for r in ok)
    assert {r.method for r in ok} <= {"eyes", "box"}
    assert any(r.method == "eyes" for r in ok)  # eye alignment works on real photos


@pytest.mark.skipif(not YUNET.is_file(), reason="YuNet model not in ../shared/data")
def test_yunet_aligns_landmarks_onto_the_training_template(
    small_models: tuple[FaceEmbedder, EmotionNet], yale: dict[str, np.ndarray]
) -> None:
    detector = YuNetDetector(YUNET)
    yunet = FacePipeline(*small_models, detector=detector)
    for img in yale["images"][::20]:
        result = yunet.locate(gray_to_rgb(img))
        assert result.status is FaceStatus.OK and result.method == "landmarks5"
        again = detector.detect(cv2.resize(result.face, (224, 224)))  # type: ignore[arg-type]
        assert again, "the aligned face must still look like a face"
        eyes = again[0].landmarks[:2] / 2  # type: ignore[index]
        assert np.abs(eyes - LFW112_TEMPLATE[:2]).max() < 6.0


def test_blank_and_texture_images_have_no_face(pipeline: FacePipeline) -> None:
    rng = np.random.default_rng(0)
    for img in (
        np.full((240, 320, 3), 128, np.uint8),
        rng.integers(0, 255, (240, 320, 3), np.uint8),
    ):
        result = pipeline.locate(img)
        assert result.status is FaceStatus.NO_FACE
        with pytest.raises(DataError, match=r"no face found in wall\.png"):
            result.require("wall.png", 40)


def test_two_people_is_an_error_unless_largest(
    small_models: tuple[FaceEmbedder, EmotionNet], yale_rgb: YaleRgb
) -> None:
    pair = np.hstack([yale_rgb(0, "normal"), yale_rgb(1, "normal")])
    strict = FacePipeline(*small_models)
    assert strict.locate(pair).status is FaceStatus.MULTIPLE_FACES
    with pytest.raises(DataError, match=r"2 faces found in pair\.jpg.*--largest"):
        strict.aligned_face(pair, "pair.jpg")
    largest = FacePipeline(*small_models, config=PipelineConfig(multi_face="largest"))
    assert largest.locate(pair).status is FaceStatus.OK


def test_tiny_face_is_too_small(pipeline: FacePipeline, yale_rgb: YaleRgb) -> None:
    small = cv2.resize(yale_rgb(2, "normal"), (72, 55), interpolation=cv2.INTER_AREA)
    result = pipeline.locate(small)
    assert result.status is FaceStatus.TOO_SMALL
    with pytest.raises(DataError, match="too small"):
        result.require("tiny.jpg", 40)


def test_min_face_below_16_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        PipelineConfig(min_face=8)


def test_missing_yunet_model_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--detector-model"):
        YuNetDetector(tmp_path / "nope.onnx")


# ---------------------------------------------------------------------- embedding and emotion
def test_embedding_is_a_unit_vector_and_deterministic(
    pipeline: FacePipeline, yale_rgb: YaleRgb
) -> None:
    image = yale_rgb(3, "normal")
    a, b = pipeline.embed(image), pipeline.embed(image)
    assert a.shape == (128,) and a.dtype == np.float32
    assert abs(np.linalg.norm(a) - 1) < 1e-5
    np.testing.assert_array_equal(a, b)


def test_template_is_the_renormalised_mean(pipeline: FacePipeline, yale_rgb: YaleRgb) -> None:
    images = [yale_rgb(4, c) for c in ("normal", "happy", "glasses")]
    each = np.stack([pipeline.embed(img) for img in images])
    mean = each.mean(axis=0)
    np.testing.assert_allclose(
        pipeline.template(images, ["a", "b", "c"]), mean / np.linalg.norm(mean), atol=1e-5
    )


def test_template_of_no_images_is_refused(pipeline: FacePipeline) -> None:
    with pytest.raises(DataError, match="at least one photo"):
        pipeline.template([], [])


def test_emotion_gives_one_of_seven_labels(pipeline: FacePipeline, yale_rgb: YaleRgb) -> None:
    result = pipeline.emotion(yale_rgb(5, "happy"))
    assert result.label in emotion_names() and len(result.probabilities) == 7
    assert abs(sum(result.probabilities.values()) - 1) < 1e-2


@torch.no_grad()
def test_emotion_averages_the_probabilities_of_the_face_and_its_mirror_image(
    pipeline: FacePipeline, yale_rgb: YaleRgb
) -> None:
    photo = yale_rgb(5, "happy")
    net = pipeline.emotion_net
    assert net is not None and not pipeline.chips
    x = emotion_tensor(pipeline.aligned_face(photo, "photo")[EMOTION_CROP][None])
    alone = net(x).softmax(1)[0].numpy()
    expected = (alone + net(x.flip(-1)).softmax(1)[0].numpy()) / 2
    assert np.abs(alone - expected).max() > 1e-3  # else the test could not tell them apart

    result = pipeline.emotion(photo)

    assert np.allclose(list(result.probabilities.values()), expected, atol=1e-4)
    assert result.index == int(np.argmax(expected))


def test_model_tag_changes_with_the_weights(small_models: tuple[FaceEmbedder, EmotionNet]) -> None:
    other = FaceEmbedder(width=8)
    assert FacePipeline(small_models[0]).model_tag != FacePipeline(other).model_tag


def test_load_pipeline_reads_a_real_checkpoint(checkpoint: Path, yale_rgb: YaleRgb) -> None:
    loaded, meta = load_pipeline(checkpoint)
    assert meta["round"] == 0
    assert isinstance(loaded.detector, HaarDetector)
    assert loaded.embed(yale_rgb(6, "normal")).shape == (128,)


# ---------------------------------------------------------------------- calibration
def test_calibrated_threshold_never_exceeds_the_target_far() -> None:
    rng = np.random.default_rng(0)
    same = np.repeat([True, False], 1500)
    scores = np.where(same, rng.normal(0.6, 0.1, 3000), rng.normal(0.1, 0.1, 3000))
    folds = np.tile(np.arange(5), 600)
    cal = calibrate(scores, same, folds, far=1e-2, model_tag="t")
    assert np.mean(scores[~same] > cal.threshold) <= 1e-2
    assert (
        cal.tar is not None and 0.9 < cal.tar <= 1.0 and cal.n_impostor == 1500 and cal.n_folds == 5
    )
    assert "FAR 0.01" in cal.describe()


def test_a_gray_photo_is_gray_whatever_its_file_format(yale_rgb: YaleRgb) -> None:
    # colour faces: test_acceptance.py::test_lfw_colour_photos_are_decided_as_colour
    gray = yale_rgb(1, "happy")[:, :, 0]
    jpeg = {
        n: cv2.imencode(".jpg", img)[1].tobytes()
        for n, img in (("1ch", gray), ("3ch", cv2.cvtColor(gray, cv2.COLOR_GRAY2BGR)))
    }

    assert is_gray(decode_image(jpeg["1ch"], name="1ch"))  # a 1-channel file
    assert is_gray(decode_image(jpeg["3ch"], name="3ch"))  # gray content in 3 channels


def test_a_few_coloured_pixels_do_not_make_a_gray_face_colour(yale_rgb: YaleRgb) -> None:
    face = yale_rgb(1, "happy")[:150, :150].copy()
    face[::15, ::15] = (255, 0, 0)  # 100 red pixels: the colour threshold is laxer for gray faces

    assert is_gray(face)


def test_a_coloured_frame_inside_the_aligned_face_does_not_make_it_colour(
    yale_rgb: YaleRgb,
) -> None:
    # attack: a tight photo in a wide red frame puts the frame inside the 150x150 chip
    face = yale_rgb(1, "happy")[40:190, 85:235].copy()
    face[:25], face[-25:], face[:, :25], face[:, -25:] = (
        (255, 0, 0),
        (255, 0, 0),
        (255, 0, 0),
        (255, 0, 0),
    )

    assert is_gray(face)


def test_a_tinted_or_sepia_gray_face_is_still_gray(yale_rgb: YaleRgb) -> None:
    # attack: a faint cast (a warm scan, a camera's white balance) must not buy the colour threshold
    gray = yale_rgb(1, "happy")[:150, :150].astype(np.float32)
    tint = gray + np.array([3.0, 0.0, 0.0])
    sepia = gray[..., :1] * np.array([1.0, 0.8, 0.6]) + np.array([20.0, 10.0, 0.0])

    assert is_gray(np.clip(tint, 0, 255).astype(np.uint8))
    assert is_gray(np.clip(sepia, 0, 255).astype(np.uint8))


def test_a_gray_probe_is_decided_by_the_gray_calibration() -> None:
    colour = Calibration.manual(0.5, "t")
    both = Calibration(**{**colour.to_dict(), "gray": Calibration.manual(0.6, "t")})

    assert both.for_probe(gray=True).threshold == 0.6
    assert both.for_probe(gray=False).threshold == 0.5
    assert colour.for_probe(gray=True) is colour  # no gray calibration: the only one there is
    assert Calibration.from_dict(both.to_dict()) == both


def test_far_too_small_for_the_number_of_impostors_is_refused() -> None:
    same = np.repeat([True, False], 100)
    with pytest.raises(ConfigError, match="cannot calibrate at FAR"):
        calibrate(np.linspace(0, 1, 200), same, np.tile(np.arange(2), 100), far=1e-3, model_tag="t")


# ---------------------------------------------------------------------- with a trained model
@pytest.mark.slow  # calibrates on every pair of the held-out LFW people sets 4-5
def test_same_person_matches_and_different_person_is_rejected(
    trained_checkpoint: Path, yale_rgb: YaleRgb
) -> None:
    from client.recogniser.calibration import calibrate_on_lfw

    pipe, _ = load_pipeline(trained_checkpoint)
    # the shipped model's operating point: FAR 1e-4 on the people sets facefed never trains on
    cal = calibrate_on_lfw(pipe.embed_faces, model_tag=pipe.model_tag, far=1e-4, lfw_sets=(4, 5))
    accepted = rejected = 0
    for subject in range(15):
        template = pipe.template(
            [yale_rgb(subject, c) for c in ("normal", "noglasses")], ["normal", "noglasses"]
        )
        same = float(pipe.embed(yale_rgb(subject, "happy")) @ template)
        other = float(pipe.embed(yale_rgb((subject + 1) % 15, "happy")) @ template)
        accepted += same > cal.threshold
        rejected += other <= cal.threshold
    assert accepted >= 11 and rejected >= 13, (accepted, rejected, cal.describe())


# ---------------------------------------------------------------------- dlib chip models
@pytest.fixture(scope="module")
def chip_embedder() -> ChipEmbedder:
    """dlib's architecture with seeded random weights (plumbing only)."""
    torch.manual_seed(0)
    return ChipEmbedder(*DlibResNet().split(2)).eval()


@pytest.mark.skipif(not YUNET.is_file(), reason="YuNet model not in ../shared/data")
def test_chip_model_aligns_onto_the_chip_template_and_embeds(
    chip_embedder: ChipEmbedder,
    small_models: tuple[FaceEmbedder, EmotionNet],
    yale: dict[str, np.ndarray],
) -> None:
    detector = YuNetDetector(YUNET)
    pipe = FacePipeline(chip_embedder, small_models[1], detector=detector)
    assert pipe.chips and isinstance(pipe.aligner, ChipAligner)
    for gray in yale["images"][::40]:
        result = pipe.locate(gray)  # a gray photo is taken as RGB
        assert result.status is FaceStatus.OK and result.method == "landmarks5"
        assert result.face is not None and result.face.shape == (CHIP_SIZE, CHIP_SIZE, 3)
        assert result.detection is not None and result.detection.landmarks is not None
        # the landmarks are detected again on an upright, upscaled view before the chip is cut
        refined = refine_landmarks(gray, result.detection.landmarks, detector.central_landmarks)
        assert not np.allclose(refined, result.detection.landmarks)
        np.testing.assert_array_equal(result.face, align_chip(gray, refined))
    image = gray_to_rgb(yale["images"][0])
    a = pipe.embed(image)
    assert a.shape == (128,) and abs(np.linalg.norm(a) - 1) < 1e-5
    chip = pipe.aligned_face(image)
    with torch.inference_mode():
        x = chip_tensor(np.stack([chip, chip[:, ::-1]]))
        both = chip_embedder(x).sum(dim=0)
    np.testing.assert_allclose(a, (both / both.norm()).numpy(), atol=1e-5)  # flip TTA
    emotion = pipe.emotion(image)
    assert emotion.label in emotion_names()


def test_chip_model_with_haar_aligns_by_the_eyes(
    chip_embedder: ChipEmbedder, yale: dict[str, np.ndarray]
) -> None:
    pipe = FacePipeline(chip_embedder, detector=HaarDetector())
    results = [pipe.locate(gray_to_rgb(img)) for img in yale["images"][::12]]
    ok = [r for r in results if r.status is FaceStatus.OK]
    assert len(ok) >= 0.9 * len(results)
    assert all(r.face is not None and r.face.shape == (CHIP_SIZE, CHIP_SIZE, 3) for r in ok)
    assert any(r.method == "eyes" for r in ok)


def test_chip_model_tiny_face_is_too_small(chip_embedder: ChipEmbedder, yale_rgb: YaleRgb) -> None:
    pipe = FacePipeline(chip_embedder, detector=HaarDetector())
    small = cv2.resize(yale_rgb(2, "normal"), (72, 55), interpolation=cv2.INTER_AREA)
    with pytest.raises(DataError, match="too small"):
        pipe.aligned_face(small, "tiny.jpg")


def test_emotion_crop_frames_the_chip_like_fer2013() -> None:
    chip = np.zeros((CHIP_SIZE, CHIP_SIZE, 3), np.uint8)
    chip[:, :, 0] = np.arange(CHIP_SIZE, dtype=np.uint8)[:, None]  # row index
    crop = emotion_crop_of_chip(chip)
    _, top, side = EMOTION_CHIP_BOX
    assert crop.shape == (round(side), round(side), 3)
    # row r of the crop is chip row r + top (clamped at the chip's top edge)
    assert crop[40, 0, 0] == round(40 + top) and crop[0, 0, 0] == 0


@pytest.mark.skipif(not YUNET.is_file(), reason="YuNet model not in ../shared/data")
def test_yunet_is_the_default_detector_of_chip_models_when_found(
    chip_embedder: ChipEmbedder,
    small_models: tuple[FaceEmbedder, EmotionNet],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.delenv(YUNET_ENV, raising=False)
    monkeypatch.setenv("FACEFED_DATA", str(YUNET.parent))
    assert isinstance(FacePipeline(chip_embedder).detector, YuNetDetector)
    assert isinstance(FacePipeline(small_models[0]).detector, HaarDetector)  # old models: unchanged
    monkeypatch.setenv("FACEFED_DATA", str(tmp_path))  # a data dir without YuNet: Haar
    assert isinstance(default_detector(), HaarDetector)
    monkeypatch.setenv(YUNET_ENV, str(YUNET))
    assert isinstance(default_detector(), YuNetDetector)
    monkeypatch.setenv(YUNET_ENV, str(tmp_path / "missing.onnx"))
    with pytest.raises(ConfigError, match=r"missing\.onnx not found"):
        default_detector()
