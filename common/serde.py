"""Model state <-> Flower ``ArrayRecord``: which weights are SHARED and which stay LOCAL.

Only the face backbone and the emotion network travel, in one ArrayRecord (Flower's DP clipping mods
accept exactly one) with keys prefixed ``face.`` and ``emotion.``. The identity head (each site's
class-centre matrix) is LOCAL: it never appears in an outgoing record, because its rows are per-person
templates of that site's enrolled people.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord

from common.models import EmotionNet, FaceEmbedder

SHARED_PREFIXES = ("face.", "emotion.")


def to_arrays(face: FaceEmbedder, emotion: EmotionNet) -> ArrayRecord:
    """Pack the shared weights of both models into one ArrayRecord."""
    state: dict[str, torch.Tensor] = {}
    for prefix, model in (("face.", face), ("emotion.", emotion)):
        for key, value in _plain_state_dict(model).items():
            state[prefix + key] = value.detach().cpu()
    return ArrayRecord(torch_state_dict=state)


def from_arrays(arrays: ArrayRecord, face: FaceEmbedder, emotion: EmotionNet) -> None:
    """Load an ArrayRecord produced by :func:`to_arrays` into the two models (strict)."""
    state = arrays.to_torch_state_dict()
    for prefix, model in (("face.", face), ("emotion.", emotion)):
        part = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        model.load_state_dict(part, strict=True)
    extra = [k for k in state if not k.startswith(SHARED_PREFIXES)]
    if extra:
        raise ValueError(f"unexpected keys in model arrays: {extra[:5]}")


def manifest(face: FaceEmbedder, emotion: EmotionNet) -> dict[str, tuple[int, ...]]:
    """The agreed parameter manifest: every shared key and its shape (used by the egress guard)."""
    return {k: tuple(v.shape) for k, v in to_arrays(face, emotion).to_torch_state_dict().items()}


def _plain_state_dict(model: torch.nn.Module) -> Mapping[str, torch.Tensor]:
    # Opacus's GradSampleModule prefixes keys with "_module."; strip it so records are wrapper-agnostic.
    return {k.removeprefix("_module."): v for k, v in model.state_dict().items()}


def arrays_digest(arrays: ArrayRecord) -> str:
    """SHA-256 over sorted keys, shapes, dtypes and bytes: the model version hash."""
    import hashlib

    digest = hashlib.sha256()
    for key, arr in sorted(arrays.items()):
        nd = np.ascontiguousarray(arr.numpy())
        digest.update(f"{key}|{nd.dtype.str}|{nd.shape}|".encode())
        digest.update(nd.tobytes())
    return digest.hexdigest()
