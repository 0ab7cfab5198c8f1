"""facefed's file of pretrained face-network weights: ``FFNET001``, SHA-256 of the payload, payload.

The payload is a ``torch.save`` of ``{"format", "arch", "state", "meta"}`` and is read back with
``weights_only=True``, so a weights file can carry tensors and plain values but never code. A flipped
byte anywhere fails the checksum (:class:`~common.errors.IntegrityError`) before anything is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import os
from pathlib import Path
from typing import Any

import torch

from common.atomic import atomic_write_bytes
from common.errors import DataError, IntegrityError
from common.facenet.resnet import DlibResNet
from common.paths import REPO_ROOT

MAGIC = b"FFNET001"
FORMAT = "facefed-pretrained/1"
ARCH = "dlib-resnet-v1"
PRETRAINED_ENV = "FACEFED_PRETRAINED"
DEFAULT_FILE = REPO_ROOT / "models" / "dlib-resnet-v1.ffnet"
REBUILD = "rebuild it with `facefed convert-dlib` (pip install 'facefed[convert]')"


def default_pretrained_path() -> Path:
    """``$FACEFED_PRETRAINED`` if set, else ``models/dlib-resnet-v1.ffnet`` in the repository."""
    explicit = os.environ.get(PRETRAINED_ENV)
    return Path(explicit).expanduser() if explicit else DEFAULT_FILE


def encode(model: DlibResNet, meta: dict[str, Any]) -> bytes:
    """The file's bytes for ``model``'s weights (float32, on the CPU) and ``meta``."""
    state = {k: v.detach().to("cpu", torch.float32).clone() for k, v in model.state_dict().items()}
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, "arch": ARCH, "state": state, "meta": dict(meta)}, buffer)
    payload = buffer.getvalue()
    return MAGIC + hashlib.sha256(payload).digest() + payload


def save_pretrained(path: Path, model: DlibResNet, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights and ``meta`` (provenance, licence) to ``path`` atomically."""
    atomic_write_bytes(path, encode(model, meta))


def read_pretrained(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The checked state dict and meta of a weights file.

    Raises:
        DataError: if ``path`` does not exist.
        IntegrityError: if it is not a facefed weights file, is damaged, or holds another network.
    """
    if not path.is_file():
        raise DataError(
            f"pretrained face weights {path} do not exist; {REBUILD} or set {PRETRAINED_ENV}"
        )
    data = path.read_bytes()
    header = len(MAGIC) + 32
    if data[: len(MAGIC)] != MAGIC or len(data) < header:
        raise IntegrityError(f"{path} is not a facefed weights file ({MAGIC.decode()}); {REBUILD}")
    payload = data[header:]
    if hashlib.sha256(payload).digest() != data[len(MAGIC) : header]:
        raise IntegrityError(f"{path} is damaged (checksum mismatch); {REBUILD}")
    try:
        content = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except (
        Exception
    ) as exc:  # a checksummed payload that torch cannot read: written by something else
        raise IntegrityError(
            f"{path} holds an unreadable payload ({type(exc).__name__}); {REBUILD}"
        ) from None
    if (
        not isinstance(content, dict)
        or content.get("format") != FORMAT
        or content.get("arch") != ARCH
    ):
        raise IntegrityError(f"{path} is not a {ARCH} weights file in format {FORMAT}; {REBUILD}")
    state, meta = content.get("state"), content.get("meta")
    if not isinstance(state, dict) or not isinstance(meta, dict):
        raise IntegrityError(f"{path} lacks its weights or metadata; {REBUILD}")
    return state, meta


def load_pretrained(path: Path | None = None) -> DlibResNet:
    """The pretrained :class:`DlibResNet` from ``path`` (default :func:`default_pretrained_path`), in eval mode."""
    path = default_pretrained_path() if path is None else path
    state, _ = read_pretrained(path)
    model = DlibResNet()
    expected = model.state_dict()
    if state.keys() != expected.keys() or any(
        not isinstance(v, torch.Tensor) or v.shape != expected[k].shape or v.dtype != torch.float32
        for k, v in state.items()
    ):
        raise IntegrityError(f"{path} holds weights that do not fit the {ARCH} network; {REBUILD}")
    model.load_state_dict(state)
    return model.eval()
