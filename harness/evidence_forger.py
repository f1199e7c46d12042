"""A rogue that frames an honest averaging peer as a persistent outlier (for tests/test_robust_averaging.py).

It joins the DHT of ``harness.averaging_peer`` processes (run ``bench``), finds the victim's full peer id
among the round tracker's records by the suffix the averagers' records use, and makes up a "group" for
each of three rounds: the victim and two identities of its own, each of which signs a clip report against
the victim as the reducer of its part. The victim's own signed input claim over that group cannot be
forged, so the rogue signs the claim itself. It publishes that outlier evidence under its exclusion
record every two seconds. With the check of the accused's own claim (:class:`swarm.net.outlier_evidence.
RoundProof`) no peer accepts it; without it (``averaging_peer --trust-unproven-outliers``, the rule before)
two made-up keys exclude any peer of an open run.

    python -m harness.evidence_forger --initial-peers MADDR --victim SUFFIX --report REPORT.json
"""

from __future__ import annotations

import argparse
import os
import signal
import threading

from hivemind.utils.crypto import RSAPrivateKey

from harness.processes import write_json
from swarm.averaging.accountability import Accountability
from swarm.config.schema import NetworkConfig
from swarm.net import keys
from swarm.net.dht import shutdown_dht, start_dht
from swarm.net.exclusion_record import publish_evidence
from swarm.net.identity import load_identity, peer_id_of_private_key
from swarm.net.norm_claims import INPUTS
from swarm.net.outlier_evidence import ClipReport, OutlierEvidence, RoundProof

RUN_ID = "bench"  # harness.averaging_peer's
ROUNDS = (1, 2, 3)  # averaging.robust.ban.outlier_rounds' default


def framing_evidence(victim: str, own_key: RSAPrivateKey, made_up: list[RSAPrivateKey]) -> OutlierEvidence:
    """Clip reports against ``victim`` by the two ``made_up`` reducers in each of :data:`ROUNDS`, in a group of
    the three of them; the claim that should be the victim's is signed with ``own_key``."""
    members = [victim] + [peer_id_of_private_key(key) for key in made_up]
    proofs = []
    for round_number in ROUNDS:
        group_id = os.urandom(16)
        claim = Accountability(own_key).sign_norms(round_number, group_id, 0, members, INPUTS, [1.0] * len(members))
        reports = []
        for part, key in enumerate(made_up, start=1):
            _, time, signature, _ = Accountability(key).clip_reports(round_number, group_id, 0, part, [(victim, claim)])[0]
            reports.append(ClipReport(key.get_public_key().to_bytes(), round_number, group_id, 0, part, time, signature))
        proofs.append(RoundProof(tuple(members), claim, tuple(reports)))
    return OutlierEvidence(victim, tuple(proofs))


def find_victim(dht, suffix: str) -> str | None:
    found = dht.get(keys.diloco_peers(RUN_ID), latest=True)
    peers = found.value.keys() if found is not None and isinstance(found.value, dict) else []
    return next((peer for peer in peers if isinstance(peer, str) and peer.endswith(suffix)), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--initial-peers", nargs="+", required=True)
    parser.add_argument("--victim", required=True, help="the end of the victim's peer id, as averagers record it")
    parser.add_argument("--report", required=True)
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    identity = load_identity(None)
    dht = start_dht(NetworkConfig(listen_host="127.0.0.1", initial_peers=args.initial_peers, bootstrap_timeout=30),
                    identity=identity)
    report = {"forger": identity.peer_id, "victim": None, "published": 0}
    try:
        while not stop.is_set():
            report["victim"] = report["victim"] or find_victim(dht, args.victim)
            if report["victim"] is not None:
                if "evidence" not in report:
                    item = framing_evidence(report["victim"], identity.private_key, [RSAPrivateKey(), RSAPrivateKey()])
                    report["evidence"], report["reasons"] = item, item.verify()
                publish_evidence(dht, RUN_ID, None, [report["evidence"]]).result()
                report["published"] += 1
            write_json(args.report, {key: value for key, value in report.items() if key != "evidence"})
            stop.wait(2.0)
    finally:
        shutdown_dht(dht)


if __name__ == "__main__":
    main()
