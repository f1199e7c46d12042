"""`swarm bootstrap`: a DHT-only peer that keeps the swarm reachable.

Its identity lives in a key file, so its peer id and multiaddr survive restarts and the line other
peers join with stays valid. It publishes a metrics record (role ``bootstrap``) as a sign of life,
runs until SIGINT/SIGTERM and exits non-zero if its DHT or one of its background threads dies.

With ``--manifest`` it serves a run that has an owner: it takes the run's settings from the signed
manifest (refusing to start if its own config contradicts them), publishes the manifest in the DHT
(watching the file, so a newer version signed by the authority, e.g. one that revokes a peer,
replaces the old one at once), refuses forged manifest and certificate records, and prints the
complete line a newcomer joins with. A private run's bootstrap peer needs a certificate
(``swarm admit --role bootstrap``) like any other peer of the run.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path
from typing import Optional

from peers.lifecycle import StopSignals, check_alive, run_bounded, set_log_peer, write_json_atomic
from peers.status_file import StatusFile
from swarm.config.schema import SwarmConfig
from swarm.errors import SwarmError
from swarm.net.admission import Admission, authorizer_for, check_admitted, own_certificate
from swarm.net.certificate_record import CertificateValidator
from swarm.net.dht import shutdown_dht, start_dht, visible_maddrs
from swarm.net.identity import load_identity
from swarm.net.manifest import apply_manifest
from swarm.net.manifest_record import ManifestPublisher, ManifestValidator, SignedManifest
from swarm.net.validators import run_validators
from swarm.telemetry.metrics import MetricsPublisher, PeerFacts
from swarm.telemetry.probe import install_probe
from swarm.train.rounds import record_bounds

logger = logging.getLogger(__name__)

DEFAULT_IDENTITY = Path("~/.swarm/bootstrap.key")
LIVENESS_PERIOD = 2.0  # seconds between checks that the DHT process is still alive
METRICS_SHUTDOWN_TIMEOUT = 4.0


def run_bootstrap(config: SwarmConfig, *, address_file: Optional[Path],
                  status_path: Optional[Path] = None, manifest_path: Optional[Path] = None,
                  explicit: frozenset[str] = frozenset()) -> None:
    stop = StopSignals()
    manifest = admission = certificate = None
    validators = []
    identity = load_identity(Path(config.network.identity_path or DEFAULT_IDENTITY))
    if manifest_path is not None:
        manifest = ManifestPublisher(path=manifest_path)
        run = manifest.signed.fingerprint
        _, certificate = own_certificate(config.peer.certificate, run=run, peer_id=identity.peer_id)
        check_admitted(manifest.signed, certificate, trains=False)
        config = apply_manifest(config, set(explicit), manifest.signed.manifest)
        validators += [ManifestValidator(run), CertificateValidator(run)]
    dht = start_dht(config.network, identity=identity, stop=stop.event,
                    record_validators=validators + run_validators(config.run_id, identity.private_key,
                                                                  record_bounds(config)),
                    authorizer=authorizer_for(identity, certificate, manifest.signed.fingerprint) if manifest else None)
    publisher = None
    state = {"peer_id": str(dht.peer_id), "role": "bootstrap", "finished": False, "run_id": config.run_id,
             "fingerprint": manifest.signed.fingerprint if manifest else None}
    status_file = StatusFile(status_path, dht=dht, snapshot=lambda: dict(state),
                             initial_peers=len(config.network.initial_peers))
    try:
        set_log_peer("bootstrap", str(dht.peer_id))
        install_probe(dht)  # what `swarm doctor` asks of the swarm's peers
        maddrs = visible_maddrs(dht)
        if config.metrics is not None:
            publisher = MetricsPublisher(dht=dht, identity=identity, run_id=config.run_id, config=config.metrics,
                                         facts=PeerFacts(role="bootstrap", peer=config.peer)).start()
        if address_file is not None:
            write_json_atomic(address_file, {"peer_id": str(dht.peer_id), "maddrs": maddrs})
        if manifest is not None:
            manifest.start(dht)
            admission = Admission(dht=dht, run=manifest.signed.fingerprint, manifest=manifest.signed,
                                  certificate=certificate, follows_settings=False).start()
        logger.info(f"identity {identity.path} (peer id {dht.peer_id}); run {config.run_id}")
        _print_join_lines(maddrs, manifest.signed if manifest else None)
        status_file.start()
        while not stop.event.wait(LIVENESS_PERIOD):
            if not dht.is_alive():
                raise SwarmError("the DHT process of this bootstrap peer died; restart it")
            check_alive(publisher, status_file, dht.rejoin, manifest, admission)
        stop.disarm()
        if publisher is not None:
            run_bounded("metrics shutdown", partial(publisher.shutdown, timeout=METRICS_SHUTDOWN_TIMEOUT / 2),
                        METRICS_SHUTDOWN_TIMEOUT)
            publisher = None
    finally:
        if admission is not None:
            admission.shutdown()
        if manifest is not None:
            manifest.shutdown()
        status_file.shutdown()
        if publisher is not None:
            publisher.shutdown(leave=False, timeout=1.0)
        shutdown_dht(dht)
        state["finished"] = True
        status_file.publish()
    logger.info("bootstrap peer left cleanly")


def _print_join_lines(maddrs: list[str], signed: Optional[SignedManifest]) -> None:
    """The line a newcomer copies: complete with the run's fingerprint when this peer serves a manifest
    (and, for a private run, the certificate each admitted peer got from the run's owner)."""
    if signed is None:
        print("swarm bootstrap peer is running (no --manifest: joiners need this peer's config and run_id). "
              "Others join with:", flush=True)
    else:
        print(f"swarm bootstrap peer of run {signed.fingerprint} ({signed.manifest.admission}) is running. "
              f"Others join with:", flush=True)
    run = f" --run {signed.fingerprint}" if signed else ""
    if signed is not None and signed.manifest.admission == "private":
        run += " --certificate YOUR_CERTIFICATE.json"
    for maddr in maddrs:
        print(f"  swarm join --initial-peers {maddr}{run}", flush=True)
