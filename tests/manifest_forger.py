"""An attacking DHT peer for tests/test_run_manifest.py: it stores forged manifests of a run it knows.

It joins the swarm as a DHT server whose only validator accepts anything, reads the run's genuine
manifest (to copy it), and keeps storing under the run's manifest key (every 2 s):

- ``altered``: version 2, the genuine manifest with ``model.n_layers`` changed after signing, the
  authority's signature kept;
- ``other_key``: version 3, ``model.n_layers`` changed and signed by the forger's own key, still
  naming the real authority;
- ``year_long``: the genuine version 1 with an expiration a year ahead (it would outlive any refresh).

Usage: manifest_forger.py INITIAL_PEER FINGERPRINT REPORT_JSON
"""

from __future__ import annotations

import signal
import sys
import threading
import time

import hivemind
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from harness.processes import write_json
from swarm.net.keys import manifest_key
from swarm.net.manifest_record import newest_manifest

FORGED_LAYERS = 12


class AcceptAll(RecordValidatorBase):
    def validate(self, record: DHTRecord) -> bool:
        return True


def main(initial_peer: str, fingerprint: str, report_path: str) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    dht = hivemind.DHT(initial_peers=[initial_peer], start=True, host_maddrs=["/ip4/127.0.0.1/tcp/0"],
                       record_validators=[AcceptAll()])
    try:
        deadline = time.monotonic() + 60
        genuine = None
        while genuine is None and time.monotonic() < deadline and not stop.is_set():
            genuine = newest_manifest(dht, fingerprint)
            stop.wait(0.5)
        if genuine is None:
            raise SystemExit("the genuine manifest never showed up")
        data, own_key = genuine.manifest.canonical(), RSAPrivateKey()
        altered = data.replace(b'"n_layers":4', b'"n_layers":%d' % FORGED_LAYERS)
        forgeries = {
            "altered": (2, [altered.replace(b'"version":1', b'"version":2'), genuine.signature], 300),
            "other_key": (3, [altered.replace(b'"version":1', b'"version":3'),
                              own_key.sign(altered.replace(b'"version":1', b'"version":3'))], 300),
            "year_long": (1, [data, genuine.signature], 365 * 86400),
        }
        report = {"stores": {}}
        while not stop.is_set():
            for name, (version, value, ttl) in forgeries.items():
                stored = dht.store(manifest_key(fingerprint), subkey=version, value=value,
                                   expiration_time=get_dht_time() + ttl)
                report["stores"][name] = bool(stored)
            write_json(report_path, report)
            stop.wait(2.0)
    finally:
        dht.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
