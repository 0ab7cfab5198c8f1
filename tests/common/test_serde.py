"""Only the shared backbones travel; the local identity head never appears in a record."""

import pytest
import torch

from common.models import CosineHead, EmotionNet, FaceEmbedder
from common.serde import arrays_digest, from_arrays, manifest, to_arrays


def test_round_trip_is_exact() -> None:
    face, emotion = FaceEmbedder(), EmotionNet()
    face2, emotion2 = FaceEmbedder(), EmotionNet()
    from_arrays(to_arrays(face, emotion), face2, emotion2)
    for a, b in zip(face.state_dict().values(), face2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)


def test_records_carry_only_face_and_emotion_keys() -> None:
    keys = list(to_arrays(FaceEmbedder(), EmotionNet()).keys())
    assert keys and all(k.startswith(("face.", "emotion.")) for k in keys)
    head_shape = tuple(CosineHead(50).weight.shape)
    assert head_shape not in manifest(FaceEmbedder(), EmotionNet()).values()


def test_unexpected_keys_are_rejected() -> None:
    arrays = to_arrays(FaceEmbedder(), EmotionNet())
    state = arrays.to_torch_state_dict()
    state["head.weight"] = torch.zeros(3, 128)
    from flwr.app import ArrayRecord

    with pytest.raises(ValueError, match="unexpected keys"):
        from_arrays(ArrayRecord(torch_state_dict=state), FaceEmbedder(), EmotionNet())


def test_digest_changes_with_any_weight() -> None:
    face, emotion = FaceEmbedder(), EmotionNet()
    before = arrays_digest(to_arrays(face, emotion))
    with torch.no_grad():
        emotion.classifier.bias[0] += 1e-3
    assert arrays_digest(to_arrays(face, emotion)) != before
