"""The coordinator's strategy: fixed cohorts (secret under central DP), per-site capture, weights set by
the coordinator, and fail-closed central DP."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Message,
    MetricRecord,
    RecordDict,
)

from common.config import parse_run_config
from common.errors import ConfigError, FacefedError
from common.models import EmotionNet, FaceEmbedder
from common.serde import to_arrays
from server.strategy import WEIGHT_KEY, BudgetExhausted, make_strategy
from tests.messages import site_metrics, train_message

ARRAYS = to_arrays(FaceEmbedder(8), EmotionNet(8))


def reply(node: int, **metrics_overrides: float | None) -> Message:
    metrics = MetricRecord(site_metrics(node, **metrics_overrides))
    return train_message(
        RecordDict({"arrays": ARRAYS, "metrics": metrics}),
        src_node_id=node,
        dst_node_id=0,
        message_id=f"r{node}",
        reply_to="m",
    )


def nan_reply(node: int) -> Message:
    """A reply whose update holds NaN: validation refuses it."""
    poisoned = reply(node)
    state = ARRAYS.to_torch_state_dict()
    state["face.embed.bias"] = state["face.embed.bias"] * float("nan")
    poisoned.content.array_records["arrays"] = ArrayRecord(torch_state_dict=state)
    return poisoned


class FakeGrid:
    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return list(self.nodes)


@pytest.fixture
def task_identity() -> None:
    # Messages built outside a Flower runtime need the identity the runtime would set.
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1


@pytest.mark.usefixtures("task_identity")
def test_central_dp_refuses_a_round_with_fewer_replies_than_sampled() -> None:
    settings = parse_run_config({"num-sites": 3, "cohort-size": 3, "central-dp": True})
    strategy = make_strategy(settings)
    strategy.configure_train(1, ARRAYS, ConfigRecord({}), FakeGrid([1, 2, 3]))
    arrays, _ = strategy.aggregate_train(1, [reply(1), reply(2)])  # one site dropped out
    assert arrays is None
    assert any("2 of 3 sampled sites replied" in f for f in strategy.failures[1])


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("kind", ["fedavg", "fedadam"])
def test_without_central_dp_the_remaining_replies_are_aggregated(kind: str) -> None:
    settings = parse_run_config({"num-sites": 3, "cohort-size": 3, "strategy": kind})
    strategy = make_strategy(settings)
    strategy.configure_train(1, ARRAYS, ConfigRecord({}), FakeGrid([1, 2, 3]))
    arrays, _ = strategy.aggregate_train(1, [reply(1), reply(2)])
    assert isinstance(arrays, ArrayRecord)
    assert list(arrays.keys()) == list(ARRAYS.keys())


@pytest.mark.usefixtures("task_identity")
def test_a_poisoned_reply_is_refused_and_the_others_are_aggregated() -> None:
    settings = parse_run_config({"num-sites": 3, "cohort-size": 3})
    strategy = make_strategy(settings)
    strategy.configure_train(1, ARRAYS, ConfigRecord({}), FakeGrid([1, 2, 3]))
    poisoned = nan_reply(3)
    arrays, _ = strategy.aggregate_train(1, [reply(1), reply(2), poisoned])
    assert isinstance(arrays, ArrayRecord)
    assert set(strategy.site_metrics[1]) == {1, 2}
    assert any("node 3" in f and "NaN" in f for f in strategy.failures[1])
    assert set(strategy.site_metrics[1]) == {1, 2}


@pytest.mark.usefixtures("task_identity")
def test_without_central_dp_the_cohort_is_fixed_size_and_seeded() -> None:
    settings = parse_run_config({"num-sites": 6, "cohort-size": 3, "seed": 5})
    # node ids above 2**63, as Flower issues them, must survive sampling intact
    nodes = [2**63 + 17 * i for i in range(6)]
    picks = []
    for _ in range(2):
        strategy = make_strategy(settings)
        msgs = strategy.configure_train(1, ARRAYS, ConfigRecord({}), FakeGrid(nodes))
        picks.append(sorted(m.metadata.dst_node_id for m in msgs))
    assert picks[0] == picks[1] and len(picks[0]) == 3 and set(picks[0]) <= set(nodes)


def cohorts(settings_overrides: dict, rounds: int = 4) -> list[list[int]]:
    """The cohorts of ``rounds`` rounds of a fresh strategy, 5 of 20 connected sites each."""
    settings = parse_run_config({"num-sites": 20, "cohort-size": 5, **settings_overrides})
    strategy = make_strategy(settings)
    grid = FakeGrid(list(range(1, 21)))
    return [
        sorted(
            m.metadata.dst_node_id
            for m in strategy.configure_train(r, ARRAYS, ConfigRecord({}), grid)
        )
        for r in range(1, rounds + 1)
    ]


def test_under_central_dp_the_cohort_is_secret_not_derived_from_the_seed() -> None:
    # Amplification by sampling needs a cohort the adversary cannot predict: two runs with the same
    # config (seed included) must not draw the same cohorts, as the seeded draw does.
    seeded = {"seed": 5}
    assert cohorts(seeded) == cohorts(seeded)  # the control: the seeded draw repeats
    secret = {"seed": 5, "central-dp": True}
    first, second = cohorts(secret), cohorts(secret)
    assert all(len(c) == 5 and set(c) <= set(range(1, 21)) for c in first)
    assert first != second  # equal by chance with probability 15504**-4
    assert first != cohorts(seeded)


def test_a_secret_sampler_stores_no_state_in_the_checkpoint() -> None:
    settings = parse_run_config({"num-sites": 3, "cohort-size": 2, "central-dp": True})
    strategy = make_strategy(settings)
    assert strategy.sampling_state() == {"sampler": "secret"}
    seeded = make_strategy(parse_run_config({"num-sites": 3, "cohort-size": 2}))
    strategy.restore_sampling(seeded.sampling_state())  # after a resume it simply draws afresh
    with pytest.raises(FacefedError, match="secret"):
        seeded.restore_sampling(strategy.sampling_state())


def test_run_stops_when_too_few_sites_remain_in_budget() -> None:
    settings = parse_run_config({"num-sites": 2, "cohort-size": 2})
    strategy = make_strategy(settings)

    class Exhausted:
        run_id = "r"

        def can_train(self, node: int) -> bool:
            return node != 1

    strategy.keeper = Exhausted()  # type: ignore[assignment]
    with pytest.raises(BudgetExhausted, match="only 1 of 2 sites"):
        list(strategy.configure_train(2, ARRAYS, ConfigRecord({}), FakeGrid([1, 2])))


def shifted_reply(node: int, shift: float, **metrics_overrides: float | None) -> Message:
    """A well-formed reply whose every weight is the sent model's plus ``shift``."""
    arrays = ArrayRecord({k: Array(a.numpy() + np.float32(shift)) for k, a in ARRAYS.items()})
    message = reply(node, **metrics_overrides)
    message.content["arrays"] = arrays
    return message


def mean_shift(arrays: ArrayRecord) -> float:
    return float(np.mean(arrays["face.embed.weight"].numpy() - ARRAYS["face.embed.weight"].numpy()))


@pytest.mark.usefixtures("task_identity")
def test_every_accepted_update_weighs_the_same() -> None:
    settings = parse_run_config({"num-sites": 3, "cohort-size": 3})
    strategy = make_strategy(settings)
    strategy.configure_train(1, ARRAYS, ConfigRecord({}), FakeGrid([1, 2, 3]))
    replies = [shifted_reply(1, 0.01), shifted_reply(2, 0.02), shifted_reply(3, 0.06)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert mean_shift(arrays) == pytest.approx(0.03, abs=1e-6)  # the plain mean of the three
    # what aggregation read: the validated arrays and the coordinator's weight, nothing of the site's
    for message in replies:
        assert dict(message.content.metric_records["metrics"]) == {WEIGHT_KEY: 1}
        assert list(message.content.config_records) == []


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("claim", ["num-examples", "dp-weight", WEIGHT_KEY])
def test_a_reply_that_claims_a_huge_weight_does_not_get_it(claim: str) -> None:
    # Attack: a site scales its update and claims a weight large enough to own the mean. With the
    # egress guard an honest site cannot send such a metric; the coordinator does not trust it
    # either: an unknown metric refuses the reply, and no metric of a site ever sets a weight.
    settings = parse_run_config({"num-sites": 3, "cohort-size": 3})
    strategy = make_strategy(settings)
    strategy.configure_train(1, ARRAYS, ConfigRecord({}), FakeGrid([1, 2, 3]))
    greedy = shifted_reply(3, 0.9, **{claim: 10**9})
    arrays, _ = strategy.aggregate_train(
        1, [shifted_reply(1, 0.01), shifted_reply(2, 0.03), greedy]
    )
    assert arrays is not None
    assert mean_shift(arrays) == pytest.approx(0.02, abs=1e-6)
    assert set(strategy.site_metrics[1]) == {1, 2}
    assert any("node 3" in f and "outside the agreed set" in f for f in strategy.failures[1])


@pytest.mark.usefixtures("task_identity")
def test_even_a_claimed_weight_that_passed_validation_would_not_be_read(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Defence in depth: were the whitelist ever to let a weight-like metric through, aggregation
    # still reads only the coordinator's weight, so the greedy update counts once, like the others.
    import server.validation

    rules = {**server.validation.METRIC_RULES}
    rules["num-examples"] = server.validation.MetricRule(required=False, high=1e12)
    monkeypatch.setattr(server.validation, "METRIC_RULES", rules)
    settings = parse_run_config({"num-sites": 3, "cohort-size": 3})
    strategy = make_strategy(settings)
    strategy.configure_train(1, ARRAYS, ConfigRecord({}), FakeGrid([1, 2, 3]))
    greedy = shifted_reply(3, 0.9, **{"num-examples": 10**9})
    honest = [
        shifted_reply(1, 0.01, **{"num-examples": 1}),
        shifted_reply(2, 0.03, **{"num-examples": 1}),
    ]
    arrays, _ = strategy.aggregate_train(1, [*honest, greedy])
    assert arrays is not None
    assert mean_shift(arrays) == pytest.approx((0.01 + 0.03 + 0.9) / 3, abs=1e-6)


@pytest.mark.usefixtures("task_identity")
@pytest.mark.parametrize("aggregation", ["trimmed-mean", "median"])
def test_robust_aggregation_ignores_a_poisoned_minority(aggregation: str) -> None:
    settings = parse_run_config(
        {
            "num-sites": 5,
            "cohort-size": 5,
            "aggregation": aggregation,
            "trim-fraction": 0.2,
            "max-update-norm": 1e12,  # let the poisoned update through validation to the aggregate
        }
    )
    strategy = make_strategy(settings)
    strategy.configure_train(1, ARRAYS, ConfigRecord({}), FakeGrid([1, 2, 3, 4, 5]))
    honest = [shifted_reply(n, s) for n, s in ((1, 0.01), (2, 0.02), (3, 0.03), (4, 0.04))]
    poisoned = shifted_reply(5, 900.0)  # one site scales its update far beyond the others
    arrays, _ = strategy.aggregate_train(1, [*honest, poisoned])
    assert arrays is not None
    delta = {k: arrays[k].numpy() - ARRAYS[k].numpy() for k in ARRAYS}
    assert all(np.all((d > 0.005) & (d < 0.045)) for d in delta.values())


@pytest.mark.usefixtures("task_identity")
def test_a_plain_mean_is_dragged_by_the_same_poisoned_update() -> None:
    # The control for the test above: without robust aggregation the attack works.
    settings = parse_run_config({"num-sites": 5, "cohort-size": 5, "max-update-norm": 1e12})
    strategy = make_strategy(settings)
    strategy.configure_train(1, ARRAYS, ConfigRecord({}), FakeGrid([1, 2, 3, 4, 5]))
    replies = [shifted_reply(n, 0.01 * n) for n in (1, 2, 3, 4)] + [shifted_reply(5, 900.0)]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert arrays is not None
    assert (
        float(np.min(arrays["face.embed.weight"].numpy() - ARRAYS["face.embed.weight"].numpy()))
        > 100
    )


@pytest.mark.usefixtures("task_identity")
def test_fewer_valid_replies_than_min_replies_are_not_aggregated() -> None:
    settings = parse_run_config({"num-sites": 3, "cohort-size": 3, "min-replies": 3})
    strategy = make_strategy(settings)
    strategy.configure_train(1, ARRAYS, ConfigRecord({}), FakeGrid([1, 2, 3]))
    arrays, _ = strategy.aggregate_train(1, [reply(1), reply(2)])
    assert arrays is None
    assert any("fewer than min-replies 3" in f for f in strategy.failures[1])


@pytest.mark.usefixtures("task_identity")
def test_after_a_site_leaves_the_cohort_shrinks_to_the_sites_still_connected() -> None:
    settings = parse_run_config({"num-sites": 4, "cohort-size": 4, "min-replies": 2})
    strategy = make_strategy(settings)
    strategy.rejoin_grace_s = 0.0
    assert (
        len(list(strategy.configure_train(1, ARRAYS, ConfigRecord({}), FakeGrid([1, 2, 3, 4]))))
        == 4
    )
    sent = list(strategy.configure_train(2, ARRAYS, ConfigRecord({}), FakeGrid([1, 2, 4])))
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 2, 4]
    assert any("cohort shrunk" in f for f in strategy.failures[2])
    with pytest.raises(FacefedError, match="min-replies 2 cannot be met"):
        strategy.configure_train(3, ARRAYS, ConfigRecord({}), FakeGrid([4]))


def test_robust_aggregation_cannot_be_combined_with_central_dp() -> None:
    with pytest.raises(ConfigError, match="central"):
        parse_run_config({"aggregation": "median", "central-dp": True})


@pytest.mark.usefixtures("task_identity")
def test_a_reply_is_checked_when_it_arrives_and_not_again_at_aggregation() -> None:
    settings = parse_run_config({"num-sites": 3, "cohort-size": 3})
    strategy = make_strategy(settings)
    strategy.configure_train(1, ARRAYS, ConfigRecord({}), FakeGrid([1, 2, 3]))
    poisoned = nan_reply(3)
    assert strategy.accept(1, reply(1)) is True
    assert strategy.accept(1, poisoned) is False
    assert len(strategy.failures[1]) == 1  # refused on arrival, while other sites still train
    arrays, _ = strategy.aggregate_train(1, [reply(2), poisoned])
    assert isinstance(arrays, ArrayRecord)
    assert len(strategy.failures[1]) == 1  # the verdict is reused, not checked (and logged) twice


class TrickleGrid:
    """Delivers one reply per pull, or none after ``stop``; records what happened in ``events``."""

    pull_interval = 0.01

    def __init__(self, replies: list[Message], stop: int, events: list[str]) -> None:
        self.replies, self.stop, self.events = replies, stop, events

    def push_messages(self, messages: list[Message]) -> list[str]:
        return [f"m{i}" for i, _ in enumerate(messages)]

    def pull_messages(self, ids: set[str]) -> list[Message]:
        self.events.append("pull")
        if not self.replies or len(self.replies) <= self.stop:
            return []
        out = self.replies.pop(0)
        out.metadata.__dict__["_reply_to_message_id"] = f"m{out.metadata.src_node_id - 1}"
        return [out]


def test_the_coordinator_checks_each_reply_before_waiting_for_the_next() -> None:
    from server.run import _collect

    events: list[str] = []

    class Inner:
        def accept(self, server_round: int, message: Message) -> bool:
            events.append(f"accept {message.metadata.src_node_id}")
            return True

    grid = TrickleGrid([reply(1), reply(2), reply(3)], stop=1, events=events)
    sent = [reply(n) for n in (1, 2, 3)]
    settings = parse_run_config({"num-sites": 3, "cohort-size": 3, "round-timeout": 0.2})
    replies, _ = _collect(grid, sent, settings, Inner(), 1)  # type: ignore[arg-type]
    assert [r.metadata.src_node_id for r in replies] == [1, 2]  # site 3 never answered in time
    assert events[:4] == ["pull", "accept 1", "pull", "accept 2"]


def test_a_dispatch_window_keeps_at_most_that_many_messages_in_flight() -> None:
    from server.run import _collect

    events: list[str] = []

    class Inner:
        def accept(self, server_round: int, message: Message) -> bool:
            return True

    class WindowGrid(TrickleGrid):
        def push_messages(self, messages: list[Message]) -> list[str]:
            self.events.append(f"push {len(messages)}")
            return [f"m{m.metadata.dst_node_id - 1}" for m in messages]

    grid = WindowGrid([reply(1), reply(2), reply(3)], stop=0, events=events)
    sent = [train_message(RecordDict({}), dst_node_id=n) for n in (1, 2, 3)]
    settings = parse_run_config({"num-sites": 3, "cohort-size": 3, "dispatch-window": 2})
    replies, _ = _collect(grid, sent, settings, Inner(), 1)  # type: ignore[arg-type]
    assert [r.metadata.src_node_id for r in replies] == [1, 2, 3]
    # two sent, the third only once a reply had made room
    assert events[:4] == ["push 2", "pull", "push 1", "pull"]


def test_results_json_keeps_each_sites_privacy_accounting_and_nothing_of_its_training() -> None:
    from server.run import _client_record

    record = _client_record(7, site_metrics(2))
    assert record == {
        "node_id": 7,
        "epsilon": 1.0,
        "epsilon_lifetime": 1.5,
        "delta": 1e-5,
        "steps": 4,
        "noise_multiplier": 1.1,
        "secret_noise": True,
        "egress_checked": 1,
        "egress_refused": 0,
    }
    # without DP the epsilons are infinite; optional keys a site did not send are left out
    plain = _client_record(7, site_metrics(2, dp=0, epsilon=-1.0, **{"secret-noise": None}))
    assert plain["epsilon"] == plain["epsilon_lifetime"] == "inf"
    assert "secret_noise" not in plain


@pytest.mark.parametrize("aggregation", ["mean", "trimmed-mean", "median"])
def test_no_strategy_logs_flowers_misleading_skipped_evaluation_warning(aggregation: str) -> None:
    """facefed evaluates on the coordinator; Flower's "evaluation will be skipped" would mislead."""
    import logging

    from flwr.serverapp.strategy import FedAvg

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    def warnings_while(build) -> list[str]:
        records.clear()
        flower = logging.getLogger("flwr")
        keep = Keep(level=logging.DEBUG)
        flower.addHandler(keep)
        try:
            build()
        finally:
            flower.removeHandler(keep)
        return [r.getMessage() for r in records if "evaluation will be skipped" in r.getMessage()]

    # the capture sees Flower's own strategy warn, so its silence below means something
    assert warnings_while(lambda: FedAvg(fraction_evaluate=0.0))
    assert not warnings_while(lambda: make_strategy(parse_run_config({"aggregation": aggregation})))
    assert warnings_while(lambda: FedAvg(fraction_evaluate=0.0))  # the filter did not stay behind
