"""The federated networks are valid under Opacus and produce what their callers expect."""

import pytest
import torch
from opacus.validators import ModuleValidator

from common.models import (
    EMBEDDING_DIM,
    NUM_EMOTIONS,
    CosineHead,
    EmotionNet,
    FaceEmbedder,
    FaceTrainer,
    cosface_loss,
)


@pytest.mark.parametrize(
    "model",
    [
        FaceEmbedder(),
        FaceEmbedder(width=32),
        EmotionNet(),
        EmotionNet(width=32),
        FaceTrainer(FaceEmbedder(), CosineHead(10)),
    ],
    ids=["face16", "face32", "emotion16", "emotion32", "face-trainer"],
)
def test_every_model_passes_opacus_strict_validation(model: torch.nn.Module) -> None:
    ModuleValidator.validate(model, strict=True)  # raises on BatchNorm or unsupported layers


def test_batchnorm_would_be_rejected_so_the_validation_test_can_fail() -> None:
    bad = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    with pytest.raises(Exception, match="BatchNorm"):
        ModuleValidator.validate(bad, strict=True)


def test_face_embeddings_are_unit_vectors_of_the_declared_size() -> None:
    emb = FaceEmbedder()(torch.randn(3, 1, 112, 112))
    assert emb.shape == (3, EMBEDDING_DIM)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(3))


def test_emotion_net_returns_seven_logits() -> None:
    assert EmotionNet()(torch.randn(2, 1, 48, 48)).shape == (2, NUM_EMOTIONS)


def test_cosface_margin_penalises_the_true_class() -> None:
    cosine = torch.tensor([[0.9, 0.1], [0.2, 0.8]])
    labels = torch.tensor([0, 1])
    assert cosface_loss(cosine, labels, margin=0.3) > cosface_loss(cosine, labels, margin=0.0)


def test_head_needs_at_least_two_identities() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        CosineHead(1)
