"""Live progress of a round: replied / sampled and the elapsed time, on a terminal or as log lines."""

from __future__ import annotations

import io
import logging

import pytest
from flwr.app import Message, RecordDict

from common.config import parse_run_config
from server.progress import RoundProgress, format_elapsed
from tests.messages import train_message


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_terminal_shows_one_status_line_rewritten_in_place() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = RoundProgress(3, 4, stream=stream, clock=clock, tty=True)

    clock.now += 65
    progress.update(2)
    clock.now += 1
    progress.update(3)

    assert stream.getvalue() == (
        "\rround 3: 2/4 sites replied, 1 min 05 s\rround 3: 3/4 sites replied, 1 min 06 s"
    )
    assert "\n" not in stream.getvalue()


def test_a_terminal_line_is_redrawn_at_most_once_a_second_without_news() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = RoundProgress(1, 3, stream=stream, clock=clock, tty=True)
    progress.update(1)
    for _ in range(5):  # a fast poll: five checks within half a second, nothing new
        clock.now += 0.1
        progress.update(1)
    clock.now += 0.6
    progress.update(1)

    assert stream.getvalue().count("\r") == 2  # the first draw, then the next second


def test_the_terminal_line_is_cleared_when_the_wait_ends() -> None:
    stream = io.StringIO()
    progress = RoundProgress(1, 2, stream=stream, clock=FakeClock(), tty=True)
    progress.update(1)
    width = len(progress.text())

    progress.close()

    assert stream.getvalue().endswith("\r" + " " * width + "\r")


def test_clearing_blanks_the_line_and_the_next_update_redraws_it() -> None:
    stream = io.StringIO()
    progress = RoundProgress(1, 2, stream=stream, clock=FakeClock(), tty=True)
    progress.update(1)
    width = len(progress.text())

    progress.clear()
    progress.clear()  # nothing left to blank
    progress.update(2)

    assert stream.getvalue().split("\r") == [
        "",
        progress.text().replace("2/2", "1/2"),
        " " * width,
        "",
        progress.text(),
    ]


def test_a_shorter_line_blanks_the_rest_of_a_longer_one() -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = RoundProgress(1, 2, stream=stream, clock=clock, tty=True)
    clock.now += 61
    progress.update(1)  # "... 1 min 01 s"
    long = len(progress.text())
    progress.clock = lambda: 100.0  # elapsed back to "0 s": a shorter line
    progress.update(2)

    last = stream.getvalue().rsplit("\r", 1)[-1]
    assert len(last) == long and last.rstrip() == "round 1: 2/2 sites replied, 0 s"


def test_without_a_terminal_it_logs_a_plain_line_every_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock, stream = FakeClock(), io.StringIO()
    progress = RoundProgress(2, 5, stream=stream, clock=clock, interval_s=10, tty=False)

    with caplog.at_level(logging.INFO, logger="server.progress"):
        for replied in range(6):  # one update every 4 s: lines at 12 s and 24 s only
            clock.now += 4
            progress.update(replied)
        progress.close()

    assert stream.getvalue() == ""  # nothing written to the stream itself
    assert [r.getMessage() for r in caplog.records] == [
        "round 2: 2/5 sites replied, 12 s",
        "round 2: 5/5 sites replied, 24 s",
        "round 2: 5/5 sites replied, 24 s (wait over)",
    ]


def test_a_short_wait_logs_nothing_without_a_terminal(caplog: pytest.LogCaptureFixture) -> None:
    progress = RoundProgress(1, 2, stream=io.StringIO(), clock=FakeClock(), tty=False)
    with caplog.at_level(logging.INFO, logger="server.progress"):
        progress.update(2)
        progress.close()
    assert caplog.records == []


def test_the_stream_decides_whether_it_is_a_terminal() -> None:
    assert RoundProgress(1, 1, stream=io.StringIO()).tty is False


def test_an_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="interval_s"):
        RoundProgress(1, 1, interval_s=0)


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (59.9, "59 s"), (60, "1 min 00 s"), (3599, "59 min 59 s"), (3720, "1 h 02 min")],
)
def test_elapsed_time_reads_naturally(seconds: float, text: str) -> None:
    assert format_elapsed(seconds) == text


def test_the_coordinator_reports_each_reply_while_it_waits(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import server.run as run

    seen: list[tuple[int, int]] = []

    class Recording(RoundProgress):
        def update(self, replied: int) -> None:
            seen.append((self.sampled, replied))

        def close(self) -> None:
            seen.append((self.sampled, -1))

    class Grid:  # one reply per pull
        pull_interval = 0.0

        def __init__(self) -> None:
            self.replies = [
                train_message(RecordDict({}), src_node_id=n, dst_node_id=0) for n in (1, 2)
            ]

        def push_messages(self, messages: list[Message]) -> list[str]:
            return [f"m{m.metadata.dst_node_id}" for m in messages]

        def pull_messages(self, ids: set[str]) -> list[Message]:
            out = self.replies.pop(0)
            out.metadata.__dict__["_reply_to_message_id"] = f"m{out.metadata.src_node_id}"
            return [out]

    class Inner:
        def accept(self, server_round: int, message: Message) -> bool:
            return True

    monkeypatch.setattr(run, "RoundProgress", Recording)
    sent = [train_message(RecordDict({}), dst_node_id=n) for n in (1, 2)]
    settings = parse_run_config({"num-sites": 2, "cohort-size": 2})

    replies, _ = run._collect(Grid(), sent, settings, Inner(), 1)  # type: ignore[arg-type]

    assert len(replies) == 2
    assert seen == [(2, 1), (2, 2), (2, -1)]  # 1 of 2, 2 of 2, then the wait ends
