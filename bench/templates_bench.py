"""Benchmark of issue 4: the encrypted template store and the on-device face pipeline, on this CPU.

Run from the repository root (about 75 s on a busy 2-core CPU)::

    .venv/bin/python -m bench.templates_bench [--checkpoint PATH] [--sizes 1000 10000]

What it measures, each number the median of ``--reps`` timed repetitions after ``--warmup``:

* **Store throughput** (templates per second) of :class:`client.recogniser.templates.TemplateStore` for
  *encrypt* (``enroll_many`` into a fresh store, one transaction), *decrypt* (open, unlock and
  decrypt every template) and *rotate* (re-wrap every data key under a new master key). Baselines
  measured in the same run: the very same store with a **null cipher** (the envelope functions
  replaced by byte copies, so the ratio is the cost of the cryptography alone) and a **plaintext
  numpy file** (``np.savez`` written with ``atomic_write_bytes`` / ``np.load``).
* **Identify** over n enrolled templates: open + unlock + decrypt all + cosine top-5 (what
  ``facefed site identify`` does after embedding the probe), against the null-cipher store, a
  plaintext ``.npz`` load + search, and the search alone on a matrix already in memory.
* **Verify latency for one image**: an uncropped Yale photo (PNG) through decode, detection,
  alignment, embedding and the match against one stored template (open + unlock + decrypt + dot),
  with the Haar cascade and with YuNet.

Templates are real: single-pass embeddings of the LFW images (``lfw_deepfunneled112``, 6,165
aligned 112x112 crops); beyond 6,165 the embeddings of the mirrored images are added, which are
distinct vectors (checked). The model is the face embedder of ``--checkpoint`` /
``FACEFED_CHECKPOINT``, else ``/tmp/simdefault/checkpoints/round_003.ckpt`` if present, else an
untrained :class:`common.models.FaceEmbedder` (timings do not depend on the weights).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    if not __package__:  # `python bench/templates_bench.py`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    # OpenBLAS fixes its thread count when numpy loads, so it is pinned here, like --threads pins
    # torch and OpenCV: on a shared 2-core CPU a second BLAS thread spins and makes a 10k x 128
    # matrix-vector product ~70x slower (8 ms instead of 0.1 ms, measured under load ~6).
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import contextlib
import functools
import io
import json
import logging
import shutil
import sqlite3
import tempfile
import time
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from unittest import mock

import cryptography
import cv2
import numpy as np
import torch

from bench.templates_report import jsonable, markdown
from bench.timing import load_average, machine, measure, measure_call
from client.recogniser import templates as templates_module
from client.recogniser.imageio import read_image
from client.recogniser.pipeline import Detector, FacePipeline, HaarDetector, YuNetDetector
from client.recogniser.templates import TemplateStore
from common.atomic import atomic_write_bytes
from common.checkpoint import read_checkpoint
from common.crypto import envelope, keys
from common.data.lfw import load_lfw
from common.data.preprocess import face_tensor
from common.errors import ConfigError, DataError, FacefedError, IntegrityError
from common.models import FaceEmbedder
from common.paths import data_dir

logger = logging.getLogger(__name__)

CHECKPOINT_ENV = "FACEFED_CHECKPOINT"
DEFAULT_CHECKPOINT = Path("/tmp/simdefault/checkpoints/round_003.ckpt")
YALE_FILE = "yalefaces_243x320.npz"
YUNET_FILE = "face_detection_yunet_2026may.onnx"
DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "templates.json"
TOP_K = 5


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """Sizes and repetition counts of one benchmark run."""

    sizes: tuple[int, ...] = (1000, 10000)
    reps: int = 5
    warmup: int = 1
    verify_reps: int = 20
    verify_warmup: int = 3

    def __post_init__(self) -> None:
        if not self.sizes or min(self.sizes) < 1:
            raise ConfigError(f"sizes must be positive template counts, got {self.sizes}")
        if min(self.reps, self.verify_reps) < 1 or min(self.warmup, self.verify_warmup) < 0:
            raise ConfigError("repetitions must be >= 1 and warm-up runs >= 0")


# ---------------------------------------------------------------------------- model and templates
def resolve_checkpoint(explicit: Path | None) -> Path | None:
    """``--checkpoint``, else ``FACEFED_CHECKPOINT``, else the default simulation's if present."""
    if explicit is not None:
        return explicit
    if os.environ.get(CHECKPOINT_ENV):
        return Path(os.environ[CHECKPOINT_ENV])
    return DEFAULT_CHECKPOINT if DEFAULT_CHECKPOINT.is_file() else None


def load_embedder(checkpoint: Path | None) -> tuple[FaceEmbedder, dict[str, Any]]:
    """The face embedder of ``checkpoint`` (only its face part is read), or an untrained one."""
    if checkpoint is None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = FaceEmbedder()
        return model.eval(), {"source": "untrained FaceEmbedder (seed 0)", "face_width": 32}
    if not checkpoint.is_file():
        raise ConfigError(f"checkpoint {checkpoint} not found; pass --checkpoint PATH or omit it")
    payload = read_checkpoint(checkpoint)
    width = int(payload["model_config"]["face_width"])
    model = FaceEmbedder(width=width)
    try:
        model.load_state_dict(payload["face"])
    except RuntimeError as exc:
        raise IntegrityError(f"{checkpoint}: face model does not match the code ({exc})") from None
    info = {"source": str(checkpoint), "round": payload.get("round"), "face_width": width}
    return model.eval(), info


@torch.inference_mode()
def _embed_single(embedder: FaceEmbedder, faces: np.ndarray, batch: int = 256) -> np.ndarray:
    if len(faces) == 0:
        return np.zeros((0, embedder.embed.out_features), dtype=np.float32)
    x = face_tensor(np.ascontiguousarray(faces))
    return torch.cat([embedder(b) for b in x.split(batch)]).float().numpy()


def template_pool(
    embedder: FaceEmbedder, faces: np.ndarray, n: int
) -> tuple[list[str], np.ndarray]:
    """``n`` distinct real templates: embeddings of ``faces``, then of their mirror images.

    Raises:
        DataError: if ``n`` exceeds twice the number of faces, or two templates coincide.
    """
    if n > 2 * len(faces):
        raise DataError(f"{n} templates need at least {(n + 1) // 2} face images, got {len(faces)}")
    n_orig = min(n, len(faces))
    n_mirror = n - n_orig
    matrix = np.concatenate(
        [
            _embed_single(embedder, faces[:n_orig]),
            _embed_single(embedder, faces[:n_mirror, :, ::-1]),
        ]
    )
    if len(np.unique(matrix, axis=0)) != n:
        raise DataError("template pool has duplicate embeddings; use distinct face images")
    ids = [f"lfw{i:05d}" for i in range(n_orig)] + [f"lfw{i:05d}.mirror" for i in range(n_mirror)]
    return ids, matrix


# ---------------------------------------------------------------------------- store benchmarks
def _null_seal(_key: bytes, plaintext: bytes, _aad: bytes) -> envelope.Envelope:
    return envelope.Envelope(
        nonce=bytes(envelope.NONCE_SIZE),
        ciphertext=plaintext + bytes(envelope.TAG_SIZE),
        wrap_nonce=bytes(envelope.NONCE_SIZE),
        wrapped_key=bytes(envelope.WRAPPED_KEY_SIZE),
    )


def _null_open(_key: bytes, env: envelope.Envelope, _aad: bytes) -> bytes:
    return env.ciphertext[: -envelope.TAG_SIZE]


def _null_rewrap(
    _old: bytes, _new: bytes, env: envelope.Envelope, _aad: bytes
) -> envelope.Envelope:
    return envelope.Envelope(
        nonce=env.nonce,
        ciphertext=env.ciphertext,
        wrap_nonce=bytes(envelope.NONCE_SIZE),
        wrapped_key=bytes(envelope.WRAPPED_KEY_SIZE),
    )


NULL_ENVELOPE = types.SimpleNamespace(
    Envelope=envelope.Envelope, seal=_null_seal, open_envelope=_null_open, rewrap=_null_rewrap
)


@contextlib.contextmanager
def cipher(kind: str) -> Iterator[None]:
    """``"aes-gcm"``: the real store; ``"null"``: the same store with byte copies for crypto."""
    if kind == "aes-gcm":
        yield
    elif kind == "null":
        with mock.patch.object(templates_module, "envelope", NULL_ENVELOPE):
            yield
    else:
        raise ValueError(f"unknown cipher {kind!r}")


def _search(matrix: np.ndarray, probe: np.ndarray) -> np.ndarray:
    return np.argsort(-(matrix @ probe))[:TOP_K]


def _load_all(directory: Path, key: keys.MasterKey) -> list[templates_module.StoredTemplate]:
    with TemplateStore.open(directory) as store:
        store.unlock(key)
        return list(store.iter_templates())


def _identify_encrypted(directory: Path, key: keys.MasterKey, probe: np.ndarray) -> np.ndarray:
    stored = _load_all(directory, key)
    return _search(np.stack([t.embedding for t in stored]), probe)


def _npz_bytes(ids: Sequence[str], matrix: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, identity=np.asarray(ids), embedding=matrix)
    return buffer.getvalue()


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return npz["identity"], npz["embedding"]


def bench_store(
    ids: Sequence[str],
    matrix: np.ndarray,
    probe: np.ndarray,
    *,
    workdir: Path,
    master_keys: Sequence[keys.MasterKey],
    model_tag: str,
    config: BenchConfig,
) -> dict[str, Any]:
    """Encrypt / decrypt / rotate throughput and identify latency at ``len(ids)`` templates."""
    n, items = len(ids), list(zip(ids, matrix, strict=True))
    reps, warmup = config.reps, config.warmup
    out: dict[str, Any] = {"n": n}
    for kind in ("aes-gcm", "null"):
        directory = workdir / f"store-{kind}-{n}"
        holder: list[TemplateStore] = []

        def fresh_store(directory: Path = directory, holder: list[TemplateStore] = holder) -> Any:
            for store in holder:
                store.close()
            holder.clear()
            shutil.rmtree(directory, ignore_errors=True)
            holder.append(TemplateStore.create(directory, master_keys[0], dim=matrix.shape[1]))
            return lambda: holder[0].enroll_many(items, model_tag=model_tag)

        with cipher(kind):
            encrypt = measure(fresh_store, reps=reps, warmup=warmup)
            holder[0].close()
            decrypt = measure_call(
                functools.partial(_load_all, directory, master_keys[0]), reps=reps, warmup=warmup
            )
            identify = measure_call(
                functools.partial(_identify_encrypted, directory, master_keys[0], probe),
                reps=reps,
                warmup=warmup,
            )
            store = TemplateStore.open(directory)
            store.unlock(master_keys[0])
            turn = [0]

            def next_rotation(store: TemplateStore = store, turn: list[int] = turn) -> Any:
                turn[0] += 1
                new_key = master_keys[turn[0] % len(master_keys)]
                return lambda: store.rotate(new_key)

            rotate = measure(next_rotation, reps=reps, warmup=warmup)
            store.close()
        shutil.rmtree(directory, ignore_errors=True)
        out[kind] = {"encrypt": encrypt, "decrypt": decrypt, "rotate": rotate, "identify": identify}

    npz = workdir / f"plain-{n}.npz"
    out["numpy"] = {
        "encrypt": measure_call(
            lambda: atomic_write_bytes(npz, _npz_bytes(ids, matrix)), reps=reps, warmup=warmup
        ),
        "decrypt": measure_call(lambda: _load_npz(npz), reps=reps, warmup=warmup),
        "identify": measure_call(
            lambda: _search(_load_npz(npz)[1], probe), reps=reps, warmup=warmup
        ),
    }
    npz.unlink()
    out["in_memory"] = {
        "identify": measure_call(lambda: _search(matrix, probe), reps=reps, warmup=warmup)
    }
    return out


# ---------------------------------------------------------------------------- verify latency
def bench_verify(
    detector_name: str,
    detector: Detector,
    embedder: FaceEmbedder,
    image_path: Path,
    *,
    store_dir: Path,
    key: keys.MasterKey,
    identity: str,
    config: BenchConfig,
) -> dict[str, Any]:
    """Latency of each stage of ``facefed site verify`` for one image file."""
    pipeline = FacePipeline(embedder, None, detector=detector)
    rgb = read_image(image_path)
    found = pipeline.locate(rgb)
    face = found.require(str(image_path), pipeline.config.min_face)
    det = found.detection
    if det is None:
        raise DataError(f"the pipeline found no usable face in {image_path}")
    probe = pipeline.embed_faces(face[None])[0]

    def match() -> float:
        with TemplateStore.open(store_dir) as store:
            store.unlock(key)
            return float(np.dot(store.get(identity).embedding, probe))

    reps, warmup = config.verify_reps, config.verify_warmup
    stages = {
        "decode": measure_call(lambda: read_image(image_path), reps=reps, warmup=warmup),
        "detection": measure_call(lambda: pipeline.detector.detect(rgb), reps=reps, warmup=warmup),
        "alignment": measure_call(
            lambda: pipeline.aligner.align(rgb, det), reps=reps, warmup=warmup
        ),
        "embedding": measure_call(
            lambda: pipeline.embed_faces(face[None]), reps=reps, warmup=warmup
        ),
        "match": measure_call(match, reps=reps, warmup=warmup),
    }
    return {
        "detector": detector_name,
        "align_method": found.method,
        "face_px": round(det.side),
        "stages": stages,
        "end_to_end_embed": measure_call(lambda: pipeline.embed(rgb), reps=reps, warmup=warmup),
    }


# ---------------------------------------------------------------------------- run and report
def _yale_png(path: Path, subject: int, condition: str) -> Path:
    source = data_dir() / YALE_FILE
    if not source.is_file():
        raise DataError(f"{source} not found; set FACEFED_DATA to the shared data folder")
    with np.load(source, allow_pickle=False) as npz:
        hits = np.flatnonzero((npz["identity"] == subject) & (npz["condition"] == condition))
        if len(hits) == 0:
            raise DataError(f"no Yale photo of subject {subject} in condition {condition!r}")
        gray = npz["images"][hits[0]]
    if not cv2.imwrite(str(path), gray):
        raise DataError(f"cannot write {path}; check the work directory")
    return path


def run(
    config: BenchConfig,
    *,
    embedder: FaceEmbedder,
    faces: np.ndarray,
    workdir: Path,
    yunet: Path | None,
    yale: tuple[int, str] = (0, "normal"),
) -> dict[str, Any]:
    """The whole benchmark; returns the JSON-ready results (timings as :class:`bench.timing.Timing`)."""
    start = time.perf_counter()
    tag = FacePipeline(embedder).model_tag
    t0 = time.perf_counter()
    ids, pool = template_pool(embedder, faces, max(config.sizes))
    logger.info("embedded %d templates in %.1f s", len(ids), time.perf_counter() - t0)
    master_keys = [keys.new_key_file(workdir / "keys" / f"k{i}.key") for i in range(2)]
    image = _yale_png(workdir / "probe.png", *yale)
    probe = FacePipeline(embedder).embed(read_image(image))

    store_rows = []
    for n in sorted(config.sizes):
        logger.info("store benchmarks at %d templates", n)
        store_rows.append(
            bench_store(
                ids[:n],
                pool[:n],
                probe,
                workdir=workdir,
                master_keys=master_keys,
                model_tag=tag,
                config=config,
            )
        )
    verify_store = workdir / "verify-store"
    with TemplateStore.create(verify_store, master_keys[0], dim=pool.shape[1]) as store:
        m = min(config.sizes)
        store.enroll_many(zip(ids[:m], pool[:m], strict=True), model_tag=tag)
    detectors: list[tuple[str, Detector]] = [("haar", HaarDetector())]
    if yunet is not None:
        detectors.append(("yunet", YuNetDetector(yunet)))
    verify_rows = [
        bench_verify(
            name,
            det,
            embedder,
            image,
            store_dir=verify_store,
            key=master_keys[0],
            identity=ids[0],
            config=config,
        )
        for name, det in detectors
    ]
    return {
        "protocol": {
            "reps": config.reps,
            "warmup": config.warmup,
            "verify_reps": config.verify_reps,
            "verify_warmup": config.verify_warmup,
            "statistic": "median wall-clock seconds (time.perf_counter)",
        },
        "data": {
            "templates": f"{min(len(ids), len(faces))} LFW images (single-pass embeddings)"
            f" + {max(len(ids) - len(faces), 0)} of their mirror images",
            "verify_image": f"{YALE_FILE} subject {yale[0]} '{yale[1]}' as gray PNG 320x243",
            "yunet_model": None if yunet is None else str(yunet),
        },
        "store": store_rows,
        "verify": verify_rows,
        "runtime_s": round(time.perf_counter() - start, 1),
    }


def _software() -> dict[str, str]:
    return {
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
        "opencv_threads": str(cv2.getNumThreads()),
        "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS", "library default"),
        "opencv": cv2.__version__,
        "cryptography": cryptography.__version__,
        "numpy": np.__version__,
        "sqlite": sqlite3.sqlite_version,
    }


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--verify-reps", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch and OpenCV threads (default 1: stable on a shared CPU; 0 = library default);"
        " numpy's BLAS follows OPENBLAS_NUM_THREADS (default 1 when run as a script)",
    )
    parser.add_argument("--yunet", type=Path, default=None, help="default: the shared data copy")
    parser.add_argument("--no-yunet", action="store_true")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--workdir", type=Path, default=None, help="parent of the temporary stores")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run, write ``--output`` JSON and print the Markdown tables."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("client.recogniser.templates").setLevel(
        logging.WARNING
    )  # one line per rotation
    args = _parse(argv)
    try:
        config = BenchConfig(
            sizes=tuple(args.sizes),
            reps=args.reps,
            warmup=args.warmup,
            verify_reps=args.verify_reps,
        )
        if args.threads < 0:
            raise ConfigError(f"--threads must be >= 0, got {args.threads}")
        if args.threads:
            torch.set_num_threads(args.threads)
            cv2.setNumThreads(args.threads)
        load_before = load_average()
        checkpoint = resolve_checkpoint(args.checkpoint)
        embedder, model_info = load_embedder(checkpoint)
        faces = load_lfw().images
        yunet = None if args.no_yunet else (args.yunet or data_dir() / YUNET_FILE)
        if yunet is not None and not yunet.is_file():
            logger.warning("YuNet model %s not found; skipping the YuNet row", yunet)
            yunet = None
        with tempfile.TemporaryDirectory(dir=args.workdir, prefix="facefed-bench-") as tmp:
            results = run(config, embedder=embedder, faces=faces, workdir=Path(tmp), yunet=yunet)
    except FacefedError as exc:
        sys.stderr.write(f"error: {exc}\n")
        return 2
    results = {
        "benchmark": "encrypted templates and on-device pipeline (issue 4)",
        "machine": machine(),
        "software": _software(),
        "model": model_info,
        "load_average_before": load_before,
        "load_average_after": load_average(),
        **results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.output, (json.dumps(jsonable(results), indent=2) + "\n").encode())
    sys.stdout.write(markdown(results) + "\n")
    sys.stdout.write(
        f"\nload average before {load_before}, after {results['load_average_after']}; "
        f"runtime {results['runtime_s']} s; results in {args.output}\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
