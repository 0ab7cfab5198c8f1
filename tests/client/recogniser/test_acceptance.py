"""Acceptance: the shipped public model on real, uncropped photos of people it never trained on.

The model is ``models/facefed-face-v4.ckpt`` (dlib's pretrained face network, the start of every
federated run) with the threshold shipped beside it (``models/facefed-face-v4.calibration.json``:
``facefed site calibrate --far 1e-4 --lfw-sets 4,5``, i.e. FAR 1e-4 over all ~1.36M different-person
pairs of LFW people sets 4-5). Photos go through the default on-device pipeline (YuNet detection and
5 landmarks, alignment onto dlib's 150x150 chip, flip-augmented embedding), templates through the encrypted template store, and every decision uses the shipped
threshold exactly as ``facefed site verify`` does (a match is a cosine score strictly above it). Yale's
photos are gray, so that is the threshold calibrated on the same LFW pairs in gray
(:meth:`Calibration.for_probe`).

The people are the 15 subjects of Yale Faces (``yalefaces_243x320.npz``), which no facefed model trains
on. Each is enrolled from the photos :data:`ENROL` and probed with the photos :data:`PROBES` (normal
lighting; expressions, a wink, glasses): 90 genuine and 1,260 impostor comparisons. The bounds were
fixed before the shipped model was measured (raised for v3 by issue #15, from 0.85 / 0.95); an
untrained network fails them at every threshold.
What the shipped model measures against them, and its limits: ``models/README.md``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from client.recogniser.calibration import Calibration, calibrate_on_lfw, is_gray
from client.recogniser.imageio import decode_image
from client.recogniser.pipeline import FacePipeline, load_pipeline
from client.recogniser.site_cli import calibration_file
from client.recogniser.templates import TemplateStore
from common.cli import main
from common.crypto import keys
from common.data.lfw import archive_pair_photos, load_lfw, photo_member
from common.errors import ConfigError
from common.models import FaceEmbedder
from tests.client.conftest import LFW, SHIPPED_MODEL, site_cli_env

YaleRgb = Callable[[int, str], np.ndarray]
WriteImage = Callable[[Path, np.ndarray], Path]
Cap = pytest.CaptureFixture[str]
Faces = dict[tuple[int, str], np.ndarray]

FAR = 1e-4  # the LFW false-accept rate the shipped threshold is calibrated for
ENROL = ("normal", "noglasses", "centerlight")  # subject 0 has no centerlight photo: 2 photos
PROBES = ("happy", "sad", "sleepy", "surprised", "wink", "glasses")
MIN_GENUINE_ACCEPTED = 0.97  # of the 90 genuine Yale comparisons
MIN_IMPOSTORS_REJECTED = 0.99  # of the 1,260 impostor Yale comparisons
MIN_RANK1 = 0.90  # a probe's best template is its own person's (15 candidates; chance 1/15)
LFW_SETS = (4, 5)  # held out from training; the first pairs of each, in pairs-file order
LFW_PAIRS_PER_KIND = 20  # per set: 20 same-person and 20 different-person pairs, as JPEG photos
MIN_LFW_AUC = 0.80  # P(a same-person pair outscores a different-person pair); chance 0.5


# ---------------------------------------------------------------------- shared measurements
@pytest.fixture(scope="module")
def shipped() -> tuple[FacePipeline, Calibration]:
    """The shipped model in the default pipeline, and the calibration shipped next to it."""
    assert SHIPPED_MODEL.is_file(), f"the shipped model {SHIPPED_MODEL} is missing"
    pipeline, _ = load_pipeline(SHIPPED_MODEL)
    cal = Calibration.from_dict(json.loads(calibration_file(SHIPPED_MODEL).read_text()))
    return pipeline, cal


@pytest.fixture(scope="module")
def yale_faces(shipped: tuple[FacePipeline, Calibration], yale: dict[str, np.ndarray]) -> Faces:
    """Every enrolment and probe photo, detected and aligned by the shipped pipeline."""
    pipeline = shipped[0]
    out: Faces = {}
    for gray, subject, condition in zip(
        yale["images"], yale["identity"], yale["condition"], strict=True
    ):
        if condition in ENROL + PROBES:
            rgb = np.repeat(gray[:, :, None], 3, axis=2)
            out[int(subject), str(condition)] = pipeline.aligned_face(rgb, f"{subject}-{condition}")
    return out


def _embed(pipeline: FacePipeline, faces: Faces) -> dict[tuple[int, str], np.ndarray]:
    order = sorted(faces)
    return dict(zip(order, pipeline.embed_faces(np.stack([faces[k] for k in order])), strict=True))


def _templates(emb: dict[tuple[int, str], np.ndarray]) -> dict[int, np.ndarray]:
    """Each subject's enrolment template, made as :meth:`FacePipeline.template` makes it."""
    out = {}
    for subject in sorted({s for s, _ in emb}):
        mean = np.mean([emb[subject, c] for c in ENROL if (subject, c) in emb], axis=0)
        out[subject] = (mean / np.linalg.norm(mean)).astype(np.float32)
    return out


@dataclass(frozen=True)
class YaleScores:
    genuine: np.ndarray  # probe vs own template
    impostor: np.ndarray  # probe vs each other person's template
    rank1: float  # fraction of probes whose own template scores highest

    def rates(self, threshold: float) -> tuple[float, float]:
        """(genuine accepted, impostors rejected) at ``threshold``."""
        return float(np.mean(self.genuine > threshold)), float(np.mean(self.impostor <= threshold))


def _score(emb: dict[tuple[int, str], np.ndarray], templates: dict[int, np.ndarray]) -> YaleScores:
    genuine: list[float] = []
    impostor: list[float] = []
    hits = 0
    for (subject, condition), probe in sorted(emb.items()):
        if condition in PROBES:
            scores = {other: float(t @ probe) for other, t in templates.items()}
            genuine.append(scores.pop(subject))
            impostor.extend(scores.values())
            hits += genuine[-1] > max(scores.values())
    return YaleScores(np.array(genuine), np.array(impostor), hits / len(genuine))


@pytest.fixture(scope="module")
def yale_scores(
    shipped: tuple[FacePipeline, Calibration],
    yale_faces: Faces,
    tmp_path_factory: pytest.TempPathFactory,
) -> YaleScores:
    """All 15 subjects enrolled in an encrypted store, every probe scored against every template."""
    pipeline = shipped[0]
    emb = _embed(pipeline, yale_faces)
    root = tmp_path_factory.mktemp("acceptance")
    with TemplateStore.create(root / "store", keys.new_key_file(root / "site.key"), dim=128) as st:
        for subject, template in _templates(emb).items():
            n = sum((subject, c) in emb for c in ENROL)
            st.enroll(f"yale-{subject}", template, model_tag=pipeline.model_tag, n_images=n)
        stored = {int(t.identity.split("-")[1]): t.embedding for t in st.iter_templates()}
    scores = _score(emb, stored)
    assert len(stored) == 15 and len(scores.genuine) == 90 and len(scores.impostor) == 90 * 14
    return scores


def _report(scores: YaleScores, cal: Calibration) -> str:
    accepted, rejected = scores.rates(cal.for_probe(gray=True).threshold)
    return (
        f"Yale at {cal.describe()}: genuine accepted {accepted:.3f}, impostors rejected "
        f"{rejected:.3f}, rank-1 {scores.rank1:.3f}"
    )


# ---------------------------------------------------------------------- the shipped artefacts
def test_shipped_calibration_is_for_the_shipped_model_on_held_out_lfw(
    shipped: tuple[FacePipeline, Calibration],
) -> None:
    pipeline, cal = shipped
    assert cal.model_tag == pipeline.model_tag
    assert cal.far == FAR and cal.n_folds == 2
    assert cal.n_impostor * FAR >= 100  # the FAR is measured on 100+ impostor pairs, not 1
    assert cal.source == "LFW all pairs within people sets 4,5"  # never-trained identities only
    gray = cal.for_probe(gray=True)  # the same pairs in gray, for gray probes
    assert gray is cal.gray and gray.source == f"{cal.source}, in gray"
    assert (gray.far, gray.n_genuine, gray.n_impostor) == (FAR, cal.n_genuine, cal.n_impostor)
    assert gray.model_tag == cal.model_tag and cal.for_probe(gray=False) is cal


# ---------------------------------------------------------------------- through the real CLI
@pytest.fixture
def cli_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Store and key folders under tmp, the shipped model; no `site calibrate` is ever run."""
    return site_cli_env(tmp_path, monkeypatch, SHIPPED_MODEL)


def site(capsys: Cap, *argv: str) -> tuple[int, str, str]:
    code = main(["site", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def cli_enrolled(
    cli_env: Path, yale_rgb: YaleRgb, write_image: WriteImage, capsys: Cap
) -> dict[str, Path]:
    """Yale subject 1 enrolled as ``s1`` from 3 uncropped JPEGs; unseen probes of 1 and 2."""
    photos = {
        name: write_image(cli_env / f"{name}.jpg", yale_rgb(subject, condition))
        for name, subject, condition in [(f"1-{c}", 1, c) for c in ENROL]
        + [("1-happy", 1, "happy"), ("2-happy", 2, "happy")]
    }
    assert site(capsys, "init")[0] == 0
    code, out, err = site(capsys, "enroll", "--id", "s1", *(str(photos[f"1-{c}"]) for c in ENROL))
    assert code == 0 and out.startswith("enrolled s1 from 3 image(s)"), err
    return photos


def test_cli_verifies_an_enrolled_person_on_a_new_photo_at_the_shipped_far(
    cli_enrolled: dict[str, Path], capsys: Cap
) -> None:
    code, out, err = site(capsys, "verify", "--id", "s1", str(cli_enrolled["1-happy"]))
    assert code == 0 and out.startswith("MATCH: s1 score ") and f"FAR {FAR:g}" in out, out + err
    assert "sets 4,5, in gray" in out  # a gray photo is decided by the gray calibration


def test_a_colourful_frame_around_a_gray_face_does_not_buy_the_colour_threshold(
    cli_enrolled: dict[str, Path],
    cli_env: Path,
    yale_rgb: YaleRgb,
    write_image: WriteImage,
    capsys: Cap,
) -> None:
    # attack: the colour threshold is laxer for gray faces, so frame a gray photo in colour
    gray = yale_rgb(1, "happy")
    h, w = gray.shape[0] + 200, gray.shape[1] + 200
    ramp = np.linspace(0, 255, w, dtype=np.float32)[None, :].repeat(h, axis=0)
    frame = np.stack([ramp, 255 - ramp, np.full_like(ramp, 64)], axis=2).astype(np.uint8)
    frame[100:-100, 100:-100] = gray
    photo = write_image(cli_env / "framed.jpg", frame)

    code, out, err = site(capsys, "verify", "--json", "--id", "s1", str(photo))

    result = json.loads(out)
    assert code == 0 and result["match"], out + err
    assert result["calibration"]["source"].endswith(", in gray")  # decided on the aligned face


def test_cli_rejects_a_different_person_at_the_shipped_far(
    cli_enrolled: dict[str, Path], capsys: Cap
) -> None:
    code, out, err = site(capsys, "verify", "--id", "s1", str(cli_enrolled["2-happy"]))
    assert code == 1 and out.startswith("NO MATCH: s1 score "), out + err


def test_a_real_photo_without_a_face_is_one_clean_line(
    cli_env: Path, yale_rgb: YaleRgb, write_image: WriteImage, capsys: Cap
) -> None:
    # the wall and the top of the head in a Yale photo: a real camera image with no face in it
    top = write_image(cli_env / "no-face.jpg", yale_rgb(0, "normal")[:80])
    assert site(capsys, "init")[0] == 0
    code, out, err = site(capsys, "enroll", "--id", "s0", str(top))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("facefed: error: no face found in ") and "Traceback" not in err


# ---------------------------------------------------------------------- all 15 Yale subjects
def test_every_yale_person_is_accepted_on_new_photos(
    shipped: tuple[FacePipeline, Calibration], yale_scores: YaleScores
) -> None:
    accepted, _ = yale_scores.rates(shipped[1].for_probe(gray=True).threshold)
    assert accepted >= MIN_GENUINE_ACCEPTED, _report(yale_scores, shipped[1])


def test_other_yale_people_are_rejected(
    shipped: tuple[FacePipeline, Calibration], yale_scores: YaleScores
) -> None:
    _, rejected = yale_scores.rates(shipped[1].for_probe(gray=True).threshold)
    assert rejected >= MIN_IMPOSTORS_REJECTED, _report(yale_scores, shipped[1])


def test_yale_probes_identify_their_own_person(
    shipped: tuple[FacePipeline, Calibration], yale_scores: YaleScores
) -> None:
    assert yale_scores.rank1 >= MIN_RANK1, _report(yale_scores, shipped[1])


def test_an_untrained_network_fails_the_same_bounds_at_every_threshold(
    yale_faces: Faces,
) -> None:
    torch.manual_seed(0)
    emb = _embed(FacePipeline(FaceEmbedder(width=16)), yale_faces)
    scores = _score(emb, _templates(emb))
    for threshold in np.concatenate([scores.genuine, scores.impostor, [-1.0, 1.0]]):
        accepted, rejected = scores.rates(float(threshold))
        assert not (accepted >= MIN_GENUINE_ACCEPTED and rejected >= MIN_IMPOSTORS_REJECTED)
    assert scores.rank1 < MIN_RANK1


# ---------------------------------------------------------------------- LFW photos
@pytest.fixture(scope="module")
def lfw_pair_scores(
    shipped: tuple[FacePipeline, Calibration],
) -> tuple[np.ndarray, np.ndarray, int]:
    """Scores of the first pairs of each held-out set, from the JPEGs through the whole pipeline.

    Returns ``(scores, same, missed)``; a pair with a photo where no face is found scores -1 (no
    match), and ``missed`` counts such photos.
    """
    if not LFW.is_file():
        pytest.skip(f"{LFW} not available")
    pipeline = shipped[0]
    chosen, jpegs = archive_pair_photos(
        LFW,
        lambda pairs: [
            p
            for s in LFW_SETS
            for same in (True, False)
            for p in [p for p in pairs if p.fold == s - 1 and p.same == same][:LFW_PAIRS_PER_KIND]
        ],
    )
    files = [photo_member(n, i) for p in chosen for n, i in ((p.name1, p.num1), (p.name2, p.num2))]
    photos = {name: decode_image(data, name=name) for name, data in jpegs.items()}
    found = [pipeline.locate(photos[name]) for name in files]
    side = 150 if pipeline.chips else 112
    faces = [np.zeros((side, side, 3), np.uint8) if r.face is None else r.face for r in found]
    emb = pipeline.embed_faces(np.stack(faces))
    ok = np.array([r.face is not None for r in found])
    scores = np.where(ok[0::2] & ok[1::2], np.sum(emb[0::2] * emb[1::2], axis=1), -1.0)
    return scores, np.array([p.same for p in chosen]), int((~ok).sum())


def test_lfw_photos_same_person_accepted_different_person_rejected(
    shipped: tuple[FacePipeline, Calibration], lfw_pair_scores: tuple[np.ndarray, np.ndarray, int]
) -> None:
    cal = shipped[1]
    scores, same, missed = lfw_pair_scores
    n = LFW_PAIRS_PER_KIND * len(LFW_SETS)
    accepted = int(np.sum(scores[same] > cal.threshold))
    false_accepts = int(np.sum(scores[~same] > cal.threshold))
    report = f"{accepted}/{n} same and {false_accepts}/{n} different accepted, {missed} missed"
    assert missed <= 2, report  # YuNet finds every LFW face, Haar ~99%
    assert false_accepts <= 2, report  # FAR 1e-4: 0.004 expected of 40
    # at least the calibration's held-out TAR (the threshold of one people set applied to the other,
    # an estimate for pairs the threshold was not chosen on) less two binomial SDs
    tar = cal.heldout_tar
    assert tar is not None
    assert accepted >= n * tar - 2 * np.sqrt(n * tar * (1 - tar)), report


def test_lfw_photos_same_person_pairs_outscore_different_person_pairs(
    lfw_pair_scores: tuple[np.ndarray, np.ndarray, int],
) -> None:
    scores, same, _ = lfw_pair_scores
    auc = float(np.mean(scores[same][:, None] > scores[~same][None, :]))
    assert auc >= MIN_LFW_AUC, auc


# ---------------------------------------------------------------------- how the shipped threshold is found
def test_calibration_on_held_out_lfw_sets_uses_only_their_pairs() -> None:
    def embed(faces: np.ndarray) -> np.ndarray:  # the scores do not matter here, only the pairs
        v = np.random.default_rng(0).normal(size=(len(faces), 8))
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    lfw = load_lfw()
    genuine = impostor = 0
    for s in (4, 5):  # every pair of images within a people set, counted from the people file
        names = set(lfw.people_sets[s - 1])
        per_person = np.bincount(
            [i for i in lfw.identity if lfw.names[i] in names], minlength=len(lfw.names)
        )
        n = int(per_person.sum())
        same = int(np.sum(per_person * (per_person - 1) // 2))
        genuine, impostor = genuine + same, impostor + n * (n - 1) // 2 - same

    cal = calibrate_on_lfw(embed, model_tag="t", far=FAR, lfw_sets=(5, 4))
    assert (cal.n_genuine, cal.n_impostor, cal.n_folds) == (genuine, impostor, 2)
    assert impostor > 1_000_000 and cal.source.endswith("all pairs within people sets 4,5")
    with pytest.raises(ConfigError, match="choose a FAR"):
        calibrate_on_lfw(embed, model_tag="t", far=1e-7, lfw_sets=(4, 5))  # < 1 impostor pair

    view2 = calibrate_on_lfw(embed, model_tag="t", far=1e-2, lfw_sets=(5, 4), protocol="view2")
    assert (view2.n_genuine, view2.n_impostor, view2.n_folds) == (600, 600, 2)
    assert view2.source.endswith("View 2 folds of people sets 4,5")
    with pytest.raises(ConfigError, match="choose a FAR"):  # < 1 of 600 impostors
        calibrate_on_lfw(embed, model_tag="t", far=FAR, lfw_sets=(4, 5), protocol="view2")


def test_a_calibration_file_of_another_model_is_refused(
    cli_env: Path, yale_rgb: YaleRgb, write_image: WriteImage, capsys: Cap
) -> None:
    model = cli_env / "model.ckpt"
    shutil.copyfile(SHIPPED_MODEL, model)
    stale = json.loads(calibration_file(SHIPPED_MODEL).read_text()) | {"model_tag": "0123abcd"}
    calibration_file(model).write_text(json.dumps(stale))
    photo = write_image(cli_env / "s1.jpg", yale_rgb(1, "normal"))
    assert site(capsys, "init")[0] == 0
    assert site(capsys, "enroll", "--checkpoint", str(model), "--id", "s1", str(photo))[0] == 0
    code, out, err = site(capsys, "verify", "--checkpoint", str(model), "--id", "s1", str(photo))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert "is for model 0123abcd" in err and "facefed site calibrate" in err
    code, _, err = site(capsys, "calibrate", "--checkpoint", str(model), "--lfw-sets", "4,9")
    assert code == 2 and err.count("\n") == 1 and "--lfw-sets" in err


@pytest.mark.parametrize(
    "edit",
    [
        lambda cal: cal | {"gray": [0.4]},
        lambda cal: cal | {"gray": cal["gray"] | {"threshold": -1.5}},
        lambda cal: cal | {"threshold": 7.5},
        lambda cal: [cal],
        lambda cal: '{"gray": ' * 5000 + "{}" + "}" * 5000,  # deeper than the JSON decoder goes
    ],
    ids=["gray-list", "gray-out-of-range", "threshold-out-of-range", "not-an-object", "deep"],
)
def test_a_malformed_calibration_file_is_one_line_and_decides_nothing(
    cli_env: Path, yale_rgb: YaleRgb, write_image: WriteImage, capsys: Cap, edit: Any
) -> None:
    model = cli_env / "model.ckpt"
    shutil.copyfile(SHIPPED_MODEL, model)
    edited = edit(json.loads(calibration_file(SHIPPED_MODEL).read_text()))
    calibration_file(model).write_text(edited if isinstance(edited, str) else json.dumps(edited))
    photo = write_image(cli_env / "s1.jpg", yale_rgb(1, "normal"))
    assert site(capsys, "init")[0] == 0
    assert site(capsys, "enroll", "--checkpoint", str(model), "--id", "s1", str(photo))[0] == 0

    code, out, err = site(capsys, "verify", "--checkpoint", str(model), "--id", "s1", str(photo))

    assert code == 2 and out == "" and err.count("\n") == 1, out + err
    assert f"calibration file {calibration_file(model)}" in err and "Traceback" not in err


def test_a_gray_probe_is_refused_by_a_calibration_without_a_gray_threshold(
    cli_env: Path, yale_rgb: YaleRgb, write_image: WriteImage, capsys: Cap
) -> None:
    # a calibration made before gray thresholds: its colour FAR does not hold for a gray face
    model = cli_env / "model.ckpt"
    shutil.copyfile(SHIPPED_MODEL, model)
    old = json.loads(calibration_file(SHIPPED_MODEL).read_text())
    del old["gray"]
    calibration_file(model).write_text(json.dumps(old))
    photo = write_image(cli_env / "s1.jpg", yale_rgb(1, "normal"))
    assert site(capsys, "init")[0] == 0
    assert site(capsys, "enroll", "--checkpoint", str(model), "--id", "s1", str(photo))[0] == 0

    code, out, err = site(capsys, "verify", "--checkpoint", str(model), "--id", "s1", str(photo))

    assert code == 2 and out == "" and err.count("\n") == 1, out + err
    assert "no gray threshold" in err and "facefed site calibrate" in err


def test_lfw_colour_photos_are_decided_as_colour(shipped: tuple[FacePipeline, Calibration]) -> None:
    if not LFW.is_file():
        pytest.skip(f"{LFW} not available")
    pipeline = shipped[0]
    chosen, jpegs = archive_pair_photos(LFW, lambda pairs: [p for p in pairs if p.fold == 3][:10])
    files = [photo_member(n, i) for p in chosen for n, i in ((p.name1, p.num1), (p.name2, p.num2))]
    faces = [pipeline.aligned_face(decode_image(jpegs[f], name=f), f) for f in files]

    colour = sum(not is_gray(face) for face in faces)

    assert colour >= 0.9 * len(faces), f"{colour} of {len(faces)} LFW faces decided as colour"
