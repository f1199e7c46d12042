"""Metrics records without a network: identity binding, the validators a DHT node runs, plausibility,
the history's arithmetic, and the traffic meter's parser. Fast; the end-to-end tests are in test_monitor*.py."""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import inspect
import io
import math
import re
import sqlite3
import tempfile

import pytest
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.p2p import PeerID
from hivemind.utils import MSGPackSerializer, get_dht_time
from hivemind.utils.crypto import RSAPrivateKey
from prometheus_client.parser import text_string_to_metric_families

from peers.status import format_table
from swarm.averaging import service as service_module
from swarm.averaging.counters import Counters
from swarm.errors import ConfigError, MonitorError
from swarm.net import admission as admission_module
from swarm.net.identity import load_identity, peer_id_of_owner
from swarm.net.keys import metrics_key
from swarm.net.metrics_record import MAX_RECORD_BYTES, PeerMetrics, metrics_validators
from swarm.net.refusals import MAX_REASONS, OTHER, REFUSALS, REQUEST_REASONS, bounded
from swarm.telemetry.collector import Collector, plausibility_problems
from swarm.telemetry.history import History
from swarm.telemetry.prometheus import SwarmCollector, exposition, make_registry
from swarm.telemetry.text import csv_cell, printable
from swarm.telemetry.traffic import parse_ss
from swarm.train.sync import count_round

RUN = "unit-run"


def record_of(peer_id: str, **changes) -> dict:
    record = dict(peer_id=peer_id, role="volunteer", state="running", display_name="lab", organization=None,
                  device="cpu", epoch=3, samples_total=480, samples_per_second=40.0, loss=3.2, heldout_loss=3.1,
                  bytes_sent=1000, bytes_received=2000, rounds_ok=3, rounds_failed=0, refused={}, refused_requests={},
                  reachability="direct", uptime=12.0, version="0.1.0", time=1000.0)
    record.update(changes)
    return record


def dht_record(value: dict, *, owner_key: RSAPrivateKey, signing_key: RSAPrivateKey | None = None,
               lifetime: float = 60.0) -> DHTRecord:
    """The record a DHT node would receive: msgpack'd subkey and value, signed like hivemind signs."""
    owner = RSASignatureValidator(owner_key).local_public_key
    unsigned = DHTRecord(DHTID.generate(source=metrics_key(RUN)).to_bytes(), MSGPackSerializer.dumps(owner),
                         MSGPackSerializer.dumps(value), get_dht_time() + lifetime)
    signer = signing_key or owner_key
    signature = signer.sign(MSGPackSerializer.dumps(dataclasses.astuple(unsigned)))
    return dataclasses.replace(unsigned, value=unsigned.value + b"[signature:" + signature + b"]")


@pytest.fixture(scope="module")
def keys():
    return [load_identity(None) for _ in range(2)]


def test_peer_id_is_the_one_libp2p_derives_from_the_signing_key(keys, tmp_path):
    identity = keys[0]
    assert peer_id_of_owner(identity.owner) == identity.peer_id
    kept = load_identity(tmp_path / "id.key")
    assert load_identity(tmp_path / "id.key").peer_id == kept.peer_id and kept.fresh
    assert str(PeerID.from_identity((tmp_path / "id.key").read_bytes())) == kept.peer_id
    signature = kept.private_key.sign(b"x")
    assert kept.private_key.get_public_key().verify(b"x", signature)
    (tmp_path / "bad.key").write_bytes(b"not a key")
    with pytest.raises(ConfigError, match="does not hold an RSA private key"):
        load_identity(tmp_path / "bad.key")


def test_an_ephemeral_key_is_on_disk_only_inside_key_file(tmp_path, monkeypatch):
    """Nothing of a fresh identity's private key outlives the start of p2pd, also when that start fails."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    identity = load_identity(None)
    assert identity.path is None and not any(tmp_path.iterdir()), "load_identity left the key on disk"
    with pytest.raises(RuntimeError):
        with identity.key_file() as key_file:
            assert str(PeerID.from_identity(key_file.read_bytes())) == identity.peer_id
            assert key_file.parent.stat().st_mode & 0o077 == 0, "the key's folder is readable by others"
            raise RuntimeError("p2pd failed to start")
    assert not any(tmp_path.iterdir()), "a failed start left the key on disk"


def _verdicts(record: DHTRecord, key: RSAPrivateKey) -> tuple[bool, str | None]:
    """What a swarm DHT node decides: hivemind's composite of our validators, and our guard's reason."""
    validators = metrics_validators(RUN, key)
    return CompositeValidator(validators).validate(record), validators[-1].check(record)[0]


def test_dht_node_accepts_a_genuine_record_and_refuses_forgeries(keys):
    victim, rogue = keys
    genuine = dht_record(record_of(victim.peer_id), owner_key=victim.private_key)
    assert _verdicts(genuine, rogue.private_key) == (True, None)

    cases = {
        "bad_signature": dht_record(record_of(victim.peer_id, display_name="FORGED"), owner_key=victim.private_key,
                                    signing_key=rogue.private_key),
        "impersonation": dht_record(record_of(victim.peer_id), owner_key=rogue.private_key),
        "schema": dht_record(record_of(rogue.peer_id, samples_per_second="fast"), owner_key=rogue.private_key),
        "oversized": dht_record(record_of(rogue.peer_id, display_name="X" * MAX_RECORD_BYTES),
                                owner_key=rogue.private_key),
        # a year-long record would outlive every fresh one its owner writes: refused
        "expiration": dht_record(record_of(rogue.peer_id), owner_key=rogue.private_key, lifetime=365 * 86400),
    }
    for reason, record in cases.items():
        assert _verdicts(record, victim.private_key) == (False, reason), reason
    unsigned = dataclasses.replace(genuine, subkey=MSGPackSerializer.dumps(b"not an owner"))
    assert _verdicts(unsigned, victim.private_key) == (False, "unsigned")


@pytest.mark.parametrize("change", [
    dict(samples_per_second=40),  # an int where the schema wants a float: hivemind refuses conversions
    dict(loss=math.nan),  # NaN never equals itself; the publisher sends None instead
    dict(role="admin"),
    dict(role="volunteer\n"),  # pydantic v1 matches with re.match: a pattern ending in $ lets this through
    dict(refused={"Bad Reason": 1}),  # reasons are peer-chosen text: short, [a-z0-9_-] only
    dict(refused_requests={"fetch-limit\n": 1}),
    dict(refused_requests={"x" * (1 + 32): 1}),
    dict(refused={f"reason-{index}": 1 for index in range(MAX_REASONS + 1)}),
    dict(refused_requests={"fetch-limit": -1}),
    dict(extra_field=1),
])
def test_schema_is_strict(keys, change):
    rogue = keys[1]
    record = dht_record(record_of(rogue.peer_id, **change), owner_key=rogue.private_key)
    assert _verdicts(record, rogue.private_key) == (False, "schema")


def test_refusal_reasons_are_open_strings_bounded_by_the_schema(keys):
    victim, rogue = keys
    # a reason this version does not know (a newer peer's) is accepted as it is
    news = record_of(rogue.peer_id, refused={"schema": 2}, refused_requests={"not-admitted": 3, "brand-new": 1})
    assert _verdicts(dht_record(news, owner_key=rogue.private_key), victim.private_key) == (True, None)
    # the publisher keeps its own counts within the schema: the largest reasons by name, the rest in "other"
    many = {f"reason-{index:02d}": 100 - index for index in range(20)} | {"Not A Reason": 7}
    kept = bounded(many)
    assert len(kept) == MAX_REASONS and sum(kept.values()) == sum(many.values())
    assert kept[OTHER] == sum(100 - index for index in range(MAX_REASONS - 1, 20)) + 7 and "reason-00" in kept
    assert bounded({"fetch-limit": 2}) == {"fetch-limit": 2}
    # the largest record a genuine peer can publish still fits the size bound, signature included
    longest = {f"r{index:02d}" + "x" * 29: 2**62 for index in range(MAX_REASONS)}
    largest = record_of(victim.peer_id, display_name="n" * 64, organization="o" * 64, device="d" * 64,
                        refused=longest, refused_requests=dict(longest), version="v" * 32)
    record = dht_record(largest, owner_key=victim.private_key)
    assert len(record.value) <= MAX_RECORD_BYTES, len(record.value)
    assert _verdicts(record, rogue.private_key) == (True, None)


def test_every_reason_the_averaging_service_counts_is_one_prometheus_exports():
    source = inspect.getsource(service_module)
    counted = set(re.findall(r'_refuse\(\s*"([a-z-]+)"', source)) | set(re.findall(r'"((?:fetch|state)-[a-z-]+)"', source))
    assert {"fetch-limit", "fetch-not-member", "fetch-not-slice", "state-limit"} <= counted
    assert counted <= set(REQUEST_REASONS), counted - set(REQUEST_REASONS)
    # and every reason admission gives (swarm.net.admission.Admission.refusal)
    admission_source = inspect.getsource(admission_module.Admission.refusal)
    given = set(re.findall(r'"([a-z-]+)"', admission_source)) - {"private"}
    assert given <= set(REQUEST_REASONS), given - set(REQUEST_REASONS)


def test_missing_field_is_refused(keys):
    rogue = keys[1]
    value = record_of(rogue.peer_id)
    del value["device"]
    assert _verdicts(dht_record(value, owner_key=rogue.private_key), rogue.private_key) == (False, "schema")


def test_each_distinct_refusal_is_counted_once(keys):
    victim, rogue = keys
    before = REFUSALS.snapshot()["counts"].get("impersonation", 0)
    record = dht_record(record_of(victim.peer_id, epoch=7), owner_key=rogue.private_key)
    guard = metrics_validators(RUN, victim.private_key)[-1]
    assert not guard.validate(record) and not guard.validate(record)
    assert REFUSALS.snapshot()["counts"]["impersonation"] == before + 1


def test_plausibility():
    metrics = PeerMetrics.parse_obj(record_of("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"))
    assert plausibility_problems(metrics, None, now=1000.0, max_samples_per_second=1000) == []
    fast = metrics.copy(update=dict(samples_per_second=5e6))
    assert "above monitor.max_samples_per_second" in plausibility_problems(fast, None, now=1000.0,
                                                                             max_samples_per_second=1000)[0]
    grew = metrics.copy(update=dict(samples_total=metrics.samples_total + 100_000, time=1010.0, uptime=22.0))
    assert any("grew by" in problem for problem in plausibility_problems(grew, metrics, now=1010.0,
                                                                          max_samples_per_second=1000))
    future = metrics.copy(update=dict(time=5000.0))
    assert any("future" in problem for problem in plausibility_problems(future, None, now=1000.0,
                                                                         max_samples_per_second=1000))


def test_a_trainer_far_ahead_of_all_others_is_flagged():
    honest = PeerMetrics.parse_obj(record_of("QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", epoch=5))
    liar = PeerMetrics.parse_obj(record_of("QmZwAwoVV6EjCQ41XLtXt4MnvehfLvRWApMUC8XqYq37Zm", epoch=10_000))
    view = Collector(dht=None, run_id=RUN, max_samples_per_second=1000).assemble(
        [(honest.peer_id, honest), (liar.peer_id, liar)], {}, now=1000.0)
    assert [peer["peer_id"] for peer in view.peers] == [honest.peer_id]
    assert "ahead of every other trainer" in view.flagged[0]["reasons"][0]
    assert view.totals["epoch"] == 5 and view.totals["samples_per_second"] == 40.0


def _view(records: list[dict], when: float):
    parsed = [PeerMetrics.parse_obj(record) for record in records]
    return Collector(dht=None, run_id=RUN, max_samples_per_second=1e5).assemble(
        [(metrics.peer_id, metrics) for metrics in parsed], {}, now=when, collected_at=when)


def test_history_counts_contribution_across_peer_and_monitor_restarts(tmp_path):
    peer = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    history = History(tmp_path / "h.sqlite", RUN)
    history.record(_view([record_of(peer, samples_total=100, uptime=10.0, time=1000.0)], 1000.0))
    history.record(_view([record_of(peer, samples_total=300, uptime=20.0, time=1010.0)], 1010.0))
    history.close()
    history = History(tmp_path / "h.sqlite", RUN)  # the monitor restarted; then the peer restarted too
    history.record(_view([record_of(peer, samples_total=50, uptime=5.0, time=1030.0)], 1030.0))
    assert history.peers()[0]["contributed"] == 350
    # uptime 10 + 10 more + 5 after the restart; 3 rounds, none more, then 3 by the restarted process
    assert (history.peers()[0]["compute_seconds"], history.peers()[0]["rounds_joined"]) == (25.0, 6)
    assert [row["peers_online"] for row in history.swarm_series()] == [1, 1, 1]
    assert [row["bytes_sent"] for row in history.swarm_series()] == [1000, 1000, 1000]
    assert [row["samples_total"] for row in history.peer_series()[peer]] == [100, 300, 50]
    history.record(_view([], 1040.0))
    assert history.peers()[0]["state"] == "left"
    csv_text = "".join(history.csv_rows("peer_samples"))
    assert csv_text.splitlines()[0].startswith("time,peer_id,") and len(csv_text.splitlines()) == 4
    history.prune(older_than=1020.0)
    assert len(history.swarm_series()) == 2 and history.peers()[0]["contributed"] == 350
    many = History(tmp_path / "many.sqlite", RUN)
    for index in range(50):
        many.record(_view([record_of(peer, samples_total=index, uptime=float(index), time=1000.0 + index)],
                          1000.0 + index))
    assert 5 <= len(many.swarm_series(max_points=10)) <= 11
    assert len(many.peer_series(max_points=10)[peer]) == len(many.swarm_series(max_points=10))


def test_refusals_reach_the_status_table_prometheus_and_the_history(tmp_path):
    alice, bob = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "QmZwAwoVV6EjCQ41XLtXt4MnvehfLvRWApMUC8XqYq37Zm"
    records = [record_of(alice, display_name="alice", refused={"bad_signature": 2},
                         refused_requests={"fetch-not-member": 5, "fetch-limit": 4}),
               record_of(bob, display_name="bob", refused_requests={"brand-new": 1})]
    parsed = [PeerMetrics.parse_obj(record) for record in records]
    view = Collector(dht=None, run_id=RUN, max_samples_per_second=1e5).assemble(
        [(metrics.peer_id, metrics) for metrics in parsed], {"schema": 1}, now=1000.0, collected_at=1000.0)

    table = format_table(view).splitlines()
    assert "refused by the peers: 12 (records: bad_signature 2; requests: brand-new 1, fetch-limit 4, " \
           "fetch-not-member 5)" in table, table
    assert "refused by this node: 1 (records: schema 1)" in table
    column = table[1].index("REFUSED")
    assert {row.split()[2]: row[column:].split()[0] for row in table[2:4]} == {"alice": "11", "bob": "1"}

    text = exposition(make_registry(SwarmCollector(lambda: (view, {}), lambda: []))).decode()
    samples = {(sample.name, sample.labels.get("peer"), sample.labels["reason"]): sample.value
               for family in text_string_to_metric_families(text) for sample in family.samples
               if "reason" in sample.labels}
    assert samples == {
        ("swarm_monitor_refused_records_total", None, "schema"): 1,
        ("swarm_peer_refused_records_total", alice, "bad_signature"): 2,
        ("swarm_peer_refused_requests_total", alice, "fetch-limit"): 4,
        ("swarm_peer_refused_requests_total", alice, "fetch-not-member"): 5,
        ("swarm_peer_refused_requests_total", bob, OTHER): 1,  # a reason this version does not know
    }, samples

    history = History(tmp_path / "h.sqlite", RUN)
    history.record(view)
    assert history.swarm_series()[0]["refused"] == 13


HOSTILE_NAME = "\x1b]0;owned\x07\x1b[2J=cmd|' /C calc'!A0"


def test_peer_chosen_text_reaches_terminals_and_spreadsheets_inert(tmp_path):
    peer = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
    view = _view([record_of(peer, display_name=HOSTILE_NAME, organization='=HYPERLINK("http://evil")',
                            device="+cpu", version="@SUM(1)")], 1000.0)
    table = format_table(view)
    assert not set(table) & {"\x1b", "\x07"}, repr(table)
    assert "?]0;owned??[2J=cmd|' /C calc'!A0" in table
    assert printable("a\u202eb\x9bc") == "a?b?c" and printable(None) == "-" and printable("n" * 100)[-1] == "…"
    assert len(printable("n" * 100)) == 64

    history = History(tmp_path / "h.sqlite", RUN)
    history.record(view)
    rows = list(csv.DictReader(io.StringIO("".join(history.csv_rows("peers")))))
    assert (rows[0]["organization"], rows[0]["device"], rows[0]["version"]) == \
        ("'=HYPERLINK(\"http://evil\")", "'+cpu", "'@SUM(1)")
    assert rows[0]["display_name"] == HOSTILE_NAME  # it starts with ESC, no formula: kept as the peer wrote it
    assert [csv_cell(value) for value in ("-1", "\tx", "\rx", "ok", -1.5, None)] == ["'-1", "'\tx", "'\rx", "ok", -1.5, None]
    samples = list(csv.DictReader(io.StringIO("".join(history.csv_rows("peer_samples")))))
    assert samples[0]["loss"] == "3.2"  # numbers stay numbers


def test_prometheus_labels_per_peer_series_by_peer_id_and_exports_one_info_series(tmp_path):
    alice, bob = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N", "QmZwAwoVV6EjCQ41XLtXt4MnvehfLvRWApMUC8XqYq37Zm"
    view = _view([record_of(alice, display_name=HOSTILE_NAME, organization="o" * 64, device="cuda:0"),
                  record_of(bob, display_name=None, role="institution", version="9.9")], 1000.0)
    history = History(tmp_path / "h.sqlite", RUN)
    history.record(view)
    text = exposition(make_registry(SwarmCollector(lambda: (view, {}), history.peers))).decode()
    families = {family.name: family for family in text_string_to_metric_families(text)}
    info = {sample.labels["peer"]: sample for sample in families["swarm_peer_info"].samples}
    assert set(info) == {alice, bob} and {sample.value for sample in info.values()} == {1.0}
    assert info[alice].labels == {"peer": alice, "role": "volunteer", "name": printable(HOSTILE_NAME, missing=""),
                                  "organization": "o" * 64, "device": "cuda:0", "version": "0.1.0"}
    assert info[bob].labels == {"peer": bob, "role": "institution", "name": "", "organization": "",
                                "device": "cpu", "version": "9.9"}
    per_peer = [sample for name, family in families.items() if name.startswith("swarm_peer_") and name != "swarm_peer_info"
                for sample in family.samples]
    assert {sample.labels["peer"] for sample in per_peer} == {alice, bob}
    assert {key for sample in per_peer for key in sample.labels} <= {"peer", "outcome", "reason"}
    contributed = {sample.labels["peer"]: sample.value for sample in families["swarm_peer_contributed_samples"].samples}
    assert contributed == {alice: 480, bob: 480}


def test_history_of_another_run_or_a_broken_file_is_refused(tmp_path):
    History(tmp_path / "h.sqlite", "other-run").close()
    with pytest.raises(MonitorError, match="holds the history of run 'other-run'"):
        History(tmp_path / "h.sqlite", RUN)
    (tmp_path / "junk.sqlite").write_bytes(b"this is not a database" * 100)
    with pytest.raises(MonitorError, match="cannot use"):
        History(tmp_path / "junk.sqlite", RUN)
    assert sqlite3.sqlite_version  # the standard library's SQLite is all the monitor needs


def test_averaging_rounds_count_outcomes():
    counters = Counters()
    ok, failed, cancelled = (concurrent.futures.Future() for _ in range(3))
    ok.set_result({"group": 2})
    failed.set_exception(TimeoutError("no group"))
    cancelled.cancel()
    for future in (ok, failed, cancelled):
        count_round(counters, future)
    assert (counters.rounds_ok, counters.rounds_failed) == (1, 1)


SS_OUTPUT = """\
0      0      127.0.0.1:32779 127.0.0.1:35995 users:(("p2pd",pid=15600,fd=12))
\t bbr wscale:10,10 rto:212 bytes_sent:4872 bytes_acked:4873 bytes_received:5168 segs_out:73
0      0      127.0.0.1:34141 127.0.0.1:35995 users:(("p2pd",pid=15643,fd=12))
\t bbr wscale:10,10 rto:212 bytes_sent:4004 bytes_acked:4005 bytes_received:4841 segs_out:62
0      0      127.0.0.1:40000 127.0.0.1:35995 users:(("p2pd",pid=15600,fd=13))
\t cubic bytes_acked:10 bytes_received:20
"""


def test_traffic_meter_reads_only_its_own_p2pd():
    assert parse_ss(SS_OUTPUT, 15600) == {("127.0.0.1:32779", "127.0.0.1:35995"): (4873, 5168),
                                          ("127.0.0.1:40000", "127.0.0.1:35995"): (10, 20)}
    assert parse_ss(SS_OUTPUT, 1) == {}
    # a peer's own process too (its direct links): both pids' connections, no one else's
    assert set(parse_ss(SS_OUTPUT, (15600, 15643))) == {("127.0.0.1:32779", "127.0.0.1:35995"),
                                                       ("127.0.0.1:34141", "127.0.0.1:35995"),
                                                       ("127.0.0.1:40000", "127.0.0.1:35995")}
