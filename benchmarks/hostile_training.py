"""Hostile trainers as real processes: does robust aggregation keep DiLoCo training on course?

    .venv/bin/python -m benchmarks.hostile_training [--rounds 8] [--attacks scale1000,signflip,noise100,weight,...]

Every arm is a fresh swarm on 127.0.0.1: a bootstrap peer and four DiLoCo trainers of the debug model
(``configs/debug.yaml``: H = 10, blockwise 8-bit with error feedback), the same data shards and seed in
every arm. Arms: ``clean`` (four honest trainers), and for each attack one trainer run by
``harness/hostile_trainer.py`` (the real `swarm join`, its all-reduce contribution or what it serves
attacked; see there for the attacks). Attacks on the contribution run with ``averaging.robust`` on (the
default) and off (the plain mean); attacks on what a member serves (``missing``, ``heartbeats``,
``garbage``, ``equivocate``) run with the defaults only: their defences are not the robust mean, and
their "off" arms are tests (tests/test_averaging_faults.py). Per arm: the honest trainers' held-out loss
after the same number of rounds (mean, and its ratio to the clean arm's), whether they end with one
state, the inputs their reducers clipped, reducers they caught equivocating, parts they dropped,
requests they refused from excluded peers, rounds they averaged alone, and the rounds they completed.
Prints a table and writes ``benchmarks/results/hostile_training.json``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from benchmarks.report import environment, markdown_table, write_json
from harness.hostile_trainer import ATTACKS, MEMBERS
from harness.processes import PeerProcess, read_json, wait_for

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "debug.yaml"
TRAINERS = 4


def run_arm(work: Path, rounds: int, attack: str | None, robust: bool, timeout: float) -> dict:
    work.mkdir(parents=True)
    processes: list[PeerProcess] = []
    try:
        address_file = work / "address.json"
        processes.append(PeerProcess("bootstrap", ["bootstrap", "--config", str(CONFIG), "--identity",
                                                   str(work / "b.key"), "--address-file", str(address_file)],
                                     log_path=work / "bootstrap.log"))
        address = wait_for(lambda: read_json(address_file), timeout=90, what="the bootstrap peer",
                           alive=processes)["maddrs"][0]
        trainers = []
        for index in range(TRAINERS):
            hostile = attack is not None and index == TRAINERS - 1
            args = ["join", "--config", str(CONFIG), "--initial-peers", address,
                    "--status-file", str(work / f"t{index}.json"), "--set", "averaging.mode=diloco", "--set", "averaging.compression=blockwise8",
                    "--set", f"training.max_epochs={rounds}", "--set", f"data.num_shards={TRAINERS}",
                    "--set", f"data.shard_index={index}", "--set", "checkpoint=null"]
            if not robust:
                args += ["--set", "averaging.robust=null"]
            program = (sys.executable, "-m", "harness.hostile_trainer", attack) if hostile else None
            options = {"program": program} if program else {}
            trainers.append(PeerProcess(f"t{index}", args, log_path=work / f"t{index}.log", **options))
        processes += trainers
        deadline = time.monotonic() + timeout
        for trainer in trainers:
            try:
                trainer.proc.wait(max(1.0, deadline - time.monotonic()))
            except Exception:
                break
        honest = [read_json(work / f"t{index}.json") or {} for index in range(TRAINERS - (attack is not None))]
    finally:
        for process in processes:
            process.kill_group()
    losses = [status.get("heldout_loss") for status in honest]
    hashes = {(status.get("averaging", {}).get("extra") or {}).get("state_hash") for status in honest}

    def total(counter: str) -> int:
        return sum(status.get("averaging", {}).get(counter, 0) for status in honest)

    return dict(attack=attack or "none", robust=robust, losses=losses,
                rounds=[status.get("epoch") for status in honest],
                one_state=len(hashes) == 1 and None not in hashes,
                clipped=total("clipped_inputs"), equivocations=total("equivocations"),
                oversized=total("oversized_results"),
                dropped_parts=total("dropped_parts"), alone=total("rounds_failed"),
                excluded_refusals=sum(status.get("averaging", {}).get("refused_requests", {}).get("excluded", 0)
                                      for status in honest))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    parser.add_argument("--timeout", type=float, default=420.0, help="seconds per arm")
    args = parser.parse_args()
    attacks = [attack for attack in args.attacks.split(",") if attack]
    unknown = [attack for attack in attacks if attack not in ATTACKS]
    if unknown:
        parser.error(f"unknown attack {', '.join(unknown)}; known: {', '.join(ATTACKS)}")
    arms = [(None, True)] + [(attack, robust) for attack in attacks
                             for robust in ((True,) if attack in MEMBERS else (True, False))]
    results = []
    with TemporaryDirectory(prefix="swarm-hostile-") as tmp:
        for number, (attack, robust) in enumerate(arms):
            result = run_arm(Path(tmp) / f"arm{number}", args.rounds, attack, robust, args.timeout)
            results.append(result)
            print(f"arm {attack or 'clean'} robust={'on' if robust else 'off'}: {result}", flush=True)
    clean = _mean(results[0]["losses"])
    rows = []
    for result in results:
        loss = _mean(result["losses"])
        rows.append([result["attack"], "on" if result["robust"] else "off", loss,
                     loss / clean if loss is not None and clean else None, result["one_state"],
                     result["clipped"], result["equivocations"], result.get("oversized"), result["dropped_parts"],
                     result["excluded_refusals"], result["alone"], "/".join(str(r) for r in result["rounds"])])
    print(markdown_table(["attack", "robust", "held-out loss (honest mean)", "vs clean", "honest agree",
                          "inputs clipped", "equivocations caught", "oversized results caught", "parts dropped",
                          "refused as excluded",
                          "rounds alone", "rounds done"], rows))
    write_json("hostile_training.json", {"environment": environment(), "rounds": args.rounds, "results": results})
    return 0


def _mean(values):
    values = [value for value in values if isinstance(value, (int, float))]
    return statistics.mean(values) if values else None


if __name__ == "__main__":
    sys.exit(main())
