"""``deploy submit``'s live view of a run: a growing results.json, a fake clock, fake node listings."""

from __future__ import annotations

import datetime as dt
import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from server import deploy_flwr
from server.deploy_watch import RunWatch, file_stamp, format_when, site_absence

NOW = dt.datetime(2026, 12, 2, 21, 40, tzinfo=dt.UTC)
RUNNING = {"status": "running"}


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _round(n: int, eps: float) -> dict[str, Any]:
    return {
        "round": n,
        "face": {"lfw_accuracy": 0.70 + n / 100, "lfw_std": 0.01},
        "emotion": {"accuracy": 0.40 + n / 100, "macro_f1": 0.3},
        "clients": {
            f"site-{i}": {"epsilon": eps, "budget_epsilon": 8.0, "node_id": i} for i in (2, 1)
        },
        "cohort": {"sampled": 2, "replied": 2},
        "dropouts": [],
        "failures": [],
        "time_s": 95.0,
    }


def _write(path: Path, rounds: list[dict[str, Any]], status: str = "running") -> None:
    doc = {"status": status, "config": {"num-rounds": 3}, "rounds": rounds}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


def _online(*sites: str) -> list[dict[str, Any]]:
    return [{"site": s, "status": "online", "node-id": str(i)} for i, s in enumerate(sites)]


def _watch(
    results: Path | None, rows: list[dict[str, Any]], clock: Clock, **kwargs: Any
) -> tuple[RunWatch, list[str], io.StringIO]:
    lines: list[str] = []
    stream = io.StringIO()
    watch = RunWatch(
        run_id=7, results=results, baseline=file_stamp(results) if results else None,
        num_sites=2, nodes=lambda: rows, clock=clock, now=lambda: NOW, stream=stream,
        tty=kwargs.pop("tty", False), emit=lines.append, **kwargs,
    )  # fmt: skip
    return watch, lines, stream


def test_each_round_is_reported_once_as_results_json_grows(tmp_path: Path) -> None:
    results, clock = tmp_path / "results.json", Clock()
    watch, lines, _ = _watch(results, _online("site-1", "site-2"), clock)

    watch.poll(RUNNING)
    _write(results, [_round(1, 1.234)])
    watch.poll(RUNNING)
    watch.poll(RUNNING)
    _write(results, [_round(1, 1.234), _round(2, 2.5)], status="completed")
    watch.poll({"status": "finished:completed"})

    rounds = [line for line in lines if "done" in line]
    assert rounds == [
        "round 1/3 done: LFW 0.710, FER 0.410 | epsilon site-1 1.23 of 8, site-2 1.23 of 8 "
        "| 2/2 sites replied | 1 min 35 s",
        "round 2/3 done: LFW 0.720, FER 0.420 | epsilon site-1 2.50 of 8, site-2 2.50 of 8 "
        "| 2/2 sites replied | 1 min 35 s",
    ]


def test_results_left_by_an_earlier_run_are_ignored_until_they_change(tmp_path: Path) -> None:
    results, clock = tmp_path / "results.json", Clock()
    _write(results, [_round(1, 5.0), _round(2, 6.0)], status="completed")  # the previous run
    watch, lines, _ = _watch(results, _online("site-1", "site-2"), clock)

    watch.poll(RUNNING)
    assert not [line for line in lines if "done" in line]
    _write(results, [_round(1, 0.5)])  # the new run's first round (the old file was archived)
    watch.poll(RUNNING)

    (done,) = [line for line in lines if "done" in line]
    assert done.startswith("round 1/3 done") and "site-1 0.50 of 8" in done


def test_a_damaged_results_file_is_skipped_and_read_again_next_poll(tmp_path: Path) -> None:
    results, clock = tmp_path / "results.json", Clock()
    watch, lines, _ = _watch(results, _online("site-1", "site-2"), clock)
    results.write_text('{"rounds": [')

    watch.poll(RUNNING)
    _write(results, [_round(1, 1.0)])
    watch.poll(RUNNING)

    assert sum("done" in line for line in lines) == 1


def test_waiting_for_an_offline_site_names_it_and_when_it_was_last_seen() -> None:
    clock = Clock()
    rows = [
        *_online("site-1"),
        {"site": "site-2", "status": "offline", "offline-at": "2026-12-02T21:35:10+00:00"},
        {"site": "site-3", "status": "revoked"},
    ]
    watch, lines, _ = _watch(None, rows, clock)

    watch.poll(RUNNING)

    assert lines == [
        "waiting for site-2 (offline since 21:35): 1 of the 2 sites the run needs are online (0 s)"
    ]


def test_sites_that_never_come_are_reported_early_with_what_to_do() -> None:
    clock = Clock()
    rows = [*_online("site-1"), {"site": "site-2", "status": "registered", "online-at": None}]
    watch, lines, _ = _watch(None, rows, clock, warn_after_s=60.0)

    for _ in range(10):  # 10 polls, 10 s apart: 90 s of waiting
        watch.poll(RUNNING)
        clock.t += 10.0

    warnings = [line for line in lines if "not connected after" in line]
    assert len(warnings) == 1
    assert "site-2 (never connected): not connected after 1 min 00 s" in warnings[0]
    assert "the run fails in about 9 min 00 s" in warnings[0]
    assert "flwr stop 7" in warnings[0]


def test_no_warning_once_every_site_is_online() -> None:
    clock = Clock()
    rows = _online("site-1", "site-2")
    watch, lines, _ = _watch(None, rows, clock, warn_after_s=60.0)

    for _ in range(10):
        watch.poll(RUNNING)
        clock.t += 10.0

    assert not any("not connected" in line for line in lines)
    assert lines[0] == "round 1: waiting for the sites' replies (0 s)"


def test_without_a_terminal_an_unchanged_state_is_logged_once_per_interval() -> None:
    clock = Clock()
    watch, lines, _ = _watch(None, _online("site-1", "site-2"), clock, interval_s=60.0)

    for _ in range(13):  # 0, 10, ..., 120 s
        watch.poll(RUNNING)
        clock.t += 10.0

    assert lines == [
        "round 1: waiting for the sites' replies (0 s)",
        "round 1: waiting for the sites' replies (1 min 00 s)",
        "round 1: waiting for the sites' replies (2 min 00 s)",
    ]


def test_on_a_terminal_the_state_is_one_line_rewritten_and_rounds_are_lasting_lines(
    tmp_path: Path,
) -> None:
    results, clock = tmp_path / "results.json", Clock()
    watch, lines, stream = _watch(results, _online("site-1", "site-2"), clock, tty=True)

    watch.poll({"status": "starting"})
    watch.poll(RUNNING)
    _write(results, [_round(1, 1.0)])
    clock.t += 5
    watch.poll(RUNNING)
    watch.poll({"status": "finished:completed"})

    screen = stream.getvalue()
    assert "\rrun 7 starting: the SuperLink is starting the ServerApp (0 s)" in screen
    assert "\rround 2/3: training on the sites (0 s)" in screen
    assert "\n" not in screen  # the status line never scrolls
    assert screen.endswith("\r")  # cleared at the end
    assert lines == [lines[0]] and lines[0].startswith("round 1/3 done")


def test_the_node_listing_is_asked_at_most_every_few_seconds_and_a_failure_keeps_the_last() -> None:
    clock, calls = Clock(), []

    def nodes() -> list[dict[str, Any]]:
        calls.append(clock.t)
        if len(calls) == 2:
            raise deploy_flwr.FlwrError("SuperLink busy")
        return _online("site-1", "site-2")

    watch = RunWatch(
        run_id=1, results=None, baseline=None, num_sites=2, nodes=nodes, clock=clock,
        now=lambda: NOW, stream=io.StringIO(), tty=False, emit=lambda _l: None, nodes_every_s=10.0,
    )  # fmt: skip
    for _ in range(7):  # 0 .. 30 s, every 5 s
        watch.poll(RUNNING)
        clock.t += 5.0

    assert calls == [1000.0, 1010.0, 1020.0, 1030.0]
    assert len(watch.rows) == 2


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"status": "offline", "offline-at": "2026-12-02T21:35:00+00:00"}, "offline since 21:35"),
        ({"status": "offline", "offline-at": "2026-11-30T08:05:00+00:00"}, "offline since 2026-11-30 08:05"),
        ({"status": "registered"}, "never connected"),
        ({"status": "offline", "offline-at": "N/A"}, "offline"),  # Flower's "not recorded"
        ({"status": "not registered"}, "not registered"),
    ],
)  # fmt: skip
def test_a_site_absence_in_words(row: dict[str, Any], expected: str) -> None:
    assert site_absence(row, NOW) == expected


def test_a_timestamp_flower_did_not_write_is_shown_as_is() -> None:
    assert format_when("yesterday", NOW) == "yesterday"
    assert format_when(None, NOW) == "never"
    assert format_when("N/A", NOW) == "never"
    assert format_when("2026-12-02 21:35:00Z", NOW) == "21:35"  # as flwr writes it


def test_wait_for_run_shows_every_record_to_the_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    records = iter([{"status": "running"}, {"status": "finished:completed"}])
    monkeypatch.setattr(deploy_flwr, "run_status", lambda _env, _id: next(records))
    seen: list[str] = []

    final = deploy_flwr.wait_for_run(
        {}, 3, timeout=60.0, poll=0.0, on_poll=lambda r: seen.append(r["status"])
    )

    assert seen == ["running", "finished:completed"]
    assert final["status"] == "finished:completed"


def test_submit_shows_each_round_of_the_run_and_its_waiting_sites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from common.cli import main
    from server import deploy_publisher

    argv = ["deploy", "init", "--sites", "2", "--coordinator", "h", "--out", str(tmp_path / "k")]
    assert main([*argv, "--data-dir", str(tmp_path)]) == 0
    coord, out = tmp_path / "k" / "coordinator", tmp_path / "run-1"
    for number, site in enumerate(("site-1", "site-2"), start=101):
        (coord / "sites" / f"{site}.node-id").write_text(f"{number}\n")
    offline = {"node-id": "102", "status": "offline", "offline-at": "2026-12-02T21:35:00+00:00"}
    listings = iter([[{"node-id": "101", "status": "online"}, offline]])

    class _Fab:
        app_spec, key_id = "@facefed/facefed==0.0.0", "fpk_test"

    def fake_wait(env: object, run_id: int, *, timeout: float, on_poll: Any) -> dict[str, Any]:
        on_poll({"status": "running"})  # site-2 is offline: the run waits for it
        out.mkdir()
        _write(out / "results.json", [_round(1, 0.9)])
        on_poll({"status": "running"})
        final = {"status": "finished:completed", "elapsed": 12}
        on_poll(final)
        return final

    monkeypatch.setattr(deploy_publisher, "build_signed_fab", lambda app, key: _Fab())
    monkeypatch.setattr(deploy_flwr, "submit", lambda *a, **k: 7)
    monkeypatch.setattr(deploy_flwr, "list_nodes", lambda env, timeout: next(listings))
    monkeypatch.setattr(deploy_flwr, "wait_for_run", fake_wait)
    run = ["--run-config", f'num-sites=2 cohort-size=2 out-dir="{out}"']

    code = main(["deploy", "submit", "--kit", str(coord), *run])

    said = [
        line.split("server.deploy_watch: ")[-1] for line in capsys.readouterr().err.splitlines()
    ]
    said = [line for line in said if line.startswith(("waiting", "round"))]
    assert code == 0
    assert said[0].startswith("waiting for site-2 (offline since ")
    assert any(m.startswith("round 1/3 done: LFW 0.710") for m in said)


def test_after_the_last_round_the_run_is_closing_not_in_a_round_past_the_last(
    tmp_path: Path,
) -> None:
    results, clock = tmp_path / "results.json", Clock()
    watch, lines, _ = _watch(results, _online("site-1", "site-2"), clock)
    _write(results, [_round(1, 1.0), _round(2, 2.0), _round(3, 3.0)])

    watch.poll(RUNNING)

    assert lines[-1] == "all 3 rounds done: the ServerApp is closing the run (0 s)"
