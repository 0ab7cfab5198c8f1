"""What the federated modules take as input, for either model family (``common.model_spec``).

* scratch: preprocessed images (``common.data.preprocess``);
* pretrained / transfer: the frozen features of dlib's public face trunk. They depend only on public
  weights and the images, so each party computes them once, here with a cache on disk keyed by the
  images' bytes, the trunk's weights and the cut.

The flip test-time augmentation of evaluation happens on the images, so a features set carries the
features of the mirrored images too.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.data.archives import load_or_build
from common.data.preprocess import EMOTION_SHARPNESS, emotion_tensor, face_tensor
from common.facenet.emotion_input import STATS_SHA256, emotion_features
from common.facenet.resnet import chip_tensor
from common.facenet.transfer import EmotionFeatures, frozen_features
from common.model_spec import ModelSpec, state_sha256
from common.paths import cache_dir

logger = logging.getLogger(__name__)


def _kymatio_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kymatio")
    except PackageNotFoundError:
        return "none"


@dataclass(frozen=True)
class FaceInputs:
    """The face module's inputs for some faces, and for their mirror images (evaluation only)."""

    x: torch.Tensor
    flipped: torch.Tensor | None = None


class ModelInputs:
    """Turns images into the federated modules' inputs under one :class:`ModelSpec`.

    ``spec.pretrained_sha256`` is filled in from the weights actually loaded (:attr:`spec`). Frozen
    features of faces are close to templates (with the public embedding layer, they are templates), so
    they are written to the cache folder only with ``disk_cache`` (public data, such as a simulation's
    shared datasets); a site's own data keeps them in memory.
    """

    def __init__(
        self, spec: ModelSpec, pretrained: Path | None = None, *, disk_cache: bool = True
    ) -> None:
        self.spec = spec
        self.disk_cache = disk_cache
        self._face_trunk: torch.nn.Module | None = None
        self._emotion_input: EmotionFeatures | None = None
        if spec.pretrained:
            from common.facenet.weights import default_pretrained_path, load_pretrained

            network = spec.check_pretrained(
                load_pretrained(pretrained or default_pretrained_path())
            )
            self.spec = replace(spec, pretrained_sha256=state_sha256(network))
            if spec.face_model == "pretrained":
                self._face_trunk = network.split(spec.face_tail_blocks)[0]
            if spec.emotion_model == "transfer":
                self._emotion_input = emotion_features(self.spec, network)

    @property
    def face_needs_chips(self) -> bool:
        """Whether face inputs are made from aligned 150x150 RGB chips (else 112x112 faces)."""
        return self._face_trunk is not None

    def face(self, images: np.ndarray, flips: bool = False) -> FaceInputs:
        """uint8 faces (chips for the pretrained family) -> the face module's inputs."""
        if self._face_trunk is None:
            x = face_tensor(images)
            return FaceInputs(x, x.flip(-1) if flips else None)
        key = f"face{self.spec.face_tail_blocks}"
        x = self._cached(key, images, lambda: self._face_features(images))
        flipped = None
        if flips:
            mirrored = np.ascontiguousarray(images[:, :, ::-1])
            flipped = self._cached(key, mirrored, lambda: self._face_features(mirrored))
        return FaceInputs(x, flipped)

    def emotion(self, images: np.ndarray) -> torch.Tensor:
        """uint8 gray (or RGB) faces of any size -> the emotion module's inputs."""
        if self._emotion_input is None:
            return emotion_tensor(images)
        s = self.spec
        cut = f"emotion{s.emotion_trunk_blocks}-{s.emotion_input_size}-sharp{EMOTION_SHARPNESS}"
        if s.emotion_scatter:  # the maps change with the statistics and the transform's version
            cut += f"-scatter{s.emotion_scatter}-{STATS_SHA256[:12]}-kymatio{_kymatio_version()}"
        if s.emotion_head_width:  # a conv head reads the whole map: kept in half precision
            return self._cached(
                f"{cut}-map", images, lambda: self._emotion_features(images, None)
            ).float()
        key = f"{cut}-{s.emotion_pool}"
        return self._cached(key, images, lambda: self._emotion_features(images, s.emotion_pool))

    def emotion_training(self, images: np.ndarray) -> torch.Tensor:
        """The emotion module's training inputs: :meth:`emotion`'s, or with ``emotion-scatter``
        ``(N, 2, C, H, W)``, each face's map and its mirror image's.

        Training mirrors faces at random. A trunk map can simply be flipped (the trunk is close to
        mirror-symmetric), but a scattering map cannot: its orientation channels do not follow the
        flip, and the flipped map of a 48-pixel face is misaligned with its 12x12 grid. So a site
        keeps the mirror image's own map, and training takes one of the two at random
        (:func:`client.training.train.run_fast_steps`).
        """
        x = self.emotion(images)
        if not self.spec.emotion_scatter:
            return x
        return torch.stack([x, self.emotion(np.ascontiguousarray(images[:, :, ::-1]))], 1)

    def _face_features(self, chips: np.ndarray) -> torch.Tensor:
        assert self._face_trunk is not None
        h = frozen_features(self._face_trunk, chip_tensor(chips))
        return h.mean(dim=(2, 3)) if self.spec.face_tail_blocks == 0 else h

    def _emotion_features(self, images: np.ndarray, pool: int | None) -> torch.Tensor:
        """The input map of each face (:class:`EmotionFeatures`): pooled to ``pool x pool``, or
        whole (float16) for ``None``."""
        assert self._emotion_input is not None
        # here, not in emotion(): only when the maps are not cached (matching sharpness takes seconds)
        x = emotion_tensor(images)
        if pool is None:  # 256 at a time: the scattering runs about a tenth faster than at 64
            return frozen_features(self._emotion_input, x, batch=256, dtype=torch.float16)
        return F.adaptive_avg_pool2d(frozen_features(self._emotion_input, x, batch=256), pool)

    def _cached(self, key: str, images: np.ndarray, build: object) -> torch.Tensor:
        if not self.disk_cache:
            return build()  # type: ignore[operator]
        digest = hashlib.sha256(self.spec.pretrained_sha256.encode())
        digest.update(f"{key}:{images.shape}".encode())
        digest.update(np.ascontiguousarray(images).tobytes())
        path = cache_dir() / f"features-{key}-{digest.hexdigest()[:24]}.npz"

        def compute() -> dict[str, np.ndarray]:
            logger.info(
                "computing frozen %s features of %d images (cached in %s)", key, len(images), path
            )
            return {"x": build().numpy()}  # type: ignore[operator]

        return torch.from_numpy(load_or_build(path, compute)["x"])
