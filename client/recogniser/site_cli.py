"""``facefed site ...``: enrol, verify, identify and read emotions on the device.

Templates are stored encrypted (:mod:`client.recogniser.templates`).

Every command reads and checks all of its input (images, key, identity) before it writes anything,
so a bad input leaves the store unchanged. Human-readable output by default, one JSON object with
``--json``. ``verify`` exits 0 on a match and 1 on no match; errors exit 2 (bad input), 3 (no
such store or identity, or a refused store folder) or 4 (integrity or key failure): the table in
:mod:`common.errors` and docs/exit-codes.md.

Key custody (a key file, a passphrase or the institution's secret manager) is
:mod:`client.recogniser.key_custody`; ``init`` says what the default key file protects and what it does not.

``init`` never changes the mode of a folder it did not create: an existing ``--store`` folder must
be a private folder of this user (no group/other access), else it is refused.

The verification threshold is, first found: ``--threshold``; the calibration stored in the store for
the checkpoint's model (``facefed site calibrate``); the ``NAME.calibration.json`` shipped next to
``NAME.ckpt`` (it must name the same model tag); a calibration in the checkpoint's metadata.

Environment: ``FACEFED_SITE_DIR`` (store), ``FACEFED_SITE_KEY`` (key file),
``FACEFED_SITE_KEY_COMMAND`` (key command),
``FACEFED_SITE_PASSPHRASE`` (passphrase), ``FACEFED_KEY_DIR`` (where ``init`` puts key files by
default), ``FACEFED_CHECKPOINT``, ``FACEFED_DETECTOR_MODEL``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from client.recogniser import key_custody
from client.recogniser.calibration import (
    DEFAULT_FAR,
    PROTOCOLS,
    Calibration,
    calibrate_on_lfw,
    is_gray,
)
from client.recogniser.imageio import read_image
from client.recogniser.pipeline import FacePipeline, PipelineConfig, load_pipeline
from client.recogniser.templates import (
    CALIBRATION_PREFIX,
    MAX_DIM,
    TemplateStore,
    calibration_problem,
    validate_identity,
)
from common.cli import bounded_float, positive_int
from common.crypto import keys
from common.errors import (
    ConfigError,
    DataError,
    NotFoundError,
    RefusedError,
)

STORE_ENV = "FACEFED_SITE_DIR"
CHECKPOINT_ENV = "FACEFED_CHECKPOINT"
DETECTOR_ENV = "FACEFED_DETECTOR_MODEL"
NO_MATCH_EXIT = 1
CALIBRATION_SUFFIX = ".calibration.json"


def _store_dir(args: argparse.Namespace) -> Path:
    explicit = args.store or key_custody.env_path(STORE_ENV)
    directory = Path(explicit or Path.home() / ".local" / "share" / "facefed" / "site").expanduser()
    if directory.exists() and not directory.is_dir():
        raise ConfigError(f"--store {directory} is a file, not a folder; pass the store's folder")
    return directory


def _check_new_store_folder(directory: Path) -> None:
    """Refuse an existing folder that is not this user's private folder; never chmod it."""
    if not directory.exists():
        return  # init creates it, private (0700)
    info = directory.stat()
    mode = stat.S_IMODE(info.st_mode)
    keep = "facefed never changes the mode of a folder it did not create"
    if info.st_uid != os.geteuid():
        raise RefusedError(
            f"store folder {directory} belongs to another user (uid {info.st_uid}); {keep}: "
            "pass --store with a new folder of your own"
        )
    if mode & 0o022 or mode & stat.S_ISVTX:
        raise RefusedError(
            f"store folder {directory} is shared (writable by group/others, mode {mode:o}); {keep}: "
            f"pass --store with a new folder, e.g. {directory / 'facefed-site'}"
        )
    if mode & 0o077:
        raise RefusedError(
            f"store folder {directory} is readable by group/others (mode {mode:o}); {keep}: run "
            f"`chmod 700 {directory}` or pass --store with a new folder"
        )


def _existing_store(args: argparse.Namespace) -> Path:
    directory = _store_dir(args)
    if not (directory / "templates.db").is_file():
        raise NotFoundError(
            f"no template store in {directory}; run `facefed site init --store {directory}` or "
            f"point --store / {STORE_ENV} to an existing one"
        )
    return directory


def _open(args: argparse.Namespace) -> TemplateStore:
    store = TemplateStore.open(_existing_store(args))
    try:
        key_custody.unlock(store, args)
    except BaseException:
        store.close()
        raise
    return store


def _checkpoint_path(args: argparse.Namespace) -> Path:
    checkpoint = args.checkpoint or key_custody.env_path(CHECKPOINT_ENV)
    if checkpoint is None:
        raise ConfigError(
            f"no model checkpoint given; pass --checkpoint PATH or set {CHECKPOINT_ENV} "
            "to a trained facefed checkpoint (e.g. models/facefed-face-v2.ckpt)"
        )
    return Path(checkpoint)


def _pipeline(args: argparse.Namespace) -> tuple[FacePipeline, dict[str, Any]]:
    checkpoint = _checkpoint_path(args)
    config = PipelineConfig(
        min_face=args.min_face, multi_face="largest" if args.largest else "error"
    )
    detector = args.detector_model or key_custody.env_path(DETECTOR_ENV)
    return load_pipeline(checkpoint, detector_model=detector, config=config)


def _images(paths: list[Path]) -> list[np.ndarray]:
    return [read_image(p) for p in paths]


def calibration_file(checkpoint: Path) -> Path:
    """Where a checkpoint's shipped calibration lives: ``NAME.ckpt`` -> ``NAME.calibration.json``."""
    return checkpoint.with_suffix(CALIBRATION_SUFFIX)


def _shipped_calibration(checkpoint: Path, tag: str) -> dict[str, Any] | None:
    """The calibration file next to the checkpoint, if any; it must be for this very model."""
    path = calibration_file(checkpoint)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
        cal = Calibration.from_dict(data)
    except (OSError, ValueError, TypeError, RecursionError) as exc:
        raise ConfigError(
            f"calibration file {path} is unreadable ({exc.__class__.__name__}); restore it or run "
            "`facefed site calibrate` with this checkpoint"
        ) from None
    if cal.model_tag != tag:
        raise ConfigError(
            f"calibration file {path} is for model {cal.model_tag}, not for the checkpoint's model "
            f"{tag}; remove it or run `facefed site calibrate` with this checkpoint"
        )
    return _checked(f"calibration file {path}", data, tag)


def _checked(where: str, data: dict[str, Any], tag: str) -> dict[str, Any]:
    """``data``, after the checks a stored calibration gets (ranges, tag, the nested gray entry)."""
    problem = calibration_problem(f"{CALIBRATION_PREFIX}{tag}", data)
    if problem:
        raise ConfigError(
            f"{where} is invalid: {problem}; restore it or run `facefed site calibrate` with this "
            "checkpoint"
        )
    return data


def _calibration(
    args: argparse.Namespace, store: TemplateStore, pipeline: FacePipeline, meta: dict[str, Any]
) -> Calibration:
    tag = pipeline.model_tag
    if args.threshold is not None:
        return Calibration.manual(args.threshold, tag)
    stored = store.get_meta(f"calibration:{tag}")
    if stored is None:
        stored = _shipped_calibration(_checkpoint_path(args), tag)
    if stored is None and isinstance(meta.get("calibration"), dict):
        stored = _checked(
            "the checkpoint's calibration", dict(meta["calibration"]) | {"model_tag": tag}, tag
        )
    if stored is None:
        raise ConfigError(
            f"no verification threshold calibrated for model {tag}; run `facefed site calibrate` "
            "with this checkpoint (or pass --threshold T)"
        )
    return Calibration.from_dict(stored)


def _probe(
    pipeline: FacePipeline, image: np.ndarray, name: str, cal: Calibration
) -> tuple[np.ndarray, Calibration]:
    """The probe's embedding, and the calibration that decides it: the gray one for a gray face.

    Refuses a gray face that only a colour FAR covers.
    """
    face = pipeline.aligned_face(image, name)
    gray = is_gray(face)
    if gray and pipeline.chips and cal.gray is None and cal.far is not None:
        raise ConfigError(
            f"the probe's face is gray, and the calibration for model {cal.model_tag} has no gray "
            "threshold (it predates them): its FAR does not hold for gray faces; run `facefed site "
            "calibrate` again (or pass --threshold T)"
        )
    return pipeline.embed_faces(face[None])[0], cal.for_probe(gray)


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    print(json.dumps(payload, sort_keys=True) if args.json else text)


# ---------------------------------------------------------------------- commands
def cmd_init(args: argparse.Namespace) -> int:
    directory = _store_dir(args)
    if (directory / "templates.db").exists():
        raise RefusedError(
            f"a template store already exists in {directory}; use it or pick another --store"
        )
    _check_new_store_folder(directory)
    store_id = uuid.uuid4().hex
    passphrase = key_custody.read_passphrase(
        args.passphrase_file,
        args.passphrase_env,
        args.passphrase_stdin,
        "new store passphrase: " if args.passphrase else "",
        new=True,
    )
    if args.passphrase and passphrase is None:
        raise key_custody.no_tty_passphrase("--passphrase asks for a new passphrase")
    external = None
    if passphrase is None and key_custody.uses_external_key(args):
        external = key_custody.external_secret(args.key_command, args.key_fd)
    key_file: Path | None = None
    if passphrase is not None:
        master = keys.new_passphrase_key(passphrase)
    elif external is not None:
        master = keys.new_external_key(external)
    else:
        key_file = key_custody.key_path(args, store_id).resolve()
        if key_file.parent == directory.resolve() or directory.resolve() in key_file.parents:
            raise ConfigError(
                f"key file {key_file} is inside the store {directory}; keep the key apart from the "
                f"database: pass --key-file PATH elsewhere (default {key_custody.default_key_path(store_id)})"
            )
        key_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        master = keys.new_key_file(key_file)
    try:
        store = TemplateStore.create(directory, master, dim=args.dim, store_id=store_id)
    except BaseException:
        if key_file is not None:
            with contextlib.suppress(FileNotFoundError):
                key_file.unlink()
        raise
    store.close()
    if key_file is not None:
        where = f"key file {key_file}"
    else:
        where = "passphrase (scrypt)" if passphrase is not None else "the secret manager's key"
    note = key_custody.KEY_FILE_CUSTODY if key_file else None
    _emit(
        args,
        {
            "store": str(directory),
            "store_id": store_id,
            "key": master.info.kind,
            "key_file": str(key_file) if key_file else None,
            "custody_note": note,
        },
        f"created template store {directory} (id {store_id}), protected by {where}"
        + (f"\nnote: {note}" if note else ""),
    )
    return 0


def parse_lfw_sets(text: str | None) -> tuple[int, ...] | None:
    """``--lfw-sets`` (``"4,5"``) as 1-based LFW people sets; ``None`` (all sets) when not given."""
    if text is None:
        return None
    try:
        sets = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        sets = ()
    if not sets or any(not 1 <= v <= 5 for v in sets):
        raise ConfigError(
            f"--lfw-sets must be comma-separated LFW people sets 1..5, got {text!r}; e.g. 4,5"
        )
    return sets


def cmd_calibrate(args: argparse.Namespace) -> int:
    lfw_sets = parse_lfw_sets(args.lfw_sets)
    pipeline, _ = _pipeline(args)
    with _open(args) as store:
        cal = calibrate_on_lfw(
            pipeline.embed_faces,
            model_tag=pipeline.model_tag,
            far=args.far,
            data_dir=args.data_dir,
            lfw_sets=lfw_sets,
            protocol=args.pairs,
            chips=pipeline.chips,
        )
        store.set_meta(f"calibration:{pipeline.model_tag}", cal.to_dict())
    gray = f"\ngray probes: {cal.gray.describe()}" if cal.gray is not None else ""
    _emit(args, cal.to_dict(), f"model {cal.model_tag}: {cal.describe()}{gray}")
    return 0


def cmd_enroll(args: argparse.Namespace) -> int:
    identity = validate_identity(args.id)
    images = _images(args.images)
    pipeline, _ = _pipeline(args)
    template = pipeline.template(images, [str(p) for p in args.images])
    with _open(args) as store:
        version = store.enroll(
            identity, template, model_tag=pipeline.model_tag, n_images=len(images)
        )
    _emit(
        args,
        {
            "id": identity,
            "version": version,
            "images": len(images),
            "model_tag": pipeline.model_tag,
        },
        f"enrolled {identity} from {len(images)} image(s) (template version {version})",
    )
    return 0


def _require_identity(store: TemplateStore, identity: str) -> None:
    if identity not in store.identities():
        raise NotFoundError(
            f"no template for {identity!r} in {store.directory}; enrol it first or check the id "
            "with `facefed site list`"
        )


def _check_tag(identity: str, stored_tag: str, pipeline: FacePipeline) -> None:
    if stored_tag != pipeline.model_tag:
        raise DataError(
            f"{identity} was enrolled with model {stored_tag} but the checkpoint is model "
            f"{pipeline.model_tag}; templates of different models are not comparable: enrol again"
        )


def cmd_verify(args: argparse.Namespace) -> int:
    image = read_image(args.image)
    pipeline, meta = _pipeline(args)
    identity = validate_identity(args.id)
    with _open(args) as store:
        _require_identity(store, identity)
        stored = store.get(identity)
        _check_tag(args.id, stored.model_tag, pipeline)
        calibrations = _calibration(args, store, pipeline, meta)
    probe, cal = _probe(pipeline, image, str(args.image), calibrations)
    score = float(np.dot(probe, stored.embedding))
    match = score > cal.threshold
    _emit(
        args,
        {
            "id": args.id,
            "match": match,
            "score": round(score, 6),
            "threshold": cal.threshold,
            "far": cal.far,
            "calibration": cal.to_dict(),
        },
        f"{'MATCH' if match else 'NO MATCH'}: {args.id} score {score:.4f} vs {cal.describe()}",
    )
    return 0 if match else NO_MATCH_EXIT


def cmd_identify(args: argparse.Namespace) -> int:
    image = read_image(args.image)
    pipeline, meta = _pipeline(args)
    with _open(args) as store:
        calibrations = _calibration(args, store, pipeline, meta)
        templates = [t for t in store.iter_templates() if t.model_tag == pipeline.model_tag]
    if not templates:
        raise DataError(
            "no templates enrolled with this model; enrol people with `facefed site enroll` first"
        )
    probe, cal = _probe(pipeline, image, str(args.image), calibrations)
    scores = np.stack([t.embedding for t in templates]) @ probe
    order = np.argsort(-scores)[: args.top_k]
    top = [
        {
            "id": templates[i].identity,
            "score": round(float(scores[i]), 6),
            "match": bool(scores[i] > cal.threshold),
        }
        for i in order
    ]
    lines = [f"top {len(top)} of {len(templates)} enrolled ({cal.describe()}):"]
    lines += [f"  {r['id']:<32} {r['score']:.4f} {'MATCH' if r['match'] else ''}" for r in top]
    _emit(args, {"candidates": top, "threshold": cal.threshold, "far": cal.far}, "\n".join(lines))
    return 0


def cmd_emotion(args: argparse.Namespace) -> int:
    image = read_image(args.image)
    pipeline, _ = _pipeline(args)
    result = pipeline.emotion(image, str(args.image))
    best = sorted(result.probabilities.items(), key=lambda kv: -kv[1])[:3]
    _emit(
        args,
        {"emotion": result.label, "index": result.index, "probabilities": result.probabilities},
        f"{result.label} ({', '.join(f'{k} {v:.2f}' for k, v in best)})",
    )
    return 0


def cmd_rotate(args: argparse.Namespace) -> int:
    with _open(args) as store:
        if store.key_info.kind == "keyfile" and not key_custody.uses_external_key(args):
            path = key_custody.key_path(args, store.store_id)
            new = keys.stage_key_file(path)
            count = store.rotate(new)
            keys.commit_key_file(path)
            where = f"key file {path}"
        elif store.key_info.kind == "keyfile":
            secret = key_custody.external_secret(args.new_key_command, args.new_key_fd, env=False)
            if secret is None:
                raise ConfigError(
                    "rotating a secret-manager store needs the new key; store it in the secret "
                    "manager and pass --new-key-command CMD or --new-key-fd N"
                )
            count = store.rotate(keys.new_external_key(secret))
            where = "the new key from the secret manager"
        else:
            passphrase = key_custody.read_passphrase(
                args.new_passphrase_file,
                args.new_passphrase_env,
                False,
                "new store passphrase: ",
                new=True,
            )
            if passphrase is None:
                raise key_custody.no_tty_passphrase(
                    "rotating a passphrase store needs the new passphrase"
                )
            count = store.rotate(keys.new_passphrase_key(passphrase))
            where = "the new passphrase"
    _emit(args, {"rewrapped": count}, f"re-wrapped {count} template key(s) under {where}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    identity = validate_identity(args.id)
    with _open(args) as store:
        _require_identity(store, identity)
        store.delete(identity)
    _emit(args, {"deleted": args.id}, f"deleted the template of {args.id} (revoked)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _open(args) as store:
        ids = store.identities()
    _emit(args, {"identities": ids}, "\n".join(ids) if ids else "(no identities enrolled)")
    return 0


# ---------------------------------------------------------------------- parsers
def _fd(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value in (1, 2):
        raise argparse.ArgumentTypeError("must not be 1 or 2 (standard output and error)")
    if not 0 <= value <= _MAX_FD:
        raise argparse.ArgumentTypeError(f"must be an open file descriptor number, got {text!r}")
    return value


_MAX_FD = 2**31 - 1  # a C int: os.fdopen refuses larger numbers with OverflowError


def _dim(text: str) -> int:
    value = positive_int(text)
    if value > MAX_DIM:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_DIM}, got {value}")
    return value


def _parents() -> dict[str, argparse.ArgumentParser]:
    store = argparse.ArgumentParser(add_help=False)
    store.add_argument("--store", type=Path, help=f"template store folder (env {STORE_ENV})")
    store.add_argument("--json", action="store_true", help="print one JSON object")
    key = argparse.ArgumentParser(add_help=False)
    source = key.add_mutually_exclusive_group()
    source.add_argument(
        "--key-file", type=Path, help=f"master key file, mode 0600 (env {key_custody.KEY_ENV})"
    )
    source.add_argument(
        "--key-command",
        metavar="CMD",
        help="command that prints the master key from a secret manager, run without a shell, "
        f"e.g. 'vault kv get -field=key secret/facefed' (env {key_custody.KEY_COMMAND_ENV})",
    )
    source.add_argument(
        "--key-fd", type=_fd, metavar="N", help="read the master key from open file descriptor N"
    )
    source.add_argument(
        "--passphrase-file", type=Path, help="file holding the passphrase (mode 0600)"
    )
    source.add_argument(
        "--passphrase-env", metavar="VAR", help="environment variable holding the passphrase"
    )
    source.add_argument(
        "--passphrase-stdin",
        action="store_true",
        help="read the passphrase from standard input (refused otherwise)",
    )
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument(
        "--checkpoint", type=Path, help=f"trained facefed checkpoint (env {CHECKPOINT_ENV})"
    )
    model.add_argument(
        "--detector-model", type=Path, help=f"YuNet ONNX model; default Haar (env {DETECTOR_ENV})"
    )
    model.add_argument(
        "--largest", action="store_true", help="use the largest face if several are found"
    )
    model.add_argument(
        "--min-face", type=positive_int, default=40, help="smallest usable face side in pixels"
    )
    thr = argparse.ArgumentParser(add_help=False)
    thr.add_argument(
        "--threshold",
        type=bounded_float(-1.0, 1.0),
        help="override the calibrated cosine threshold in [-1, 1] (FAR unknown)",
    )
    return {"store": store, "key": key, "model": model, "thr": thr}


def register(subparsers: Any) -> None:
    """Add the ``site`` command group to the ``facefed`` parser."""
    p = _parents()
    site = subparsers.add_parser(
        "site", help="on-device face pipeline and encrypted template store"
    )
    sub = site.add_subparsers(dest="site_command", metavar="ACTION", required=True)

    def add(name: str, func: Any, help_text: str, *parents: str) -> argparse.ArgumentParser:
        parser = sub.add_parser(name, help=help_text, parents=[p[k] for k in parents])
        parser.set_defaults(func=func)
        return parser

    init = add("init", cmd_init, "create the master key and an empty store", "store", "key")
    init.add_argument(
        "--passphrase", action="store_true", help="protect the store with a prompted passphrase"
    )
    init.add_argument("--dim", type=_dim, default=128, help="embedding size")
    cal = add(
        "calibrate", cmd_calibrate, "calibrate the threshold on LFW folds", "store", "key", "model"
    )
    cal.add_argument(
        "--far",
        type=bounded_float(0.0, 1.0, open_low=True),
        default=DEFAULT_FAR,
        help="target false-accept rate in (0, 1]",
    )
    cal.add_argument("--data-dir", type=Path, help="folder holding the LFW archive")
    cal.add_argument(
        "--lfw-sets",
        metavar="SETS",
        help="calibrate only on the pairs of these LFW people sets, e.g. 4,5 (the sets the model "
        "never trained on; default: all)",
    )
    cal.add_argument(
        "--pairs",
        choices=PROTOCOLS,
        default="all",
        help="all: every pair of images within each people set (default; measures FARs to 1e-4 "
        "and below); view2: the pairs file's 300+300 pairs per set",
    )
    enroll = add(
        "enroll", cmd_enroll, "enrol a person from one or more photos", "store", "key", "model"
    )
    enroll.add_argument("--id", required=True, help="identity id")
    enroll.add_argument("images", type=Path, nargs="+", metavar="IMAGE")
    verify = add(
        "verify", cmd_verify, "1:1 match against an enrolled id", "store", "key", "model", "thr"
    )
    verify.add_argument("--id", required=True, help="identity id")
    verify.add_argument("image", type=Path, metavar="IMAGE")
    ident = add(
        "identify", cmd_identify, "top-k enrolled ids for a photo", "store", "key", "model", "thr"
    )
    ident.add_argument("image", type=Path, metavar="IMAGE")
    ident.add_argument("--top-k", type=positive_int, default=5, help="how many candidates")
    emo = add("emotion", cmd_emotion, "facial expression of the face in a photo", "store", "model")
    emo.add_argument("image", type=Path, metavar="IMAGE")
    rot = add(
        "rotate-key", cmd_rotate, "re-wrap all templates under a new master key", "store", "key"
    )
    rot.add_argument("--new-passphrase-file", type=Path, help="new passphrase (passphrase stores)")
    rot.add_argument(
        "--new-passphrase-env", metavar="VAR", help="variable holding the new passphrase"
    )
    rot.add_argument("--new-key-command", metavar="CMD", help="prints the new key (secret manager)")
    rot.add_argument("--new-key-fd", type=_fd, metavar="N", help="new key on file descriptor N")
    delete = add("delete", cmd_delete, "revoke an identity's template", "store", "key")
    delete.add_argument("--id", required=True, help="identity id")
    add("list", cmd_list, "list enrolled identity ids", "store", "key")
