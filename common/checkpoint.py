"""Checksummed, atomically written model checkpoints.

File layout: ``MAGIC`` (8 bytes) + SHA-256 of the payload (32 bytes) + payload, where the payload is a
``torch.save`` of ``{"format", "round", "face", "emotion", "model_config", "meta"}`` holding only tensors
and plain Python values, loaded back with ``weights_only=True`` (no pickle code execution).
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.atomic import atomic_write_bytes
from common.errors import DataError, IntegrityError
from common.model_spec import ModelSpec

MAGIC = b"FFCKPT01"
FORMAT = "facefed-checkpoint/1"


def save_checkpoint(
    path: str | os.PathLike[str],
    face: nn.Module,
    emotion: nn.Module,
    model_config: ModelSpec,
    round_: int,
    meta: dict[str, Any] | None = None,
    server: dict[str, Any] | None = None,
) -> Path:
    """Write a checkpoint atomically; return its path.

    ``server`` optionally carries the coordinator's state for resuming (tensors and text only).
    """
    payload = {
        "format": FORMAT,
        "round": int(round_),
        "face": {k: v.detach().cpu() for k, v in face.state_dict().items()},
        "emotion": {k: v.detach().cpu() for k, v in emotion.state_dict().items()},
        "model_config": model_config.to_dict(),
        "meta": dict(meta or {}),
    }
    if server is not None:
        payload["server"] = server
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    body = buffer.getvalue()
    atomic_write_bytes(path, MAGIC + hashlib.sha256(body).digest() + body)
    return Path(path)


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and verify a checkpoint; raise a one-line error if it is missing, foreign or corrupt."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise DataError(
            f"checkpoint {p} does not exist; pass the path of a round_*.ckpt file"
        ) from None
    except OSError as exc:
        raise DataError(f"cannot read checkpoint {p}: {exc.strerror}") from None
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 32:
        raise IntegrityError(f"{p} is not a facefed checkpoint (bad header)")
    digest, body = raw[len(MAGIC) : len(MAGIC) + 32], raw[len(MAGIC) + 32 :]
    if hashlib.sha256(body).digest() != digest:
        raise IntegrityError(f"checkpoint {p} is corrupt (checksum mismatch); use an earlier round")
    try:
        payload = torch.load(io.BytesIO(body), weights_only=True)
    except Exception as exc:  # a valid checksum over an undecodable body: foreign writer
        raise IntegrityError(f"checkpoint {p} cannot be decoded: {exc}") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise IntegrityError(f"{p} has an unknown checkpoint format")
    return payload


def load_federated(
    path: str | os.PathLike[str],
) -> tuple[nn.Module, nn.Module, ModelSpec, int]:
    """The two federated modules of a checkpoint as trained (for the pretrained family, the heads
    without the frozen trunk), in eval mode, their :class:`ModelSpec` and the round."""
    payload = read_checkpoint(path)
    return (*_federated(payload, path), int(payload["round"]))


def _federated(
    payload: dict[str, Any], path: str | os.PathLike[str]
) -> tuple[nn.Module, nn.Module, ModelSpec]:
    try:
        spec = ModelSpec.from_dict(dict(payload["model_config"]))
        face, emotion = spec.build()
    except (TypeError, ValueError, IndexError) as exc:
        raise IntegrityError(
            f"checkpoint {path} names networks this facefed cannot build: {exc}"
        ) from None
    if spec.pretrained and not spec.pretrained_sha256:
        raise IntegrityError(
            f"checkpoint {path} uses the pretrained face network but does not name which one "
            "(no SHA-256); use a checkpoint written by facefed"
        )
    try:
        face.load_state_dict(payload["face"])
        emotion.load_state_dict(payload["emotion"])
    except RuntimeError:
        raise IntegrityError(
            f"checkpoint {path} does not match the networks it names (wrong network or a foreign "
            "file); use a checkpoint written by this facefed"
        ) from None
    return face.eval(), emotion.eval(), spec


def load_models(
    path: str | os.PathLike[str], pretrained: str | os.PathLike[str] | None = None
) -> tuple[nn.Module, nn.Module, dict[str, Any]]:
    """Both models ready for inference, in eval mode; return ``(face, emotion, meta)``.

    ``face`` maps the input of its family (112x112 gray, or 150x150 chips through the frozen trunk
    for the pretrained family) to unit embeddings; ``emotion`` maps standardised 48x48 gray faces to
    logits. ``pretrained`` is the public network's weights file (default: ``FACEFED_PRETRAINED`` or
    ``models/dlib-resnet-v1.ffnet``).
    """
    payload = read_checkpoint(path)
    face, emotion, spec = _federated(payload, path)
    if spec.pretrained:
        face, emotion = _with_trunk(face, emotion, spec, pretrained)
    meta = dict(payload.get("meta", {}))
    meta["round"] = payload["round"]
    meta["model_spec"] = spec.to_dict()
    return face, emotion, meta


def _with_trunk(
    face: nn.Module, emotion: nn.Module, spec: ModelSpec, pretrained: str | os.PathLike[str] | None
) -> tuple[nn.Module, nn.Module]:
    from common.facenet.emotion_input import emotion_features
    from common.facenet.resnet import ChipEmbedder, FaceTail
    from common.facenet.transfer import EmotionHead, EmotionTransfer
    from common.facenet.weights import default_pretrained_path, load_pretrained

    network = spec.check_pretrained(
        load_pretrained(Path(pretrained) if pretrained else default_pretrained_path())
    )
    if isinstance(face, FaceTail):
        trunk, _ = network.split(spec.face_tail_blocks)
        face = ChipEmbedder(trunk, face).eval()
    if isinstance(emotion, EmotionHead):
        emotion = EmotionTransfer(emotion_features(spec, network), emotion).eval()
    return face, emotion
