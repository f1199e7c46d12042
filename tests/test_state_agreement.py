"""Which state a peer adopts, in DiLoCo rounds and at the end of a sync run: a pure rule, so every peer
with the same view reaches the same answer."""

from __future__ import annotations

import pytest

from swarm.net.diloco_records import StateRecord
from swarm.train.agreement import choose_donor, donors_of_agreed_state, in_agreement

pytestmark = pytest.mark.timeout(30)


def test_own_state_when_everyone_agrees():
    states = {"a": StateRecord(3, 300, "h1"), "b": StateRecord(3, 300, "h1")}
    assert choose_donor("a", states) is None


def test_a_state_that_has_seen_more_samples_wins():
    states = {"a": StateRecord(3, 300, "h1"), "b": StateRecord(4, 400, "h2"), "c": StateRecord(3, 300, "h1"),
              "d": StateRecord(4, 400, "h2")}
    assert choose_donor("a", states) == ("b", states["b"])
    assert choose_donor("b", states) is None


def test_one_peers_claim_never_moves_peers_whose_state_a_quorum_holds():
    """The takeover of issue 10: one record claiming 2^62 samples at round 10^6."""
    liar = StateRecord(10**6, 2**62, "zero")
    states = {"a": StateRecord(19, 6000, "h"), "b": StateRecord(19, 6000, "h"), "x": liar}
    assert choose_donor("a", states) is None and choose_donor("b", states) is None
    # a second identity makes a quorum: that is what admission (private runs) is for
    assert choose_donor("a", {**states, "y": liar})[1] == liar


def test_a_single_peer_cannot_make_a_lone_peer_jump_rounds():
    states = {"a": StateRecord(19, 6000, "h"), "x": StateRecord(10**6, 2**62, "zero")}
    assert choose_donor("a", states) is None
    near = {"a": StateRecord(19, 6000, "h"), "x": StateRecord(20, 7000, "other")}
    assert choose_donor("a", near) is None  # not even one round ahead, unless it averaged with this peer
    assert choose_donor("a", near, partners={"x"}) == ("x", near["x"])  # partners whose round ended apart meet
    assert choose_donor("a", states, partners={"x"}) is None  # ...but never jump rounds


def test_a_newcomer_adopts_a_lone_trainers_state_but_not_one_of_two_rival_claims():
    fresh = StateRecord(0, 0, "init")
    lone = {"new": fresh, "other-new": fresh, "a": StateRecord(19, 6000, "h")}
    assert choose_donor("new", lone) == ("a", lone["a"])
    rivals = {**lone, "x": StateRecord(10**6, 2**62, "zero")}
    assert choose_donor("new", rivals) is None
    assert choose_donor("new", {**rivals, "b": StateRecord(19, 6000, "h")}) == ("a", lone["a"])


def test_equal_samples_go_to_the_majority_then_the_smaller_hash():
    split = {"a": StateRecord(5, 500, "ffff"), "b": StateRecord(5, 500, "0000"), "c": StateRecord(5, 500, "ffff")}
    assert choose_donor("b", split)[1].hash == "ffff"  # two holders beat one
    tie = {"a": StateRecord(5, 500, "ffff"), "b": StateRecord(5, 500, "0000")}
    assert choose_donor("a", tie, {"b"}) == ("b", tie["b"]) and choose_donor("b", tie, {"a"}) is None


def test_institutions_are_preferred_donors():
    states = {"late": StateRecord(0, 0, "init"), "v": StateRecord(7, 700, "h"), "i": StateRecord(7, 700, "h", "institution")}
    assert choose_donor("late", states)[0] == "i"


def test_unknown_self_never_downloads():
    assert choose_donor("ghost", {"a": StateRecord(1, 10, "h")}) is None


def test_every_holder_of_the_agreed_state_is_a_donor_institutions_first():
    states = {"me": StateRecord(9, 9, "zz"), "v": StateRecord(9, 9, "aa"), "i": StateRecord(9, 9, "aa", "institution")}
    assert donors_of_agreed_state("me", states) == ["i", "v"]
    assert donors_of_agreed_state("v", states) == []


def test_agreement_needs_every_peer_in_the_run_to_hold_the_same_state():
    states = {"a": StateRecord(9, 9, "h"), "b": StateRecord(9, 9, "h", "institution"), "c": StateRecord(9, 9, "x")}
    assert in_agreement("a", states, ["a", "b"])  # roles do not matter, only the state
    assert not in_agreement("a", states, ["a", "b", "c"])
    assert not in_agreement("a", states, ["a", "d"])  # a peer still in the run that has not published yet
    assert not in_agreement("d", states, ["a"])


def test_a_lone_state_yields_to_a_quorum_of_its_round_whatever_its_samples():
    """A trainer that missed the others' round 0 averaged alone and counted more samples than the pair:
    it must take the pair's state (the pair can never take its own), or the swarm stays split."""
    states = {"a": StateRecord(1, 96, "pair"), "b": StateRecord(1, 96, "pair"), "lone": StateRecord(1, 144, "own")}
    assert choose_donor("lone", states) == ("a", states["a"])
    assert choose_donor("a", states) is None and choose_donor("a", states, {"lone"}) is None
    later = {**states, "a": StateRecord(2, 150, "next"), "b": StateRecord(2, 150, "next")}
    assert choose_donor("lone", later)[1].hash == "next"
    # one peer that finished a round first does not roll back to the round the quorum still announces
    first = {"a": StateRecord(5, 500, "r5"), "b": StateRecord(5, 500, "r5"), "x": StateRecord(6, 600, "r6")}
    assert choose_donor("x", first, {"a", "b"}) is None
