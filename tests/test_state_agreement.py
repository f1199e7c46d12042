"""Which state a DiLoCo peer adopts: a pure rule, so every peer with the same view reaches the same answer."""

from __future__ import annotations

from swarm.rounds import StateRecord, choose_donor


def test_own_state_when_everyone_agrees():
    states = {"a": StateRecord(3, 300, "h1"), "b": StateRecord(3, 300, "h1")}
    assert choose_donor("a", states) is None


def test_a_state_that_has_seen_more_samples_wins():
    states = {"a": StateRecord(3, 300, "h1"), "b": StateRecord(4, 400, "h2"), "c": StateRecord(3, 300, "h1")}
    assert choose_donor("a", states) == ("b", states["b"])
    assert choose_donor("b", states) is None


def test_equal_samples_go_to_the_majority_then_the_smaller_hash():
    split = {"a": StateRecord(5, 500, "ffff"), "b": StateRecord(5, 500, "0000"), "c": StateRecord(5, 500, "ffff")}
    assert choose_donor("b", split)[1].hash == "ffff"  # two holders beat one
    tie = {"a": StateRecord(5, 500, "ffff"), "b": StateRecord(5, 500, "0000")}
    assert choose_donor("a", tie) == ("b", tie["b"]) and choose_donor("b", tie) is None


def test_institutions_are_preferred_donors():
    states = {"late": StateRecord(0, 0, "init"), "v": StateRecord(7, 700, "h"), "i": StateRecord(7, 700, "h", "institution")}
    assert choose_donor("late", states)[0] == "i"


def test_unknown_self_never_downloads():
    assert choose_donor("ghost", {"a": StateRecord(1, 10, "h")}) is None
