"""The kill scenario, repeated: one of three averaging peers fails 0.5 s into an all-reduce.

    sudo .venv/bin/python -m benchmarks.kill_scenario [--kill-trials 10] [--link-trials 5] [--quick]

Set up as /work/shared/BASELINES.md measured plain hivemind 1.1.12, so the numbers compare: 3 peers
(``harness/averaging_peer.py``), each in its own network namespace on a bridge, links capped with
``tbf rate 100mbit burst 64kb latency 200ms``; 4M fp32 values (16 MiB) per peer, uncompressed;
chunk timeout 5 s, request timeout 3 s, round timeout 60 s (hivemind's next_chunk_timeout,
request_timeout and allreduce_timeout there). Each trial starts three fresh peers, runs round 0
(all three, a warm-up), and strikes 0.5 s into the victim's round-1 all-reduce, either
- ``kill``: SIGKILL of the victim's process group (the peer, its DHT process, its p2pd), or
- ``link``: the victim's link taken down (``ip link set eth0 down`` in its namespace; it keeps running).
The survivors start round 2 as soon as round 1 returns. The victim rotates over the three hosts
(host 0 is everyone's initial peer in the DHT).

A trial meets the bar when both survivors finish round 1 within the round timeout, with finite values
and identical results (same hash), and round 2 succeeds with exactly the two survivors, identical
results, within 60 s of the fault. Reported per trial and in total, next to hivemind's figures
from BASELINES.md (measured earlier on this machine, not in this run). Needs root; prints tables and
writes ``benchmarks/results/kill_scenario.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

from benchmarks.report import environment, markdown_table, span, write_json
from harness.averaging_peer import start_in_lab
from harness.netlab import Lab, available, kill_group, load_average, read_records, wait_all

LINK = dict(rate="100mbit", burst="64kb", latency="200ms")
CHUNK_TIMEOUT, REQUEST_TIMEOUT, ROUND_TIMEOUT = 5.0, 3.0, 60.0
FAULT_DELAY = 0.5  # seconds into the victim's all-reduce
NEXT_ROUND_LIMIT = 60.0
HIVEMIND = {  # /work/shared/BASELINES.md (plain hivemind 1.1.12, measured earlier on this kind of machine)
    "kill": dict(trials=10, finish="7/10 (3: one survivor waits the full 60 s, then fails)", identical="0/10",
                 next_round="7/10 (3/10: survivors split for > 3 min)", fault_to_next="5.25 (5.1-5.6), 7 good trials",
                 met="0/10"),
    "link": dict(trials=5, finish="5/5, after 10.6-64.5 s", identical="1/5", next_round="3/5 (2/5 only through a retry)",
                 fault_to_next="62.5 (41-64)", met="at most 1/5"),
}


def wait_for_allreduce(status: Path, round_number: int, timeout: float) -> float | None:
    """When (time.time()) the peer entered the all-reduce of ``round_number``; None if it did not in time."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads(status.read_text())
        except (FileNotFoundError, ValueError):  # not written yet, or caught mid-write
            state = {}
        if state.get("state") == "allreduce" and state.get("round") == round_number:
            return float(state["time"])
        if state.get("round", -1) > round_number or state.get("state") == "done":
            return None
        time.sleep(0.02)
    return None


def run_trial(trial: int, fault: str, victim: int, work: Path, timeout: float) -> dict:
    result = dict(trial=trial, fault=fault, victim=victim, load=load_average()[0])
    started = time.monotonic()
    with Lab(3, **LINK) as lab:
        procs = start_in_lab(lab, work, [0, 1, 2], [
            "--rounds", "3", "--expect", "3", "--chunk-timeout", str(CHUNK_TIMEOUT),
            "--request-timeout", str(REQUEST_TIMEOUT), "--round-timeout", str(ROUND_TIMEOUT)])
        entered = wait_for_allreduce(work / f"s{victim}.json", 1, 120)
        result["setup_seconds"] = round(time.monotonic() - started, 1)  # start-up and round 0
        if entered is None:
            result["error"] = "the victim never entered round 1's all-reduce"
            return result
        time.sleep(max(0.0, entered + FAULT_DELAY - time.time()))
        if fault == "kill":
            kill_group(procs[victim])
        else:
            lab.link(victim, up=False)
        result["fault_at"] = fault_at = time.time()
        result["fault_into_allreduce"] = fault_at - entered
        survivors = [host for host in procs if host != victim]
        result["finished"] = wait_all([procs[host] for host in survivors], timeout)
        result["exit_seconds"] = round(time.time() - fault_at, 1)  # until both survivors have exited
        kill_group(procs[victim])
    records = {host: {r["round"]: r for r in read_records(work / f"p{host}.jsonl")} for host in procs}
    return evaluate(result, records, survivors)


def evaluate(result: dict, records: dict, survivors: list[int]) -> dict:
    fault_at = result["fault_at"]
    first = [records[h].get(1, {}) for h in survivors]
    second = [records[h].get(2, {}) for h in survivors]
    victim_id = records[result["victim"]].get(0, {}).get("me")
    warmup = records[survivors[0]].get(0, {})
    result["victim_was_leader"] = bool(warmup.get("members")) and warmup["members"][0] == victim_id
    result["round1_ok"] = all(r.get("ok") for r in first)
    result["round1_after_fault"] = [round(r["ended_at"] - fault_at, 2) if "ended_at" in r else None for r in first]
    result["round1_within_timeout"] = result["round1_ok"] and all(
        r.get("seconds", float("inf")) <= ROUND_TIMEOUT for r in first)
    result["finite"] = all(r.get("finite") for r in first)
    result["identical"] = result["round1_ok"] and len({r.get("hash") for r in first}) == 1
    result["group1"] = [r.get("group_size") for r in first]
    result["dropped_parts"] = [r.get("missing_parts") for r in first]
    survivor_ids = sorted(r.get("me") for r in second)
    result["round2_ok"] = (all(r.get("ok") and r.get("group_size") == 2 and r.get("finite") for r in second)
                           and len({r.get("hash") for r in second}) == 1
                           and all(sorted(r.get("members", [])) == survivor_ids for r in second))
    result["fault_to_round2"] = (round(max(r["ended_at"] for r in second) - fault_at, 2)
                                 if result["round2_ok"] else None)
    result["errors"] = [r.get("error") for r in first + second if r.get("error")]
    result["met"] = bool(result["round1_within_timeout"] and result["finite"] and result["identical"]
                         and result["round2_ok"] and result["fault_to_round2"] <= NEXT_ROUND_LIMIT)
    return result


def print_tables(trials: list[dict]) -> None:
    rows = []
    for t in trials:
        if "error" in t:
            rows.append([t["trial"], t["fault"], t["victim"], "-", "-", "-", "-", "-", "-", "no", t["error"]])
            continue
        rows.append([
            t["trial"], t["fault"], f"{t['victim']}{' (leader)' if t['victim_was_leader'] else ''}",
            f"{t['fault_into_allreduce']:.2f}",
            ", ".join("-" if s is None else f"{s:.1f}" for s in t["round1_after_fault"]) if t["round1_ok"] else "no",
            "yes" if t["identical"] else "no", "yes" if t["finite"] else "no",
            "/".join(str(len(parts)) if parts is not None else "-" for parts in t["dropped_parts"]),
            f"{t['fault_to_round2']:.1f}" if t["round2_ok"] else "no",
            "yes" if t["met"] else "no", "; ".join(t["errors"])[:80],
        ])
    print(markdown_table(["trial", "fault", "victim", "fault at (s into all-reduce)", "survivors done with round 1 (s after fault)",
                          "identical", "finite", "parts dropped", "fault → round 2 done (s)", "met bar", "errors"], rows))
    print()
    summary = []
    for fault in ("kill", "link"):
        mine = [t for t in trials if t["fault"] == fault]
        if not mine:
            continue
        n = len(mine)
        ok = [t for t in mine if "error" not in t]
        summary.append([
            "swarm (this run)", "SIGKILL process group" if fault == "kill" else "link down", n,
            f"{sum(t['round1_within_timeout'] for t in ok)}/{n}, after {span([max(t['round1_after_fault']) for t in ok if t['round1_ok']], 1)} s",
            f"{sum(t['identical'] and t['finite'] for t in ok)}/{n}",
            f"{sum(t['round2_ok'] for t in ok)}/{n}",
            span([t["fault_to_round2"] for t in ok if t["round2_ok"]], 2),
            f"{sum(t['met'] for t in mine)}/{n}",
        ])
        h = HIVEMIND[fault]
        summary.append(["hivemind 1.1.12 (BASELINES.md, earlier)", "SIGKILL process group" if fault == "kill" else "link down",
                        h["trials"], h["finish"], h["identical"], h["next_round"], h["fault_to_next"], h["met"]])
    print(markdown_table(["averaging", "fault", "trials", "survivors finish the faulty round", "identical & finite after it",
                          "next joint round succeeds", "fault → next joint round (s, median (range))", "met the bar"], summary))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kill-trials", type=int, default=10)
    parser.add_argument("--link-trials", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="3 trials of each fault")
    parser.add_argument("--timeout", type=float, default=150, help="seconds for the survivors of a trial to finish")
    parser.add_argument("--out", type=Path, help="JSON results (default benchmarks/results/kill_scenario.json)")
    parser.add_argument("--keep", type=Path, help="keep the peers' logs and records in this folder")
    args = parser.parse_args(argv)
    reason = available()
    if reason:
        print(f"skipped: {reason}")
        return 0
    kills, links = (3, 3) if args.quick else (args.kill_trials, args.link_trials)
    env = environment()
    started = time.monotonic()
    trials = []
    plan = [("kill", i) for i in range(kills)] + [("link", i) for i in range(links)]
    with TemporaryDirectory(prefix="swb-kill-") as tmp:
        root = args.keep or Path(tmp)
        for number, (fault, index) in enumerate(plan):
            work = root / f"{fault}{index}"
            work.mkdir(parents=True, exist_ok=True)
            t0 = time.monotonic()
            trial = run_trial(number, fault, index % 3, work, args.timeout)
            trials.append(trial)
            print(f"trial {number} ({fault}, victim {index % 3}): {'met' if trial.get('met') else 'MISSED'} the bar "
                  f"in {time.monotonic() - t0:.0f}s (start-up and round 0 {trial.get('setup_seconds', '-')}s, fault to "
                  f"survivors' exit {trial.get('exit_seconds', '-')}s; load {trial['load']:.1f})", file=sys.stderr, flush=True)
    print(f"links: tbf rate {LINK['rate']} burst {LINK['burst']} latency {LINK['latency']} both directions; "
          f"16 MiB fp32 per peer; chunk timeout {CHUNK_TIMEOUT:g} s, request timeout {REQUEST_TIMEOUT:g} s, "
          f"round timeout {ROUND_TIMEOUT:g} s; load average {min(t['load'] for t in trials):.1f}-"
          f"{max(t['load'] for t in trials):.1f} on {env['cpus']} CPUs\n")
    print_tables(trials)
    path = write_json("kill_scenario.json", dict(environment=env, link=LINK, chunk_timeout=CHUNK_TIMEOUT,
                                                 request_timeout=REQUEST_TIMEOUT, round_timeout=ROUND_TIMEOUT,
                                                 seconds=time.monotonic() - started, trials=trials, hivemind=HIVEMIND),
                      args.out)
    print(f"\nwrote {path} ({time.monotonic() - started:.0f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
