"""The rating model: prior, decay, outlier drop, MTBF; persisted in a real SQLite file."""

from __future__ import annotations

from pathlib import Path

import pytest

from p2pbuild.dispatcher._db import Database
from p2pbuild.dispatcher._ratings import (
    Decayed,
    RatingBook,
    RatingModel,
    Signal,
    combine,
    observe_uptime,
)

DAY = 86400.0


def test_decay_halves_weight_per_half_life() -> None:
    state = Decayed(at=0.0).add(1.0, 0.0, 10.0)
    later = state.decayed_to(10.0, 10.0)
    assert later.weight_sum == pytest.approx(0.5)
    assert later.value_sum == pytest.approx(0.5)
    # The mean without prior does not change with decay alone; with a prior it moves back.
    assert state.mean(0.0, 10.0, 0.5, 1.0) == pytest.approx(0.75)
    assert state.mean(1000.0, 10.0, 0.5, 1.0) == pytest.approx(0.5, abs=1e-6)


def test_recent_observations_weigh_more() -> None:
    state = Decayed(at=0.0)
    state = state.add(0.0, 0.0, 10.0)  # an old failure
    state = state.add(1.0, 30.0, 10.0)  # a recent success
    assert state.mean(30.0, 10.0, 0.5, 0.0) == pytest.approx(1 / (1 + 0.125))


@pytest.fixture
def book(tmp_path: Path) -> RatingBook:
    return RatingBook(Database.open(tmp_path / "d.db"), RatingModel(half_life_s=10 * DAY))


def test_new_node_starts_at_the_population_mean(book: RatingBook) -> None:
    for _ in range(20):
        book.record("old", Signal.SUCCESS, 1.0, 0.0)
        book.record("old", Signal.AGREEMENT, 1.0, 0.0)
        book.record("flaky", Signal.SUCCESS, 0.5, 0.0)
        book.record("flaky", Signal.AGREEMENT, 1.0, 0.0)
    ratings = book.ratings(0.0, ["new"])
    assert ratings["new"].success == pytest.approx(0.75)
    assert ratings["flaky"].score < ratings["new"].score < ratings["old"].score
    assert ratings["new"].observations == 0


def test_outlier_drops_the_rating(book: RatingBook) -> None:
    for node in ("honest", "tamper"):
        for _ in range(5):
            book.record(node, Signal.SUCCESS, 1.0, 0.0)
            book.record(node, Signal.AGREEMENT, 1.0, 0.0)
    before = book.ratings(1.0)["tamper"].score
    book.record("tamper", Signal.AGREEMENT, 0.0, 1.0, build_id="b", reason="outlier")
    after = book.ratings(1.0)
    assert after["tamper"].score < 0.8 * before
    assert after["honest"].score > after["tamper"].score
    assert [o.value for o in book.db.observations("tamper")][-1] == 0.0
    assert book.db.audit_entries()[-1].detail["reason"] == "outlier"


def test_relative_build_time(book: RatingBook) -> None:
    book.record_durations({"fast": 1000, "slow": 4000}, 0.0)
    ratings = book.ratings(0.0)
    assert ratings["fast"].speed == 1.0
    assert ratings["slow"].speed < 0.75
    assert ratings["slow"].score < ratings["fast"].score


def test_mtbf_from_heartbeats() -> None:
    row, failed = observe_uptime(None, "n", "op", 100, 0.0)
    assert not failed
    row, failed = observe_uptime(row, "n", "op", 3700, 3600.0)
    assert not failed and row.up_s == pytest.approx(3600)
    row, failed = observe_uptime(row, "n", "op", 60, 7200.0)  # restarted
    assert failed and row.failures == pytest.approx(1.0, rel=1e-3)


def test_restarts_lower_reliability(book: RatingBook) -> None:
    now = 0.0
    for i in range(10):
        book.heartbeat("stable", "a", 1000 + int(i * DAY), now + i * DAY)
        book.heartbeat("restarts", "b", 100 if i % 2 else 100_000, now + i * DAY)
    ratings = book.ratings(10 * DAY)
    assert ratings["restarts"].mtbf_s < ratings["stable"].mtbf_s
    assert ratings["restarts"].reliability < ratings["stable"].reliability


def test_combine_bounds() -> None:
    assert combine(1, 1, 1, 1) == 1
    assert combine(0, 1, 1, 1) == 0
    assert combine(1, 0.5, 1, 1) == 0.25
