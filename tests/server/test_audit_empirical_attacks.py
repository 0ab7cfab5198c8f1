"""Attacks on ``facefed audit empirical`` and its bound (commit 9437362).

Claims attacked: the bound is a valid lower bound at the stated confidence (so a correct
implementation is accused, exit 4, at most that often); bad input is one ``facefed: error:`` line and a
non-zero exit, never a traceback or a hang. Failing tests are breaks; passing ones are regressions.
"""

from __future__ import annotations

import math
import signal

import numpy as np
import pytest
import scipy.stats
import torch

import client.training.audit_run as audit_run
import client.training.site_data as site_data
from client.training.audit_run import AuditResult
from client.training.train import SiteTensors
from common.cli import main
from common.errors import ConfigError
from common.privacy.audit_bound import check_design, epsilon_lower_bound, p_value
from tests.server.test_audit_empirical import SCENARIO

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def reference_p_value(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """Steinke, Nasr and Jagielski 2023, Algorithm 2 / appendix D, as the paper writes it."""
    q = 1 / (1 + math.exp(-eps))
    beta = scipy.stats.binom.sf(v - 1, r, q)
    alpha = 0.0
    total = 0.0
    for i in range(1, v + 1):
        total += scipy.stats.binom.pmf(v - i, r, q)
        if total > i * alpha:
            alpha = total / i
    return min(beta + alpha * delta * 2 * m, 1.0)


@pytest.mark.parametrize(
    ("m", "r", "v", "eps", "delta"),
    [
        (1000, 100, 90, 2.0, 1e-5),
        (1000, 100, 100, 0.5, 0.0),
        (5000, 1000, 620, 0.3, 1e-5),
        (200, 200, 150, 1.0, 1e-3),
        (10**5, 50, 40, 4.0, 1e-6),
        (100, 10, 0, 1.0, 1e-2),
    ],
)
def test_the_p_value_is_the_papers(m: int, r: int, v: int, eps: float, delta: float) -> None:
    assert p_value(m, r, v, eps, delta) == pytest.approx(
        reference_p_value(m, r, v, eps, delta), rel=1e-9, abs=1e-15
    )


@pytest.mark.parametrize("eps", [0.05, 0.5, 1.0, 4.0])
@pytest.mark.parametrize(("m", "r", "delta"), [(2000, 200, 1e-5), (1000, 1000, 0.0)])
def test_one_audit_of_the_worst_eps_dp_mechanism_refutes_eps_at_most_five_percent_of_the_time(
    eps: float, m: int, r: int, delta: float
) -> None:
    """Exact: right guesses ~ Binomial(r, e^eps / (1 + e^eps)) (eps-DP randomised response, the
    dominating case of the theorem); P[bound > eps] summed over the outcomes."""
    q = 1 / (1 + math.exp(-eps))
    low, high = -1, r + 1  # the bound grows with v: the fewest right answers that refute eps
    while high - low > 1:
        middle = (low + high) // 2
        if epsilon_lower_bound(m, r, middle, delta) > eps:
            high = middle
        else:
            low = middle
    accused = float(scipy.stats.binom.sf(high - 1, r, q)) if high <= r else 0.0
    assert accused <= 0.05 + 1e-9


def _fake_audit(seed: int):
    """``audit_site`` for a *correct* mechanism at its claimed epsilon (worst case: eps-DP randomised
    response on every guess), with the bound computed exactly as ``audit_site`` computes it."""
    rng = np.random.default_rng(seed)

    def audit_site(settings, data, design, randomness, *, control=False) -> AuditResult:
        eps = settings.privacy.max_epsilon
        correct = int(rng.binomial(design.guesses, 1 / (1 + math.exp(-eps))))
        return AuditResult(
            unit=settings.privacy.dp_unit,
            control=control,
            claimed_epsilon=math.inf if control else eps,
            delta=settings.privacy.delta,
            accountant=settings.privacy.accountant,
            noise_multiplier=1.0,
            sample_rate=0.1,
            steps=1,
            canaries=design.canaries,
            included=design.canaries // 2,
            guesses=design.guesses,
            correct=correct,
            confidence=design.confidence,
            bound=epsilon_lower_bound(
                design.canaries, design.guesses, correct, settings.privacy.delta, design.confidence
            ),
            seconds=0.0,
        )

    return audit_site


def test_repeated_audits_of_a_correct_mechanism_accuse_it_at_most_at_the_stated_confidence(
    tmp_path, monkeypatch, capsys
) -> None:
    """``--repeats k`` refutes the claim when *any* repeat's 95% bound is above it (``bound_max``,
    ``within_claim = all(...)``): for a correct mechanism that is 1 - 0.95^k, about 40% at k = 10,
    and exit 4 says "the implementation adds less privacy than it claims". (Several ``--epsilon``
    values and units compound it the same way.) Fix: a Bonferroni-corrected confidence."""
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO)
    monkeypatch.setattr(site_data, "load_site_tensors", lambda settings, spec: None)
    trials, accused = 60, 0
    for seed in range(trials):
        monkeypatch.setattr(audit_run, "audit_site", _fake_audit(seed))
        code = main(
            [
                "audit", "empirical", "--scenario", str(scenario), "--epsilon", "1",
                "--canaries", "2000", "--guesses", "200", "--repeats", "10",
            ]
        )  # fmt: skip
        assert code in (0, 4)
        accused += code == 4
    capsys.readouterr()
    # at 5%, P[Binomial(60, 0.05) > 8] < 0.4%
    assert accused <= 8, f"a correct mechanism was accused in {accused} of {trials} runs"


class _Slow(Exception):
    pass


def test_an_audit_design_with_too_many_canaries_is_refused_promptly() -> None:
    """``--canaries 100000000``: the delta term 2 m delta makes every bound 0, and ``check_design``
    then walks ``range(r, m + 1)`` one guess count at a time, an O(n) p-value each, for minutes
    (quadratic), before ``DiracCanaries.draw`` refuses that many canaries with a traceback anyway."""

    def alarm(signum, frame):
        raise _Slow

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(5)
    try:
        with pytest.raises(ConfigError):
            check_design(10**8, 1000, 1e-5, 0.95)
    except _Slow:
        pytest.fail("check_design(1e8 canaries) was still searching after 5 s")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _one_error_line(capsys, argv: list[str]) -> tuple[int, str]:
    code = main(argv)
    err = capsys.readouterr().err
    # log lines (INFO) may come first; the error itself must be exactly one line
    errors = [line for line in err.splitlines() if line.startswith("facefed: error: ")]
    assert "Traceback" not in err, err
    return code, errors[0] if len(errors) == 1 else err.strip()


@pytest.mark.parametrize(
    "extra",
    [
        ["--canaries", "40000", "--guesses", "1000"],  # more canaries than released coordinates
        ["--unit", "person", "--set", "person-max-images=100000000000000000000000"],
    ],
    ids=["canaries-above-coordinates", "huge-person-max-images"],
)
def test_bad_audit_input_is_one_error_line(tmp_path, monkeypatch, capsys, extra) -> None:
    scenario = tmp_path / "s.toml"
    scenario.write_text(SCENARIO.replace("face-steps = 20", "face-steps = 1").replace(
        "num-rounds = 2", "num-rounds = 1"))  # fmt: skip
    # the refusal comes before any training: a small stand-in site (pooled 256-d trunk features)
    people = torch.arange(10).repeat_interleave(4)
    fake = SiteTensors(
        torch.randn(40, 256, generator=torch.Generator().manual_seed(0)),
        people,
        torch.zeros(4, 1, 48, 48),
        torch.arange(4),
    )
    monkeypatch.setattr(site_data, "load_site_tensors", lambda settings, spec: fake)
    argv = ["audit", "empirical", "--scenario", str(scenario), "--epsilon", "8"]
    try:
        code, err = _one_error_line(
            capsys, [*argv, "--canaries", "200", "--guesses", "100", *extra]
        )
    except Exception as exc:
        pytest.fail(f"traceback instead of one error line: {type(exc).__name__}: {exc}")
    assert code != 0
    assert err.startswith("facefed: error: ") and "\n" not in err, err
