"""Checksummed, atomically written model checkpoints.

File layout: ``MAGIC`` (8 bytes) + SHA-256 of the payload (32 bytes) + payload, where the payload is a
``torch.save`` of ``{"format", "round", "face", "emotion", "model_config", "meta"}`` holding only tensors
and plain Python values, loaded back with ``weights_only=True`` (no pickle code execution).
"""

from __future__ import annotations

import hashlib
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write_bytes
from common.errors import DataError, IntegrityError
from common.models import EmotionNet, FaceEmbedder

MAGIC = b"FFCKPT01"
FORMAT = "facefed-checkpoint/1"


@dataclass(frozen=True)
class ModelConfig:
    """What is needed to rebuild the networks before loading weights."""

    face_width: int
    emotion_width: int

    def build(self) -> tuple[FaceEmbedder, EmotionNet]:
        return FaceEmbedder(width=self.face_width), EmotionNet(width=self.emotion_width)


def save_checkpoint(
    path: str | os.PathLike[str],
    face: FaceEmbedder,
    emotion: EmotionNet,
    model_config: ModelConfig,
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
        "model_config": {
            "face_width": model_config.face_width,
            "emotion_width": model_config.emotion_width,
        },
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


def load_models(path: str | os.PathLike[str]) -> tuple[FaceEmbedder, EmotionNet, dict[str, Any]]:
    """Rebuild both models from a checkpoint, in eval mode; return ``(face, emotion, meta)``."""
    payload = read_checkpoint(path)
    config = ModelConfig(**payload["model_config"])
    face, emotion = config.build()
    try:
        face.load_state_dict(payload["face"])
        emotion.load_state_dict(payload["emotion"])
    except RuntimeError as exc:
        raise IntegrityError(f"checkpoint {path} does not match the model code: {exc}") from None
    face.eval()
    emotion.eval()
    meta = dict(payload.get("meta", {}))
    meta["round"] = payload["round"]
    return face, emotion, meta
