"""What signing DiLoCo records costs (issue 10): bytes per record and CPU per record, before (unsigned,
plain peer id subkey, no guard) and after (owner subkey, RSA-2048 signature, the run's validators).

Prints a table and writes JSON (``--out``). Runs on CPU in a few seconds:
``python -m benchmarks.record_signing --records 1000``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

from hivemind.dht.routing import DHTID
from hivemind.dht.validation import CompositeValidator, DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time

from swarm.net import keys
from swarm.net.diloco_records import Progress, RecordBounds, StateRecord, encode_record
from swarm.net.identity import load_identity
from swarm.net.signed_record import peer_of_subkey
from swarm.net.validators import run_validators

RUN = "bench-run"


def records(n: int, subkey, key: str, value_of) -> list[DHTRecord]:
    key_id = DHTID.generate(source=key).to_bytes()
    return [DHTRecord(key_id, MSGPackSerializer.dumps(subkey), MSGPackSerializer.dumps(value_of(i)),
                      get_dht_time() + 30) for i in range(n)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    writer, node = load_identity(None), load_identity(None)
    signer = CompositeValidator(run_validators(RUN, writer.private_key))
    checker = CompositeValidator(run_validators(RUN, node.private_key, RecordBounds.for_run(
        max_epochs=None, round_timeout=600.0, max_samples_per_second=1e5)))
    progress = lambda i: encode_record(Progress(1000 + i, 1600, get_dht_time()),  # noqa: E731
                                       StateRecord(1000 + i, 10**9 + i, "ab" * 32, "volunteer"))
    results = {}
    for kind, key, value_of, old_value in (("diloco_peers", keys.diloco_peers(RUN), progress, progress),
                                           ("diloco_ready", keys.diloco_ready(RUN), lambda i: 1000 + i, lambda i: True)):
        old = records(args.records, writer.peer_id, key if kind == "diloco_peers" else f"{key}_1000", old_value)
        new = records(args.records, writer.owner, key, value_of)
        start = time.perf_counter()
        signed = [dataclasses.replace(record, value=signer.sign_value(record)) for record in new]
        sign_s = time.perf_counter() - start
        start = time.perf_counter()
        assert all(checker.validate(record) for record in signed)
        validate_s = time.perf_counter() - start
        start = time.perf_counter()
        assert all(peer_of_subkey(writer.owner) == writer.peer_id for _ in signed)
        read_s = time.perf_counter() - start
        before = sum(len(r.subkey) + len(r.value) for r in old) / len(old)
        after = sum(len(r.subkey) + len(r.value) for r in signed) / len(signed)
        results[kind] = {"bytes_before": round(before, 1), "bytes_after": round(after, 1),
                         "sign_us": round(1e6 * sign_s / len(new), 1), "validate_us": round(1e6 * validate_s / len(new), 1),
                         "reader_subkey_us": round(1e6 * read_s / len(new), 2)}
    print(f"{'record':14} {'bytes before':>12} {'bytes after':>12} {'ratio':>6} {'sign us':>8} {'validate us':>11}")
    for kind, row in results.items():
        print(f"{kind:14} {row['bytes_before']:12.1f} {row['bytes_after']:12.1f} "
              f"{row['bytes_after'] / row['bytes_before']:6.1f} {row['sign_us']:8.1f} {row['validate_us']:11.1f}")
    if args.out is not None:
        args.out.write_text(json.dumps({"records": args.records, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
