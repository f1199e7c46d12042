"""The swarm CLI with the DiLoCo record defences of issue 10 switched off, to show that the attack of
tests/diloco_attacker.py succeeds without them: no DHT-side guard on DiLoCo records, no bounds, and a
state adopted on one peer's word (the rule before: most samples wins). Test-only; nothing in the
library can switch these off.

Usage: undefended_peer.py <swarm CLI arguments>
"""

from __future__ import annotations

import sys

from swarm.net import diloco_records
from swarm.train import agreement

diloco_records.DiLoCoRecordGuard.validate = lambda self, record: True
diloco_records.RecordBounds.for_run = classmethod(lambda cls, **_: cls(max_round=2**62, max_round_samples=2**62))
agreement.adoptable = lambda *_: True

from peers.cli import main

if __name__ == "__main__":
    sys.exit(main())
