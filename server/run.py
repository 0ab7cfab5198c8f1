"""A federated run on the coordinator: initial models, the strategy loop, per-round evaluation,
checkpoints and ``results.json``."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.atomic import atomic_write_text
from common.checkpoint import ModelConfig, save_checkpoint
from common.config import RunSettings
from common.errors import FacefedError
from common.evaluation import evaluate_emotion, evaluate_face, held_out_sets
from common.models import EmotionNet, FaceEmbedder
from common.paths import data_dir as resolve_data_dir
from common.serde import arrays_digest, from_arrays, to_arrays
from server.central_dp import CentralDp
from server.ledger_keeper import LedgerKeeper
from server.strategy import BudgetExhausted, make_strategy

logger = logging.getLogger(__name__)


class RunRecorder:
    """Evaluates each round's global model, checkpoints it, and keeps ``results.json`` current."""

    def __init__(self, settings: RunSettings, strategy: Any) -> None:
        self.settings = settings
        self.strategy = strategy
        self.out = Path(settings.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        root = resolve_data_dir(settings.data_dir or None)
        self.lfw, self.fer = held_out_sets(settings, root)
        self.rounds: list[dict[str, Any]] = []
        self.ledger: str | None = None
        self.checkpoint: str | None = None
        self.started = time.monotonic()
        self.round_started = self.started

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            self.round_started = time.monotonic()
            return None
        face = FaceEmbedder(width=self.settings.face_width)
        emotion = EmotionNet(width=self.settings.emotion_width)
        from_arrays(arrays, face, emotion)
        t0 = time.monotonic()
        face_metrics = evaluate_face(face, self.lfw)
        emotion_metrics = evaluate_emotion(emotion, self.fer)
        eval_s = time.monotonic() - t0
        ckpt = save_checkpoint(
            self.out / "checkpoints" / f"round_{server_round:03d}.ckpt",
            face,
            emotion,
            ModelConfig(self.settings.face_width, self.settings.emotion_width),
            server_round,
            meta={"model_hash": arrays_digest(arrays)},
        )
        self.checkpoint = str(ckpt)
        clients = {
            f"site-{int(m.get('site-index', node))}": {
                "node_id": node,
                "epsilon": float(m["epsilon"]) if m.get("dp", 1) else "inf",
                "delta": m["delta"],
                "steps": int(m["steps"]),
                "noise_multiplier": m["noise-multiplier"],
                "face_loss": m["face-loss"] if m["face-loss"] >= 0 else None,
                "emotion_loss": m["emotion-loss"] if m["emotion-loss"] >= 0 else None,
                "egress_checked": int(m.get("egress-checked", 0)),
                "egress_refused": int(m.get("egress-refused", 0)),
            }
            for node, m in sorted(self.strategy.site_metrics.get(server_round, {}).items())
        }
        if not clients:
            failures = "; ".join(self.strategy.failures.get(server_round, [])) or "no replies"
            raise FacefedError(
                f"round {server_round}: no site returned a valid update ({failures})"
            )
        now = time.monotonic()
        record = {
            "round": server_round,
            "emotion": {
                "accuracy": emotion_metrics["accuracy"],
                "macro_f1": emotion_metrics["macro_f1"],
            },
            "face": {
                "lfw_accuracy": face_metrics["lfw_accuracy"],
                "lfw_std": face_metrics["lfw_std"],
            },
            "clients": clients,
            "failures": self.strategy.failures.get(server_round, []),
            "time_s": round(now - self.round_started, 2),
            "eval_s": round(eval_s, 2),
            "checkpoint": self.checkpoint,
        }
        self.round_started = now
        self.rounds.append(record)
        self.write(status="running")
        eps = [c["epsilon"] for c in clients.values()]
        eps_text = ", ".join(f"{e:.2f}" if isinstance(e, float) else str(e) for e in eps)
        logger.info(
            "round %d/%d | emotion acc %.3f F1 %.3f | LFW acc %.3f | site epsilon [%s] | %.0f s",
            server_round,
            self.settings.num_rounds,
            emotion_metrics["accuracy"],
            emotion_metrics["macro_f1"],
            face_metrics["lfw_accuracy"],
            eps_text,
            record["time_s"],
        )
        return MetricRecord(
            {
                "emotion-accuracy": emotion_metrics["accuracy"],
                "lfw-accuracy": face_metrics["lfw_accuracy"],
            }
        )

    def write(self, status: str, error: str | None = None) -> None:
        results = {
            "status": status,
            "error": error,
            "config": self.settings.to_flat(),
            "rounds": self.rounds,
            "checkpoint": self.checkpoint,
            "ledger": self.ledger,
            "wall_time_s": round(time.monotonic() - self.started, 2),
        }
        atomic_write_text(self.out / "results.json", json.dumps(results, indent=2))


def run_federation(grid: Grid, settings: RunSettings) -> RunRecorder:
    """Run all rounds; ``results.json`` is rewritten after every round and marked complete at the end."""
    torch.manual_seed(settings.seed)
    face = FaceEmbedder(width=settings.face_width)
    emotion = EmotionNet(width=settings.emotion_width)
    inner = make_strategy(settings)
    recorder = RunRecorder(settings, inner)
    if settings.privacy.dp:
        inner.keeper = LedgerKeeper(
            Path(settings.out_dir) / "ledger.db",
            settings.privacy.accountant,
            settings.privacy.delta,
        )
        recorder.ledger = str(inner.keeper.ledger.path)
    strategy: Strategy = CentralDp(inner, settings) if settings.privacy.central_dp else inner
    try:
        strategy.start(
            grid=grid,
            initial_arrays=to_arrays(face, emotion),
            num_rounds=settings.num_rounds,
            train_config=ConfigRecord({}),
            evaluate_fn=recorder.evaluate,
        )
    except BudgetExhausted as exc:
        logger.warning("%s", exc)
        recorder.write(status="stopped", error=str(exc))
        return recorder
    except Exception as exc:
        recorder.write(status="failed", error=f"{type(exc).__name__}: {exc}")
        raise
    finally:
        if inner.keeper is not None:
            inner.keeper.finish(f"run ended after {len(recorder.rounds)} rounds")
    done = len(recorder.rounds) == settings.num_rounds
    recorder.write(
        status="completed" if done else "failed",
        error=None if done else "some rounds produced no aggregate; see failures",
    )
    return recorder
