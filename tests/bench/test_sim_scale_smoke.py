"""The simulation-scale benchmark's time split and report, on synthetic ``results.json`` records.

Arithmetic only: these tests make no claim about speed or accuracy.
"""

from __future__ import annotations

import os
from typing import Any

import pytest

from bench.sim_scale import markdown, process_tree, split_round, summarise


def _round(number: int, wall: float, evaluation: float, train: list[float]) -> dict[str, Any]:
    return {
        "round": number,
        "time_s": wall,
        "eval_s": evaluation,
        "clients": {f"site-{i}": {"train_s": t} for i, t in enumerate(train)},
    }


def test_training_is_the_sites_summed_train_time_over_the_concurrent_actors() -> None:
    split = split_round(_round(2, wall=20.0, evaluation=4.0, train=[3.0, 5.0, 4.0, 4.0]), actors=2)
    assert split.train_sum_s == 16.0
    assert split.train_s == 8.0
    assert split.overhead_s == pytest.approx(20.0 - 4.0 - 8.0)
    assert split.overhead_frac == pytest.approx(8.0 / 20.0)
    assert split.sites == 4


def test_more_actors_than_sites_run_only_as_many_at_once_as_there_are_sites() -> None:
    split = split_round(_round(1, wall=10.0, evaluation=1.0, train=[6.0, 6.0]), actors=8)
    assert split.train_s == 6.0
    assert split.overhead_s == pytest.approx(3.0)


def test_steady_state_is_the_median_of_the_rounds_after_the_first() -> None:
    results = {
        "config": {"num-sites": 2},
        "rounds": [
            _round(1, wall=100.0, evaluation=5.0, train=[10.0, 10.0]),  # start-up: excluded
            _round(2, wall=20.0, evaluation=5.0, train=[10.0, 10.0]),
            _round(3, wall=30.0, evaluation=5.0, train=[10.0, 10.0]),
            _round(4, wall=40.0, evaluation=5.0, train=[10.0, 10.0]),
        ],
    }
    summary = summarise(results, actors=2)
    assert summary["steady"]["rounds"] == [2, 3, 4]
    assert summary["steady"]["wall_s"] == 30.0
    assert summary["steady"]["overhead_s"] == 15.0
    assert summary["all_sites_every_round"] is True
    assert [r["round"] for r in summary["rounds"]] == [1, 2, 3, 4]


def test_a_round_missing_a_site_is_flagged() -> None:
    results = {
        "config": {"num-sites": 3},
        "rounds": [_round(1, wall=10.0, evaluation=1.0, train=[1.0, 1.0])],
    }
    summary = summarise(results, actors=2)
    assert summary["all_sites_every_round"] is False
    assert summary["steady"]["rounds"] == [1]


def test_a_reply_without_train_time_is_refused_not_counted_as_zero() -> None:
    record = _round(1, wall=10.0, evaluation=1.0, train=[1.0])
    record["clients"]["site-1"] = {"train_s": None}
    with pytest.raises(ValueError, match="train_s"):
        split_round(record, actors=2)
    with pytest.raises(ValueError, match="actors"):
        split_round(_round(1, wall=10.0, evaluation=1.0, train=[1.0]), actors=0)


def test_report_table_has_a_row_per_round_with_the_overhead_share() -> None:
    results = {"config": {"num-sites": 2}, "rounds": [_round(1, 10.0, 1.0, [4.0, 4.0])]}
    scale = {
        "sites": 2,
        "actors": 2,
        "status": "completed",
        "process_wall_s": 30.0,
        "outside_rounds_s": 20.0,
        "memory": {
            "peak_rss_gib": 1.0,
            "peak_pss_gib": 0.5,
            "peak_actor_rss_gib": 0.2,
            "actor_processes_seen": 2,
        },
        **summarise(results, actors=2),
    }
    report = {
        "machine": {"cpu": "test cpu", "cpus_usable": 2},
        "mem_total_gib": 4.0,
        "load_start": (1.0, 1.0, 1.0),
        "load_end": (1.0, 1.0, 1.0),
        "scales": [scale],
    }
    table = markdown(report)
    assert "| 2 | 2 | 1 | 10.0 | 1.0 | 4.0 | 5.0 | 50% |" in table
    assert "| 2 | completed | True | 50% ([1]) | 1.0 / 0.5 | 0.2 | 2 | 30, 20.0 |" in table


def test_process_tree_holds_this_process() -> None:
    assert os.getpid() in process_tree(os.getpid())


def test_the_overhead_splits_into_the_coordinator_phases_and_the_site_path() -> None:
    first = _round(1, wall=30.0, evaluation=4.0, train=[4.0, 4.0])
    first["phases"] = {"configure_s": 0.5, "wait_s": 20.0, "aggregate_s": 1.0, "save_s": 0.25}
    second = _round(2, wall=20.0, evaluation=4.0, train=[4.0, 4.0])
    second["phases"] = {
        "configure_s": 0.5,
        "wait_s": 12.0,
        "accept_s": 0.75,  # checking replies as they arrive, within the wait
        "aggregate_s": 1.5,
        "save_s": 0.25,
    }
    split = split_round(second, actors=2, previous=first)
    assert split.overhead_s == pytest.approx(12.0)
    assert split.coordinator_s == pytest.approx(0.5 + 0.75 + 1.5 + 0.25)  # and round 1's save
    assert split.site_path_s == pytest.approx(12.0 - 3.0)
    summary = summarise({"config": {"num-sites": 2}, "rounds": [first, second]}, actors=2)
    assert summary["rounds"][0]["coordinator_s"] == pytest.approx(1.5)  # no checkpoint before it
    assert summary["steady"]["site_path_s"] == pytest.approx(9.0)


def test_a_run_without_phase_timings_reports_the_split_as_unmeasured() -> None:
    summary = summarise(
        {"config": {"num-sites": 2}, "rounds": [_round(1, 10.0, 1.0, [4.0, 4.0])]}, actors=2
    )
    assert summary["rounds"][0]["coordinator_s"] is None
    assert summary["steady"]["site_path_s"] is None
