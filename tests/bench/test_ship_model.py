"""The shipped public checkpoint: dlib's own face network beside a public emotion model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.ship_model import main
from common.checkpoint import load_federated, load_models, save_checkpoint
from common.errors import IntegrityError
from common.facenet.transfer import EmotionTransfer
from common.facenet.weights import default_pretrained_path, load_pretrained
from common.model_spec import ModelSpec, state_sha256
from tests.specs import scatter_transfer

TRANSFER = scatter_transfer(face_model="pretrained")


@pytest.fixture(scope="module")
def network_sha() -> str:
    return state_sha256(load_pretrained(default_pretrained_path()))


def _run_checkpoint(
    path: Path, sha: str, named_sha: str | None = None
) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """A federated run's checkpoint: a fine-tuned face tail and a trained transfer head, naming
    the pretrained network ``named_sha`` (default: the one it was built on)."""
    spec = ModelSpec(**(TRANSFER.to_dict() | {"pretrained_sha256": sha}))
    face, head = spec.initial(seed=1)
    with torch.no_grad():
        for p in face.parameters():
            p.add_(1.0)  # not dlib's own embedding layer any more
    named = ModelSpec(**(spec.to_dict() | {"pretrained_sha256": named_sha or sha}))
    return save_checkpoint(path, face, head, named, 3), face, head


def test_a_transfer_head_ships_beside_dlibs_own_face_network(
    tmp_path: Path, network_sha: str
) -> None:
    run, tuned_face, head = _run_checkpoint(tmp_path / "run.ckpt", network_sha)

    assert main(["--emotion-from", str(run), "--out", str(tmp_path / "shipped.ckpt")]) == 0

    face, emotion, spec, _ = load_federated(tmp_path / "shipped.ckpt")
    _, dlib_tail = load_pretrained(default_pretrained_path()).split(0)
    for shipped, own, tuned in zip(
        face.state_dict().values(),
        dlib_tail.state_dict().values(),
        tuned_face.state_dict().values(),
        strict=True,
    ):
        assert torch.equal(shipped, own) and not torch.equal(shipped, tuned)
    for shipped, trained in zip(
        emotion.state_dict().values(), head.state_dict().values(), strict=True
    ):
        assert torch.equal(shipped, trained)
    assert (spec.emotion_model, spec.emotion_scatter, spec.pretrained_sha256) == (
        "transfer",
        2,
        network_sha,
    )
    _, device_emotion, _ = load_models(tmp_path / "shipped.ckpt")
    assert isinstance(device_emotion, EmotionTransfer)


def test_a_transfer_head_of_another_pretrained_network_is_refused(
    tmp_path: Path, network_sha: str
) -> None:
    run, _, _ = _run_checkpoint(tmp_path / "run.ckpt", network_sha, named_sha="0" * 64)

    with pytest.raises(IntegrityError, match="differs from the one this model was trained on"):
        main(["--emotion-from", str(run), "--out", str(tmp_path / "shipped.ckpt")])

    assert not (tmp_path / "shipped.ckpt").exists()
