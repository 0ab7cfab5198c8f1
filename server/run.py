"""A federated run on the coordinator: initial models, the strategy loop, per-round evaluation,
checkpoints and ``results.json``."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from common.atomic import atomic_write_text
from common.checkpoint import save_checkpoint
from common.config import RunSettings
from common.errors import FacefedError
from common.evaluation import evaluate_emotion, evaluate_face, held_out_sets
from common.failpoints import failpoint
from common.features import ModelInputs
from common.model_spec import ModelSpec
from common.paths import data_dir as resolve_data_dir
from common.serde import arrays_digest, from_arrays, to_arrays
from server.central_dp import CentralDp
from server.ledger_keeper import COORDINATOR, LedgerKeeper
from server.progress import RoundProgress
from server.run_dir import resume_point, server_state, start_run
from server.run_report import split_round_time
from server.strategy import BudgetExhausted, FacefedStrategy, make_strategy

logger = logging.getLogger(__name__)


class RunRecorder:
    """Evaluates each round's global model, checkpoints it, and keeps ``results.json`` current."""

    def __init__(self, settings: RunSettings, strategy: Any) -> None:
        self.settings = settings
        self.strategy = strategy
        self.out = Path(settings.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        root = resolve_data_dir(settings.data_dir or None)
        inputs = ModelInputs(ModelSpec.from_settings(settings))
        self.spec = inputs.spec
        self.lfw, self.fer = held_out_sets(settings, root, inputs)
        self.rounds: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []
        self.dropouts: dict[int, list[int]] = {}
        # coordinator phases of each round (seconds): what the round's time_s is spent on
        self.phases: dict[int, dict[str, float]] = {}
        self.cohorts: dict[int, dict[str, int]] = {}  # round -> sites sampled, replies received
        self.state_fn: Callable[[ArrayRecord], dict[str, Any]] | None = None
        self.ledger: str | None = None
        self.checkpoint: str | None = None
        self.started = time.monotonic()
        self.round_started = self.started

    def history(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "resumes": self.resumes}

    def restore(self, history: dict[str, Any], after_round: int) -> None:
        """Continue an interrupted run's record: its rounds so far, and note the resume."""
        self.rounds = [r for r in history.get("rounds", []) if r["round"] <= after_round]
        self.resumes = [
            *history.get("resumes", []),
            {"after_round": after_round, "at": time.time()},
        ]
        if self.rounds:
            self.checkpoint = self.rounds[-1]["checkpoint"]

    def evaluate(self, server_round: int, arrays: ArrayRecord) -> None:
        """Evaluate the round's global model; checkpoint it with the coordinator state; record it."""
        face, emotion = self.spec.build()
        from_arrays(arrays, face, emotion)
        t0 = time.monotonic()
        face_metrics = evaluate_face(face, self.lfw)
        emotion_metrics = evaluate_emotion(emotion, self.fer)
        eval_s = time.monotonic() - t0
        ckpt_path = self.out / "checkpoints" / f"round_{server_round:03d}.ckpt"
        clients = {
            f"site-{int(m.get('site-index', node))}": _client_record(node, m)
            for node, m in sorted(self.strategy.site_metrics.get(server_round, {}).items())
        }
        self._add_budgets(clients)
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
                "single_view_accuracy": emotion_metrics["single_view_accuracy"],
            },
            "face": {
                "lfw_accuracy": face_metrics["lfw_accuracy"],
                "lfw_std": face_metrics["lfw_std"],
            },
            "clients": clients,
            "failures": self.strategy.failures.get(server_round, []),
            "dropouts": self.dropouts.get(server_round, []),
            "time_s": round(now - self.round_started, 2),
            "eval_s": round(eval_s, 2),
            "phases": {k: round(v, 3) for k, v in self.phases.pop(server_round, {}).items()},
            "checkpoint": str(ckpt_path),
        }
        record["time_split"] = split_round_time(record)
        if server_round in self.cohorts:
            record["cohort"] = self.cohorts.pop(server_round)
        self.round_started = now
        self.rounds.append(record)
        saving = time.monotonic()
        save_checkpoint(
            ckpt_path,
            face,
            emotion,
            self.spec,
            server_round,
            meta={"model_hash": arrays_digest(arrays)},
            server=self.state_fn(arrays) if self.state_fn is not None else None,
        )
        self.checkpoint = str(ckpt_path)
        # after time_s was taken: a round's checkpoint counts in the next round's time_s
        record["phases"]["save_s"] = round(time.monotonic() - saving, 3)
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

    def _add_budgets(self, clients: dict[str, dict[str, Any]]) -> None:
        """Each DP site's epsilon budget as its signed privacy record set it (the ledger's copy)."""
        keeper = getattr(self.strategy, "keeper", None)
        if keeper is None:
            return
        budgets = {  # one pass; the last entry of each site wins
            entry.site_id: entry.budget_epsilon
            for entry in keeper.ledger.entries()
            if entry.guarantee == "example-level"
        }
        for site, record in clients.items():
            if site in budgets:
                record["budget_epsilon"] = budgets[site]

    def write(self, status: str, error: str | None = None) -> None:
        results = {
            "status": status,
            "error": error,
            "config": self.settings.to_flat(),
            "rounds": self.rounds,
            "resumes": self.resumes,
            "checkpoint": self.checkpoint,
            "ledger": self.ledger,
            "wall_time_s": round(time.monotonic() - self.started, 2),
        }
        atomic_write_text(self.out / "results.json", json.dumps(results, indent=2))


def _client_record(node: int, m: dict[str, Any]) -> dict[str, Any]:
    """One site's round in ``results.json``, from the metrics it sent (validated, all scalars).

    Sites report only their privacy accounting and egress counts: losses, example counts and
    timings are un-noised values of private data and no longer leave a site.
    """
    dp = bool(m.get("dp", 1))
    record: dict[str, Any] = {
        "node_id": node,
        "epsilon": float(m["epsilon"]) if dp else "inf",
    }
    if "epsilon-lifetime" in m:
        record["epsilon_lifetime"] = float(m["epsilon-lifetime"]) if dp else "inf"
    record |= {
        "delta": m["delta"],
        "steps": int(m["steps"]),
        "noise_multiplier": m["noise-multiplier"],
    }
    if "secret-noise" in m:
        record["secret_noise"] = bool(m["secret-noise"])
    record |= {
        "egress_checked": int(m.get("egress-checked", 0)),
        "egress_refused": int(m.get("egress-refused", 0)),
    }
    return record


def run_federation(grid: Grid, settings: RunSettings) -> RunRecorder:
    """Run all rounds (or, with ``resume``, the rest of an interrupted run).

    ``results.json`` is rewritten after every round and marked complete at the end. A run that fails
    leaves its ledger open, so that ``--resume`` can continue it.
    """
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inner = make_strategy(settings)
    # Before the run starts: CentralDp refuses a strategy its noise does not fit.
    strategy: Strategy = CentralDp(inner, settings) if settings.privacy.central_dp else inner
    point = resume_point(out, settings) if settings.resume else None
    run_id = point.run_id if point is not None else start_run(out, settings)
    inner.run_id = run_id
    recorder = RunRecorder(settings, inner)
    if settings.privacy.dp:
        inner.keeper = LedgerKeeper(
            out / "ledger.db", settings.privacy.accountant, settings.privacy.delta, run_id=run_id
        )
        recorder.ledger = str(inner.keeper.ledger.path)
    recorder.state_fn = lambda arrays: server_state(
        arrays, inner.sampling_state(), _moments(inner), recorder.history()
    )
    arrays = to_arrays(*recorder.spec.initial(settings.seed))
    first = 1
    if point is not None:
        first = point.round + 1
        if point.arrays is not None:
            arrays = point.arrays
            inner.restore_sampling(json.loads(point.server["sampling"]))
            _restore_moments(inner, point.server.get("moments", {}))
            recorder.restore(json.loads(point.server["history"]), point.round)
        if settings.privacy.central_dp and inner.keeper is not None:
            _check_central_resume(inner.keeper, point.round)
    status, error = "completed", None
    try:
        for server_round in range(first, settings.num_rounds + 1):
            arrays = _train_round(grid, strategy, inner, recorder, server_round, arrays, settings)
    except BudgetExhausted as exc:
        logger.warning("%s", exc)
        status, error = "stopped", str(exc)
    except Exception as exc:
        recorder.write(status="failed", error=f"{type(exc).__name__}: {exc}")
        if inner.keeper is not None:
            inner.keeper.ledger.close()
            logger.info("ledger left open: continue the run with --resume")
        raise
    if inner.keeper is not None:
        inner.keeper.finish(f"run ended after {len(recorder.rounds)} rounds ({status})")
    recorder.write(status=status, error=error)
    return recorder


def _train_round(
    grid: Grid,
    strategy: Strategy,
    inner: FacefedStrategy,
    recorder: RunRecorder,
    server_round: int,
    arrays: ArrayRecord,
    settings: RunSettings,
) -> ArrayRecord:
    """One round: sample, send, wait up to ``round-timeout``, validate, aggregate, evaluate, save."""
    logger.info("round %d/%d: start", server_round, settings.num_rounds)
    t0 = time.monotonic()
    messages = list(strategy.configure_train(server_round, arrays, ConfigRecord({}), grid))
    t1 = time.monotonic()
    replies, accept_s = _collect(grid, messages, settings, inner, server_round)
    t2 = time.monotonic()
    failpoint("round.replied")
    answered = {r.metadata.src_node_id for r in replies}
    missing = sorted(
        m.metadata.dst_node_id for m in messages if m.metadata.dst_node_id not in answered
    )
    if missing:
        recorder.dropouts[server_round] = missing
        for node in missing:
            inner._refuse(
                server_round, node, f"no reply within round-timeout {settings.round_timeout:g} s"
            )
    recorder.cohorts[server_round] = {"sampled": len(messages), "replied": len(replies)}
    aggregated, _ = strategy.aggregate_train(server_round, replies)
    recorder.phases[server_round] = {
        "configure_s": t1 - t0,  # sampling and building the messages
        "wait_s": t2 - t1,  # until the last reply: the sites' rounds and the transport
        "accept_s": accept_s,  # of the wait: ledger records and validation of the replies in
        "aggregate_s": time.monotonic() - t2,  # aggregation (and checks of any reply left)
    }
    if aggregated is None:
        failures = "; ".join(inner.failures.get(server_round, [])) or "no replies"
        raise FacefedError(f"round {server_round} was not aggregated ({failures})")
    failpoint("round.aggregated")
    recorder.evaluate(server_round, aggregated)
    return aggregated


def _collect(
    grid: Grid,
    messages: list[Message],
    settings: RunSettings,
    inner: FacefedStrategy,
    server_round: int,
) -> tuple[list[Message], float]:
    """Send the round's messages and gather the replies until all are in or ``round-timeout`` passes.

    Like Flower's ``Grid.send_and_receive``, but each reply is checked (its ledger record, its
    update) as soon as it arrives, while the other sites are still training, and at most
    ``dispatch-window`` messages are in flight at once (0: all). A message still unsent at the
    timeout makes its site a dropout like an unanswered one. While it waits, it shows how many sites
    have replied (:mod:`server.progress`). Returns the replies and the seconds spent checking them.
    """
    window = settings.dispatch_window or len(messages)
    unsent = list(messages)
    pending: set[str] = set()
    interval = float(getattr(grid, "pull_interval", 3.0))  # what Flower's grids wait between pulls
    deadline = time.monotonic() + settings.round_timeout
    replies: list[Message] = []
    accept_s = 0.0
    progress = RoundProgress(server_round, len(messages))
    try:
        while True:
            room = window - len(pending)
            if unsent and room > 0:
                pending.update(grid.push_messages(unsent[:room]))
                del unsent[:room]
            if not pending:
                break
            arrived = list(grid.pull_messages(pending))
            if arrived:
                progress.clear()  # checking a reply may log a refusal: not onto the status line
            started = time.monotonic()
            for reply in arrived:
                pending.discard(reply.metadata.reply_to_message_id)
                inner.accept(server_round, reply)
            accept_s += time.monotonic() - started
            replies.extend(arrived)
            progress.update(len(replies))
            if time.monotonic() >= deadline:
                break
            if not arrived:
                time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    finally:
        progress.close()
    return replies, accept_s


def _moments(strategy: FacefedStrategy) -> dict[str, Any]:
    """The server optimiser's state (FedAdam's first and second moments), if it has one."""
    return {
        name: value
        for name in ("m_t", "v_t")
        if (value := getattr(strategy, name, None)) is not None
    }


def _restore_moments(strategy: FacefedStrategy, moments: dict[str, Any]) -> None:
    for name, value in moments.items():
        setattr(strategy, name, {k: t.numpy() for k, t in value.items()})


def _check_central_resume(keeper: LedgerKeeper, after_round: int) -> None:
    """Fail closed: a client-level release recorded after the checkpoint cannot be re-run uncharged."""
    last = keeper.ledger.last_round(COORDINATOR, guarantee="client-level")
    if last is not None and last > after_round:
        raise FacefedError(
            f"the ledger records a central-DP release for round {last}, after the last usable "
            f"checkpoint (round {after_round}); re-running it would release fresh noise uncharged. "
            "Start a new run"
        )
