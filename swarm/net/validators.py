"""Every validator a swarm peer's DHT node runs, in one list for :func:`swarm.net.dht.start_dht`."""

from __future__ import annotations

from hivemind.dht.validation import RecordValidatorBase
from hivemind.utils.crypto import RSAPrivateKey

from swarm.net.diloco_records import DEFAULT_BOUNDS, DiLoCoRecordGuard, RecordBounds
from swarm.net.exclusion_record import ExclusionRecordGuard
from swarm.net.metrics_record import metrics_validators


def run_validators(run_id: str, private_key: RSAPrivateKey,
                   bounds: RecordBounds = DEFAULT_BOUNDS) -> list[RecordValidatorBase]:
    """hivemind's signature and schema validators and this project's guards for every record kind of
    the run (:mod:`swarm.net.keys`).

    ``private_key`` must be the peer's identity key: the DHT keeps the first RSASignatureValidator it is
    given and signs every ``[owner:...]`` record with it. ``bounds``: what DiLoCo records may claim
    (:meth:`RecordBounds.for_run`); every node of a run should use the run's.
    """
    validators = metrics_validators(run_id, private_key)
    return validators + [ExclusionRecordGuard(run_id, validators[0]), DiLoCoRecordGuard(run_id, validators[0], bounds)]
