"""`swarm run create`: the run authority key and the signed run manifest of the config's run.

The key file (libp2p's RSA format, like a peer identity) is made if missing and never leaves the
operator's machine. Running the command again with the same key and ``--out`` signs the next
version of the same run (same fingerprint), e.g. to change its settings; bootstrap peers publish
the newest version they are given.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from peers.lifecycle import write_json_atomic
from swarm.config.schema import SwarmConfig
from swarm.errors import ConfigError
from swarm.net.identity import load_identity
from swarm.net.manifest import contradictions, explicit_keys, new_manifest
from swarm.net.manifest_record import authority_of, read_manifest_file, sign_manifest

logger = logging.getLogger(__name__)


def create_run(config: SwarmConfig, *, key_path: Path, out: Path) -> None:
    key = load_identity(Path(key_path).expanduser())
    os.chmod(key.path, 0o600)
    authority = authority_of(key.private_key)
    version = 1
    if Path(out).exists():
        previous = read_manifest_file(out)
        draft = new_manifest(config, authority=authority)
        if previous.fingerprint != draft.fingerprint:
            raise ConfigError(f"{out} holds the manifest of another run ({previous.manifest.run_id}, "
                              f"{previous.fingerprint}) or another authority key; choose another --out")
        version = previous.manifest.version + 1
        changed = contradictions(config, explicit_keys(draft.settings), previous.manifest)
        logger.info(f"version {version} of run {config.run_id}; changed: {'; '.join(changed) or 'nothing'}")
    signed = sign_manifest(new_manifest(config, authority=authority, version=version), key.private_key)
    write_json_atomic(Path(out), signed.as_dict())
    print(f"run {config.run_id}: manifest version {version} written to {out}", flush=True)
    print(f"  fingerprint {signed.fingerprint}", flush=True)
    print(f"  authority key {key.path} ({'new' if key.fresh else 'kept'}; keep it private: only it can sign "
          f"a new version)", flush=True)
    print(f"Start a bootstrap peer of this run with:\n  swarm bootstrap --manifest {out}", flush=True)
