"""Face sets shipped as ``.npz`` files: Extended Yale B (cropped) and Yale Faces (uncropped photos).

Files are opened with ``allow_pickle=False`` and every array is checked for its key, dtype and shape
before use, so a wrong or tampered file fails with a :class:`DataError` instead of a confusing error
later.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from common.data.archives import require_file
from common.data.types import LabeledImages
from common.errors import DataError
from common.paths import data_dir as resolve_data_dir

EYALEB_FILE = "eyaleb_cropped_96x84.npz"
EYALEB_SHAPE = (96, 84)
YALE_FILE = "yalefaces_243x320.npz"
YALE_SHAPE = (243, 320)


def load_extended_yale_b(data_dir: Path | None = None) -> LabeledImages:
    """Load Extended Yale B: images ``(2414, 96, 84)`` uint8 gray, labels = identity ``0..37``.

    Raises:
        DataError: if the file is missing, corrupt or its arrays have unexpected keys, dtypes
            or shapes.
    """
    path = require_file(resolve_data_dir(data_dir) / EYALEB_FILE, "Extended Yale B file")
    arrays = _load(path, ("images", "identity"))
    return _labeled(path, arrays, EYALEB_SHAPE)


def load_yale_faces(data_dir: Path | None = None) -> tuple[LabeledImages, np.ndarray]:
    """Load Yale Faces: images ``(164, 243, 320)`` uint8 gray with identity labels, and the
    condition of each image (``"happy"``, ``"glasses"``, ``"leftlight"``, ...) as a string array.

    Raises:
        DataError: if the file is missing, corrupt or its arrays have unexpected keys, dtypes
            or shapes.
    """
    path = require_file(resolve_data_dir(data_dir) / YALE_FILE, "Yale Faces file")
    arrays = _load(path, ("images", "identity", "condition"))
    faces = _labeled(path, arrays, YALE_SHAPE)
    condition = arrays["condition"]
    if condition.dtype.kind != "U" or condition.shape != (len(faces),):
        raise DataError(
            f"{path}: 'condition' must be {len(faces)} strings, got {condition.dtype} "
            f"{condition.shape}; replace the file with the original"
        )
    return faces, condition


def _load(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise DataError(
                    f"{path} lacks array(s) {', '.join(missing)} (has {', '.join(npz.files)}); "
                    "replace the file with the original"
                )
            return {k: npz[k] for k in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{path} is not a readable .npz file ({exc}); replace it with an intact copy"
        ) from exc


def _labeled(path: Path, arrays: dict[str, np.ndarray], shape: tuple[int, int]) -> LabeledImages:
    images, identity = arrays["images"], arrays["identity"]
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != shape:
        raise DataError(
            f"{path}: 'images' must be uint8 (N, {shape[0]}, {shape[1]}), got {images.dtype} "
            f"{images.shape}; replace the file with the original"
        )
    if identity.dtype.kind not in "iu" or identity.shape != (len(images),):
        raise DataError(
            f"{path}: 'identity' must be {len(images)} integers, got {identity.dtype} "
            f"{identity.shape}; replace the file with the original"
        )
    if len(identity) and identity.min() < 0:
        raise DataError(
            f"{path}: 'identity' has negative values; replace the file with the original"
        )
    return LabeledImages(images=images, labels=identity.astype(np.int64))
