"""Training augmentation: a random mirror for every batch, a random similarity move with face-augment."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from client.training.augment import Jitter, augment, flip, jitter
from client.training.dp_random import SeededRandomness
from client.training.privacy_state import SitePrivacyState
from client.training.train import SiteTensors, train_round
from common.config import parse_run_config
from common.data.orl import load_orl
from common.data.preprocess import face_tensor
from common.models import CosineHead, EmotionNet, FaceEmbedder


@functools.lru_cache(maxsize=1)
def orl_faces() -> torch.Tensor:
    """The first photo of 8 ORL people as the face model sees them: (8, 1, 112, 112)."""
    orl = load_orl()
    first = [int(np.flatnonzero(orl.labels == p)[0]) for p in range(8)]
    return face_tensor(orl.images[first])


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def correlation(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-example Pearson correlation of two (N, ...) batches."""
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_flip_mirrors_some_faces_and_leaves_the_others() -> None:
    x = orl_faces()
    out = flip(x, seeded())
    mirrored = torch.tensor([torch.equal(o, f.flip(-1)) for o, f in zip(out, x, strict=True)])
    kept = torch.tensor([torch.equal(o, f) for o, f in zip(out, x, strict=True)])
    assert torch.all(mirrored ^ kept) and mirrored.any() and kept.any()


def test_jitter_moves_each_face_by_its_own_amount_and_keeps_it_a_face() -> None:
    x = orl_faces()
    out = jitter(x, seeded())
    assert out.shape == x.shape and out.dtype == x.dtype and torch.isfinite(out).all()
    r = correlation(out, x)
    assert torch.all(r < 0.999)  # every face moved
    assert torch.all(r > 0.3)  # but is still the same picture, not noise
    assert len(torch.unique(torch.round(r, decimals=4))) == len(x)  # each by a different amount


def test_jitter_with_zero_ranges_is_the_identity() -> None:
    x = orl_faces()
    out = jitter(x, seeded(), Jitter(max_degrees=0, max_scale=0, max_shift=0))
    torch.testing.assert_close(out, x, atol=1e-4, rtol=0)


def test_a_pure_shift_moves_the_face_by_at_most_the_range() -> None:
    x = orl_faces()
    out = jitter(x, seeded(), Jitter(max_degrees=0, max_scale=0, max_shift=0.05))
    limit = 0.05 * x.shape[-1]  # 5.6 pixels
    # the best whole-pixel horizontal/vertical alignment of each output with its input is within range
    for o, f in zip(out, x, strict=True):
        best = max(
            ((dx, dy) for dx in range(-7, 8) for dy in range(-7, 8)),
            key=lambda d: float(
                correlation(
                    o[None, :, 10:-10, 10:-10], torch.roll(f, d, (-1, -2))[None, :, 10:-10, 10:-10]
                )[0]
            ),
        )
        assert max(abs(best[0]), abs(best[1])) <= limit + 1


def test_the_same_seed_gives_the_same_views_and_another_seed_other_views() -> None:
    x = orl_faces()
    assert torch.equal(augment(x, seeded(1), True), augment(x, seeded(1), True))
    assert not torch.equal(augment(x, seeded(1), True), augment(x, seeded(2), True))


def test_without_geometric_augmentation_only_the_mirror_is_drawn() -> None:
    x = orl_faces()
    assert torch.equal(augment(x, seeded(3), False), flip(x, seeded(3)))


def test_an_empty_batch_stays_empty() -> None:
    empty = orl_faces()[:0]
    assert jitter(empty, seeded()).shape == empty.shape


@pytest.mark.parametrize("ranges", [{"max_degrees": 90.0}, {"max_scale": 0.5}, {"max_shift": -0.1}])
def test_out_of_range_jitter_is_refused(ranges: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="jitter ranges"):
        Jitter(**ranges)


@pytest.mark.parametrize(("dp", "dp_path"), [(False, "fast"), (True, "fast"), (True, "opacus")])
def test_face_augment_changes_what_local_training_sees(dp: bool, dp_path: str) -> None:
    orl = load_orl()
    keep = orl.labels < 4
    site = SiteTensors(
        face_x=face_tensor(orl.images[keep]),
        face_y=torch.from_numpy(orl.labels[keep]),
        emotion_x=torch.zeros(0, 1, 48, 48),
        emotion_y=torch.zeros(0, dtype=torch.int64),
    )

    def loss(face_augment: bool) -> float:
        settings = parse_run_config(
            {
                "face-steps": 2,
                "emotion-steps": 0,
                "face-batch": 8,
                "dp": dp,
                "dp-path": dp_path,
                "face-augment": face_augment,
            }
        )
        torch.manual_seed(0)
        face = FaceEmbedder(width=8)
        head = CosineHead(4)
        outcome = train_round(
            face,
            head,
            EmotionNet(width=8),
            site,
            settings,
            SitePrivacyState("rdp", noise_multiplier=1.0),
            seeded(),
            SeededRandomness(seeded()),  # research: reproducible sampling and noise
        )
        return outcome.face_loss

    assert loss(True) != loss(False)
    assert loss(True) == loss(True)  # seeded: reproducible


@pytest.mark.parametrize("geometric", [None, False, True])
def test_a_batch_of_two_views_trains_on_one_of_each_examples_views(geometric: bool | None) -> None:
    # each example's map and its mirror image's map (ModelInputs.emotion_training): shapes only
    from client.training.train import _augmented

    views = torch.randn(64, 2, 3, 5, 5)

    picked = _augmented(views, seeded(), geometric)

    assert picked.shape == (64, 3, 5, 5)
    first = (picked == views[:, 0]).flatten(1).all(1)
    second = (picked == views[:, 1]).flatten(1).all(1)
    assert (first ^ second).all()  # exactly one view of every example, never a blend or a flip
    assert 16 < int(second.sum()) < 48  # both views are drawn, about half each


@pytest.mark.parametrize(("dp", "dp_path"), [(False, "fast"), (True, "fast"), (True, "opacus")])
def test_a_site_with_two_views_per_face_trains_and_accounts_one_unit_per_face(
    dp: bool, dp_path: str
) -> None:
    # the default emotion model's inputs: each face's map and its mirror image's, (N, 2, C, 5, 5)
    from common.data.fer2013 import load_fer2013
    from common.facenet.transfer import EmotionHead
    from common.features import ModelInputs
    from tests.specs import scatter_transfer

    orl = load_orl()
    keep = orl.labels < 4
    fer = load_fer2013("Training")
    spec = scatter_transfer()
    views = ModelInputs(spec, disk_cache=False).emotion_training(fer.images[:40])
    site = SiteTensors(
        face_x=face_tensor(orl.images[keep]),
        face_y=torch.from_numpy(orl.labels[keep]),
        emotion_x=views,
        emotion_y=torch.from_numpy(fer.labels[:40]).long(),
    )
    settings = parse_run_config(
        {"face-steps": 1, "emotion-steps": 3, "emotion-batch": 10, "dp": dp, "dp-path": dp_path}
    )
    torch.manual_seed(0)
    emotion = EmotionHead(145, 3, width=8)
    before = [p.detach().clone() for p in emotion.parameters()]

    outcome = train_round(
        FaceEmbedder(width=8),
        CosineHead(4),
        emotion,
        site,
        settings,
        SitePrivacyState("rdp", noise_multiplier=1.0),
        seeded(),
        SeededRandomness(seeded()),
    )

    assert views.shape == (40, 2, 145, 5, 5)
    assert math.isfinite(outcome.emotion_loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, emotion.parameters(), strict=True))
    if dp:  # 40 faces at batch 10: q = 1/4, not the 1/8 that 80 views would give
        (event,) = [e for e in outcome.events if e.name == "emotion"]
        assert event.sample_rate == pytest.approx(0.25) and event.steps == 3
