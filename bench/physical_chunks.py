"""Seconds per DP step of the default emotion head at several physical chunk sizes.

The default run's emotion model trains on one simulated site's real FER2013 input maps (site 0 of
``simulations/default.toml``: dlib's trunk map and the log wavelet scattering of each face and its
mirror image). Each chunk size takes the same Poisson batches (seeded: a benchmark, not a release)
and forms the same clipped sum; only the speed differs (``client/training/fast_dp.py``,
``PHYSICAL_BATCH``). Results: BENCHMARKS.md, issue 6, "Physical chunks".

    python -m bench.physical_chunks --threads 1 --chunks 16,32,48,64,128,256 [--baseline 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from opacus.accountants import RDPAccountant

from client.training.dp_random import SeededRandomness
from client.training.fast_dp import FastDpSgd
from client.training.site_data import SiteSpec, load_site_tensors
from client.training.train import make_optimizer, run_fast_steps, sample_rate
from common.model_spec import ModelSpec
from simulations.scenarios import load_scenario, resolve


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (a site uses 1)")
    p.add_argument("--chunks", default="64,128", help="physical chunk sizes, comma-separated")
    p.add_argument("--steps", type=int, default=8, help="timed steps per window")
    p.add_argument("--windows", type=int, default=3, help="timed windows per chunk size")
    p.add_argument(
        "--baseline",
        type=int,
        default=128,
        help="the chunk size ratios are against (one of --chunks)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    settings = resolve(load_scenario("default"), {})
    data = load_site_tensors(settings, SiteSpec(0, settings.num_sites))
    n = len(data.emotion_y)
    q = sample_rate(settings.emotion_batch, n)
    chunks = [int(c) for c in args.chunks.split(",")]
    if args.baseline not in chunks:
        raise SystemExit(f"--baseline {args.baseline} is not one of --chunks {args.chunks}")
    seconds: dict[int, list[float]] = {c: [] for c in chunks}
    for _ in range(args.windows):  # the chunk sizes alternate, so a slower minute hits them all
        for chunk in chunks:
            torch.manual_seed(0)
            _, emotion = ModelSpec.from_settings(settings).build()
            dp = FastDpSgd(
                emotion,
                make_optimizer(emotion, "adam", settings.emotion_lr, settings.momentum),
                F.cross_entropy,
                noise_multiplier=2.0,
                max_grad_norm=settings.privacy.emotion_clip,
                expected_batch_size=int(n * q),
                sample_rate=q,
                accountant=RDPAccountant(),
                randomness=SeededRandomness(torch.Generator().manual_seed(0)),
                physical_batch=chunk,
            )
            mirror = torch.Generator().manual_seed(0)
            run_fast_steps(dp, data.emotion_x, data.emotion_y, 1, mirror, None)  # warm-up
            start = time.perf_counter()
            run_fast_steps(dp, data.emotion_x, data.emotion_y, args.steps, mirror, None)
            seconds[chunk].append((time.perf_counter() - start) / args.steps)
    base = statistics.median(seconds[args.baseline])
    print(f"{n} faces, batch {settings.emotion_batch}, {args.threads} thread(s)")
    for chunk in chunks:
        median = statistics.median(seconds[chunk])
        runs = " ".join(f"{s:.3f}" for s in seconds[chunk])
        print(
            f"chunk {chunk:4d}: {median:.3f} s/step (windows {runs}), "
            f"{base / median:.2f}x as fast as chunks of {args.baseline}"
        )


if __name__ == "__main__":
    main()
