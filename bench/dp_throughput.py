"""Benchmark of issue 6: DP-SGD training throughput, Opacus modes vs facefed's fast path.

Run from the repository root (about 6 minutes for the scratch models on a busy 2-core CPU; the
tails add a few minutes, most of it face-tail2 under Opacus and the fast path)::

    .venv/bin/python -m bench.dp_throughput [--threads 1] [--windows 7] [--device auto]

For each model (the scratch face embedder + its cosine head, and the emotion net, at the default widths;
and the pretrained face model's federated tail, :class:`common.facenet.resnet.FaceTail` with 0 and with 2
residual blocks + the cosine head, on the frozen trunk features of site 0's real chips, starting from
dlib's pretrained weights) it trains, in one process and on the same real batches, with: no privacy; Opacus ``hooks``, ``ghost``
(fast gradient clipping) and ``functorch``; and :class:`client.training.fast_dp.FastDpSgd`. Every step is a
training step as ``client.training.train`` takes it: a Poisson batch of site 0 of the default simulation (LFW +
ORL + Extended Yale B faces; FER2013 training images), random horizontal flips, forward, backward,
clipping to C = 1, noise sigma = 1, Adam. The tails' inputs are frozen features, not images, so (as
in ``client.training.train``) they are not flipped. Batches are indexed tensors for every mode (no DataLoader), so
the numbers compare the training steps alone.

Throughput is images/s, the median over ``--windows`` timed windows of ``--steps`` steps each, after
``--warmup`` untimed steps per mode. The modes take turns window by window (round robin, rotated each
window) so that load from other processes hits them alike; the load average is recorded. Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU; on a CPU it is the peak RSS of a fresh process that loads
the same data and takes a few steps in that mode alone (the RSS before the first step is reported too).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from opacus import PrivacyEngine
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from bench.timing import load_average, machine
from client.training.dp_random import SecretRandomness, SeededRandomness
from client.training.fast_dp import FastDpSgd, poisson_indices
from client.training.train import expected_batch, sample_rate
from common.atomic import atomic_write_text
from common.config import RunSettings
from common.model_spec import ModelSpec
from common.models import CosineHead, FaceTrainer, cosface_loss

logger = logging.getLogger(__name__)

MODES = ("non-private", "opacus-hooks", "opacus-ghost", "opacus-functorch", "fast", "fast-seeded")
MODELS = ("face", "emotion", "face-tail0", "face-tail2")
TAIL_PREFIX = "face-tail"  # "face-tailK": the pretrained face model's tail with K residual blocks
SIGMA, CLIP, SEED = 1.0, 1.0, 0
RESULTS = Path(__file__).resolve().parent / "results"


class _PerSampleLoss(nn.Module):
    """A criterion with a ``reduction`` attribute, which Opacus's ghost clipping switches to "none"."""

    def __init__(self, margin_logits: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.margin_logits = margin_logits
        self.reduction = "mean"

    def forward(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self.margin_logits(out, y), y, reduction=self.reduction)


def _cosface_logits(cosine: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # cosface_loss(c, y) == cross_entropy(_cosface_logits(c, y), y), checked in the smoke test.
    return 16.0 * (cosine - 0.2 * F.one_hot(y, cosine.shape[1]).to(cosine.dtype))


def tail_blocks(name: str) -> int | None:
    """K for a ``face-tailK`` workload, None for the scratch models."""
    return int(name.removeprefix(TAIL_PREFIX)) if name.startswith(TAIL_PREFIX) else None


def workload_settings(name: str) -> RunSettings:
    """The run settings whose site data and networks a workload uses (the defaults, or the tail's)."""
    blocks = tail_blocks(name)
    if blocks is None:
        return RunSettings()
    return RunSettings(face_model="pretrained", face_tail_blocks=blocks)


class Workload:
    """One model's data, batch size, sampling rate and loss, as ``client.training.train`` uses them."""

    def __init__(self, name: str, x: torch.Tensor, y: torch.Tensor, settings: RunSettings) -> None:
        self.name, self.x, self.y = name, x, y
        self.face = name == "face" or tail_blocks(name) is not None
        self.images = tail_blocks(name) is None  # else frozen features: not flipped
        self.spec = ModelSpec.from_settings(settings)
        batch = settings.face_batch if self.face else settings.emotion_batch
        self.q = sample_rate(batch, len(y))
        self.expected = int(len(y) * self.q)  # Opacus's expected_batch_size
        self.batch = expected_batch(batch, len(y))
        self.width = settings.face_width if self.face else settings.emotion_width
        self.lr = settings.face_lr if self.face else settings.emotion_lr
        self.classes = int(y.max()) + 1

    def model(self, device: torch.device) -> nn.Module:
        """The module a site trains: the run's initial network (+ a cosine head for faces)."""
        with torch.random.fork_rng(devices=[]):
            face, emotion = self.spec.initial(SEED)  # the pretrained tail for face-tailK
            torch.manual_seed(SEED)
            if self.face:
                return FaceTrainer(face, CosineHead(self.classes)).to(device)
            return emotion.to(device)

    def loss(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return cosface_loss(out, y) if self.face else F.cross_entropy(out, y)

    def criterion(self) -> _PerSampleLoss:
        return _PerSampleLoss(_cosface_logits if self.face else (lambda out, _y: out))


Step = Callable[[torch.Tensor, torch.Tensor], None]


def make_step(work: Workload, mode: str, device: torch.device) -> Step:
    """Build ``mode``'s training step for ``work``: ``step(x, y)`` takes one optimizer step."""
    module = work.model(device)
    optimizer = torch.optim.Adam(module.parameters(), lr=work.lr)
    noise = torch.Generator(device=device).manual_seed(SEED)
    if mode == "non-private":

        def plain(x: torch.Tensor, y: torch.Tensor) -> None:
            optimizer.zero_grad(set_to_none=True)
            work.loss(module(x), y).backward()
            optimizer.step()

        return plain
    if mode in ("fast", "fast-seeded"):
        # "fast" is what a site runs: noise and sampling from the OS CSPRNG; "fast-seeded" the same
        # step with torch's seeded generator (research opt-in), to show what the secret draw costs
        randomness = SecretRandomness() if mode == "fast" else SeededRandomness(noise)
        fast = FastDpSgd(
            module,
            optimizer,
            work.loss,
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            expected_batch_size=work.expected,
            sample_rate=work.q,
            accountant=RDPAccountant(),
            randomness=randomness,
        )

        def private_fast(x: torch.Tensor, y: torch.Tensor) -> None:
            fast.step(x, y)

        return private_fast
    loader = DataLoader(TensorDataset(work.x, work.y), batch_size=work.batch)
    gsm = mode.removeprefix("opacus-")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private = PrivacyEngine(accountant="rdp", secure_mode=False).make_private(
            module=module,
            optimizer=optimizer,
            data_loader=loader,
            criterion=work.criterion() if gsm == "ghost" else nn.CrossEntropyLoss(),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            poisson_sampling=True,
            noise_generator=noise,
            grad_sample_mode=gsm,
        )
    dp_module, dp_opt = private[0], private[1]
    criterion = private[2] if gsm == "ghost" else work.loss

    def opacus(x: torch.Tensor, y: torch.Tensor) -> None:
        dp_opt.zero_grad(set_to_none=True)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            criterion(dp_module(x), y).backward()
        dp_opt.step()

    return opacus


class Batches:
    """Poisson batches with random flips, the same sequence for every mode (its own generator)."""

    def __init__(self, work: Workload, device: torch.device) -> None:
        self.work, self.device = work, device
        self.rng = torch.Generator().manual_seed(SEED)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        idx = poisson_indices(len(self.work.y), self.work.q, SeededRandomness(self.rng))
        x, y = self.work.x[idx], self.work.y[idx]
        flip = torch.rand(len(y), generator=self.rng) < 0.5
        if self.work.images:
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return x.to(self.device), y.to(self.device)


def _run(step: Step, batches: Batches, steps: int, device: torch.device) -> tuple[int, float]:
    data = [batches.next() for _ in range(steps)]  # sampled outside the timed region
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for x, y in data:
        step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return sum(len(y) for _, y in data), time.perf_counter() - start


def throughput(
    work: Workload, modes: Sequence[str], args: argparse.Namespace, device: torch.device
) -> dict[str, dict[str, Any]]:
    """Images/s per mode: median of round-robin timed windows after warm-up."""
    results: dict[str, dict[str, Any]] = {}
    steps: dict[str, Step] = {}
    batches: dict[str, Batches] = {}
    for mode in modes:
        try:
            steps[mode] = make_step(work, mode, device)
            batches[mode] = Batches(work, device)
            _run(steps[mode], batches[mode], args.warmup, device)
        except Exception as exc:  # a mode Opacus cannot run on this model is a result, not a crash
            logger.warning("%s %s failed: %s", work.name, mode, exc)
            results[mode] = {"status": f"failed: {type(exc).__name__}: {exc}"[:300]}
            steps.pop(mode, None)
    rates: dict[str, list[float]] = {m: [] for m in steps}
    order = list(steps)
    for window in range(args.windows):
        for mode in order[window % len(order) :] + order[: window % len(order)]:
            images, seconds = _run(steps[mode], batches[mode], args.steps, device)
            rates[mode].append(images / seconds)
        logger.info("%s window %d/%d done", work.name, window + 1, args.windows)
    base = statistics.median(rates["non-private"]) if "non-private" in rates else None
    for mode, values in rates.items():
        median = statistics.median(values)
        results[mode] = {
            "status": "ok",
            "images_per_s": round(median, 2),
            "windows_images_per_s": [round(v, 2) for v in values],
            "ratio_vs_non_private": round(median / base, 3) if base else None,
        }
    return results


def _status_mib(field: str) -> float:
    """A ``/proc/self/status`` memory field in MiB (``VmRSS`` now, ``VmHWM`` the peak since exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024  # kB
    raise OSError(f"{field} not in /proc/self/status")


def probe_memory(work: Workload, mode: str, steps: int, device: torch.device) -> dict[str, float]:
    """Peak memory of ``steps`` steps in ``mode`` (CUDA: allocated bytes; CPU: this process's RSS)."""
    step, batches = make_step(work, mode, device), Batches(work, device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device) / 2**20
        _run(step, batches, steps, device)
        peak = torch.cuda.max_memory_allocated(device) / 2**20
        return {"peak_mib": round(peak, 1), "before_mib": round(before, 1)}
    # ru_maxrss would not do: Linux carries the parent's peak across fork + exec.
    before = _status_mib("VmRSS")
    _run(step, batches, steps, device)
    peak = _status_mib("VmHWM")
    return {"peak_rss_mib": round(peak, 1), "rss_before_steps_mib": round(before, 1)}


def _cpu_memory(work: Workload, mode: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    data = tmp / f"{work.name}.pt"
    if not data.exists():
        torch.save({"x": work.x, "y": work.y}, data)
    cmd = [sys.executable, "-m", "bench.dp_throughput", "--probe", work.name, mode, str(data)]
    cmd += ["--threads", str(args.threads), "--steps", str(args.steps)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return {"memory_status": f"failed: {done.stderr.strip().splitlines()[-1:]}"}
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def load_workloads(names: Sequence[str], limit: int = 0) -> list[Workload]:
    """Site 0 of the default simulation, as ``client.training.site_data`` builds it (real faces; for
    a ``face-tailK`` workload, the frozen trunk features of the site's real chips)."""
    from client.training.site_data import SiteSpec, load_site_tensors

    out = []
    for name in names:
        if name not in MODELS:
            raise SystemExit(f"unknown model {name!r}; use some of {', '.join(MODELS)}")
        settings = workload_settings(name)
        data = load_site_tensors(settings, SiteSpec(0, settings.num_sites))
        if name == "emotion":
            x, y = data.emotion_x, data.emotion_y
        else:
            x, y = data.face_x, data.face_y
        if limit:
            x, y = x[:limit], y[:limit]
        out.append(Workload(name, x, y, settings))
    return out


def markdown(report: dict[str, Any]) -> str:
    """The results as a Markdown table per model."""
    lines = [
        f"# DP-SGD throughput ({report['device']}, {report['threads']} thread(s))",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cpus_usable']} usable CPUs. "
        f"Load average before/after: {report['load_before']} / {report['load_after']}. "
        f"Median of {report['windows']} windows of {report['steps']} steps, "
        f"{report['warmup']} warm-up steps per mode; sigma = {SIGMA}, C = {CLIP}.",
        "",
    ]
    mem_key = "peak_mib" if report["device"].startswith("cuda") else "peak_rss_mib"
    for model, modes in report["results"].items():
        info = report["workloads"][model]
        lines += [
            f"## {model} (N = {info['n']}, q = {info['q']:.4f}, expected batch {info['expected']})",
            "",
            "| mode | images/s (median) | min-max over windows | vs non-private | peak memory MiB |",
            "|---|---|---|---|---|",
        ]
        for mode, r in modes.items():
            if r.get("status") != "ok":
                lines.append(f"| {mode} | {r.get('status')} | | | |")
                continue
            w = r["windows_images_per_s"]
            lines.append(
                f"| {mode} | {r['images_per_s']:.1f} | {min(w):.1f}-{max(w):.1f} | "
                f"{r['ratio_vs_non_private']:.2f} | {r.get(mem_key, r.get('memory_status', ''))} |"
            )
        lines.append("")
    return "\n".join(lines)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a site uses 1)")
    p.add_argument("--windows", type=int, default=7)
    p.add_argument("--steps", type=int, default=3, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--limit", type=int, default=0, help="use only the first N examples (smoke)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory probes")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--probe", nargs=3, metavar=("MODEL", "MODE", "DATA"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; write ``dp_throughput.json`` and ``.md`` under ``--out``."""
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    if args.probe:
        model, mode, path = args.probe
        data = torch.load(path)
        work = Workload(model, data["x"], data["y"], workload_settings(model))
        print(json.dumps(probe_memory(work, mode, args.steps + 2, device)))
        return 0
    # force: Opacus configures the root logger at import.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", force=True)
    modes = [m for m in args.modes.split(",") if m]
    report: dict[str, Any] = {
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": args.threads,
        "machine": machine(),
        "windows": args.windows,
        "steps": args.steps,
        "warmup": args.warmup,
        "torch": torch.__version__,
        "load_before": load_average(),
        "workloads": {},
        "results": {},
    }
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for work in load_workloads(args.models.split(","), args.limit):
            report["workloads"][work.name] = {
                "n": len(work.y),
                "q": work.q,
                "expected": work.expected,
            }
            results = throughput(work, modes, args, device)
            for mode, r in results.items():
                if r["status"] == "ok" and not args.no_memory:
                    r.update(
                        probe_memory(work, mode, args.steps, device)
                        if device.type == "cuda"
                        else _cpu_memory(work, mode, args, Path(tmp))
                    )
            report["results"][work.name] = results
    report["load_after"] = load_average()
    report["seconds"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.out / "dp_throughput.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(args.out / "dp_throughput.md", markdown(report) + "\n")
    logger.info("wrote %s", args.out / "dp_throughput.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
