"""Which networks a run federates, and how to build them: the one place that knows both model families.

* ``scratch``: facefed's own small networks (``common.models``), trained from random weights on
  112x112 gray faces and 48x48 gray emotion crops; ``vgg`` (emotion): a deeper one,
  :class:`EmotionVGG`, on the same crops.
* ``pretrained`` (face) / ``transfer`` (emotion): dlib's public face ResNet (``common.facenet``) is
  frozen, and the federated models are small heads on its features: the :class:`FaceTail` (last
  residual blocks + embedding layer) and an :class:`EmotionHead`.

A :class:`ModelSpec` is stored in every checkpoint, so a checkpoint names the networks it holds (and,
for the pretrained family, the SHA-256 of the public weights its heads were trained on).
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from common.errors import IntegrityError
from common.models import EmotionNet, EmotionVGG, FaceEmbedder

FaceModel = Literal["pretrained", "scratch"]
EmotionModel = Literal["transfer", "scratch", "vgg"]


@dataclass(frozen=True)
class ModelSpec:
    """What is needed to rebuild the federated networks before loading weights."""

    face_width: int = 16
    emotion_width: int = 32
    face_model: FaceModel = "scratch"
    face_tail_blocks: int = 0
    emotion_model: EmotionModel = "scratch"
    emotion_trunk_blocks: int = 10
    emotion_input_size: int = 96
    emotion_pool: int = 2
    # transfer: 0 = a linear head, > 0 = two conv layers this wide first
    emotion_head_width: int = 0
    # transfer: > 0 = the face's log wavelet scattering at this many scales beside the trunk's map
    emotion_scatter: int = 0
    pretrained_sha256: str = ""

    def __post_init__(self) -> None:
        """Refuse types and sizes no run accepts (a checkpoint is a file from outside: absurd sizes
        would allocate without bound, odd types raise deep inside torch)."""
        for name, (low, high) in _INT_RANGES.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
                raise ValueError(f"{name} must be an integer in {low}..{high}, got {value!r}")
        for name, choices in (("face_model", FACE_MODELS), ("emotion_model", EMOTION_MODELS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}")
        sha = self.pretrained_sha256
        if not isinstance(sha, str) or (sha and not _SHA256.fullmatch(sha)):
            raise ValueError("pretrained_sha256 must be empty or 64 lowercase hex digits")
        if (
            self.emotion_model == "transfer"
            and _map_side(self.emotion_input_size, self.emotion_trunk_blocks) < 1
        ):
            raise ValueError(
                f"a {self.emotion_input_size}-pixel face has no features left after "
                f"{self.emotion_trunk_blocks} trunk blocks; use a larger emotion-input-size or fewer "
                "emotion-trunk-blocks"
            )
        if self.emotion_scatter and (
            self.emotion_model != "transfer" or not self.emotion_head_width
        ):
            raise ValueError("emotion_scatter needs the transfer emotion model with a conv head")

    @classmethod
    def from_settings(cls, settings: Any, pretrained_sha256: str = "") -> ModelSpec:
        """The spec of a run's :class:`~common.config.RunSettings`."""
        names = {f.name for f in dataclasses.fields(cls)} - {"pretrained_sha256"}
        values = {name: getattr(settings, name) for name in names}
        if values["emotion_model"] != "transfer" or not values["emotion_head_width"]:
            values["emotion_scatter"] = 0  # only the transfer conv head reads the scattering
        return cls(
            **values, pretrained_sha256=pretrained_sha256 if _uses_pretrained(values) else ""
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelSpec:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise IntegrityError(f"unknown model settings {sorted(unknown)} in the checkpoint")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def pretrained(self) -> bool:
        return _uses_pretrained(self.to_dict())

    def build(self) -> tuple[nn.Module, nn.Module]:
        """The two federated modules, with random weights."""
        from common.facenet.resnet import FaceTail

        face: nn.Module = (
            FaceTail(self.face_tail_blocks)
            if self.face_model == "pretrained"
            else FaceEmbedder(width=self.face_width)
        )
        return face, self._emotion_module()

    def _emotion_module(self) -> nn.Module:
        from common.facenet.resnet import BLOCKS
        from common.facenet.transfer import EmotionHead

        if self.emotion_model == "scratch":
            return EmotionNet(width=self.emotion_width)
        if self.emotion_model == "vgg":
            return EmotionVGG(width=self.emotion_width)
        channels = BLOCKS[self.emotion_trunk_blocks - 1][0] if self.emotion_trunk_blocks else 32
        if self.emotion_scatter:
            from common.scattering import scatter_channels

            channels += scatter_channels(self.emotion_scatter)
        return EmotionHead(channels, self.emotion_pool, width=self.emotion_head_width)

    def initial(
        self, seed: int, pretrained_path: Path | None = None
    ) -> tuple[nn.Module, nn.Module]:
        """The run's starting point: the pretrained tail where the face model is pretrained."""
        torch.manual_seed(seed)
        face, emotion = self.build()
        if self.face_model == "pretrained":
            from common.facenet.weights import load_pretrained

            _, tail = self.check_pretrained(load_pretrained(_path(pretrained_path))).split(
                self.face_tail_blocks
            )
            face = tail
        return face, emotion

    def check_pretrained(self, network: Any) -> Any:
        """``network`` (a loaded DlibResNet), after checking it is the one this spec was built on."""
        if self.pretrained_sha256 and state_sha256(network) != self.pretrained_sha256:
            raise IntegrityError(
                "the pretrained face network on this machine differs from the one this model was "
                f"trained on (SHA-256 {self.pretrained_sha256[:16]}...); install the matching "
                "models/dlib-resnet-v1.ffnet or set FACEFED_PRETRAINED"
            )
        return network


FACE_MODELS = ("pretrained", "scratch")
EMOTION_MODELS = ("transfer", "scratch", "vgg")
_INT_RANGES = {
    "face_width": (1, 256),
    "emotion_width": (1, 256),
    "face_tail_blocks": (0, 5),
    "emotion_trunk_blocks": (1, 14),
    "emotion_input_size": (48, 150),
    "emotion_pool": (1, 4),
    "emotion_head_width": (0, 256),
    "emotion_scatter": (0, 3),
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


def _map_side(size: int, blocks: int) -> int:
    """The side of dlib's trunk's feature map after ``blocks`` residual blocks at ``size`` pixels
    (0 when a convolution runs out of input on the way)."""
    from common.facenet.resnet import BLOCKS

    side = (size - 7) // 2 + 1  # 7x7 stride-2 stem, no padding
    side = (side - 3) // 2 + 1 if side >= 3 else 0  # 3x3 stride-2 max pool
    for _, down in BLOCKS[:blocks]:
        if down:  # a 3x3 stride-2 conv without padding (it needs 3 rows) beside a 2x2 average pool
            if side < 3:
                return 0
            side = max((side - 3) // 2 + 1, (side - 2) // 2 + 1)
    return max(side, 0)


def state_sha256(module: nn.Module) -> str:
    """SHA-256 over a module's state: each tensor's name, shape and float32 bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().float().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _uses_pretrained(values: dict[str, Any]) -> bool:
    return values.get("face_model") == "pretrained" or values.get("emotion_model") == "transfer"


def _path(path: Path | None) -> Path:
    from common.facenet.weights import default_pretrained_path

    return path if path is not None else default_pretrained_path()
