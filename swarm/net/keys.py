"""Every DHT key the project uses, in one place, with the schema and signature rules of the ones it writes.

| key | written by | read by | lives |
|---|---|---|---|
| ``{run_id}_metrics``: one subkey per peer, ``[owner:<its RSA key>]`` -> :class:`PeerMetrics`, signed | every trainer and the bootstrap peer, each its own subkey, every ``metrics.period`` s | ``swarm monitor``, ``swarm status`` | ``metrics.ttl`` after its last write; a clean leave writes a last ``state: left`` record |
| ``{run_id}_progress`` | hivemind.Optimizer's ProgressTracker (sync mode), one signed subkey per peer (signed with the peer's identity key, see :mod:`swarm.train.sync`) | every sync-mode trainer (epoch, samples) | hivemind's metadata expiration (~60 s), refreshed |
| ``{run_id}_state_averager``, ``{run_id}_grad_averager`` | hivemind's averagers (sync mode): matchmaking and state-download priorities | the same, in other peers | seconds, refreshed |
| ``{run_id}_diloco_peers``: one subkey per peer, ``[owner:<its RSA key>]`` -> ``[[round, samples, time], [state round, total samples, state hash, role]]``, signed, bounded | each DiLoCo trainer every ``diloco.refresh_period``; a sync-mode trainer that finished a run writes ``[[], [epoch, epoch, state hash, role]]`` (:mod:`swarm.train.agreement`) | DiLoCo trainers: swarm samples this round and who takes part (progress, a heartbeat), which state the swarm agrees on (state sync); finished sync-mode trainers: which final model they settle on | ``DILOCO_TTL`` (at most, refused beyond it + 30 s), refreshed |
| ``{run_id}_diloco_ready``: one subkey per peer, ``[owner:<its RSA key>]`` -> the round it is ready to average, signed, bounded | each DiLoCo trainer when it is ready to average a round | matchmaking: who may lead the round | ``READY_TTL`` (at most, + 30 s) |
| ``{run_id}_exclusions``: one subkey per peer, ``[owner:<its RSA key>]`` -> up to 8 items of evidence: equivocation (two receipts signed by one reducer for one part, over different results) or persistent outliers (reports by two reducers a round, over several rounds, that they clipped one member), signed, every item verified by every node and reader | a DiLoCo trainer that caught a reducer equivocating or proved a member an outlier, when it did and every ``Exclusions`` refresh while the exclusion lasts | every DiLoCo trainer (:class:`swarm.averaging.exclusions.Exclusions`: whom not to average with, and until when), ``swarm status``, the monitor | ``EXCLUSION_TTL`` at most (+ 30 s), refreshed while an exclusion lasts (:mod:`swarm.net.exclusion_record`) |
| ``run_{fingerprint}_manifest``: one subkey per version -> ``[canonical manifest, signature]`` | the run's bootstrap peers (``--manifest``), every ``REFRESH_PERIOD`` | ``swarm join --run``; every peer of the run every ``manifest.refresh`` s (revocations, new versions) | ``MANIFEST_TTL``, refreshed; only the run authority's signature is accepted (:mod:`swarm.net.manifest_record`) |
| ``run_{fingerprint}_certificates``: one subkey per peer id -> ``[canonical certificate, authority signature]`` | every peer with a certificate (``--certificate``), its own, every ``manifest.refresh`` s | every peer of the run (:class:`swarm.net.admission.Admission`): who is admitted, and as what | ``CERTIFICATE_TTL``, refreshed, never past the certificate's expiry; only valid certificates of the run under their own peer id are accepted (:mod:`swarm.net.certificate_record`) |

DiLoCo records are signed by the peer that writes them and checked on every DHT node by
:class:`swarm.net.diloco_records.DiLoCoRecordGuard` (owner, signature, size, expiration, schema,
:class:`~swarm.net.diloco_records.RecordBounds`); the peer id a reader maps a record to is derived from the
signing key. All validators of a run: :func:`swarm.net.validators.run_validators`.

Each record kind has its own module here with its schema and validators: :mod:`swarm.net.metrics_record` (signed metrics) and :mod:`swarm.net.diloco_records` (progress, state and readiness); what they share is :mod:`swarm.net.signed_record`.
"""

from __future__ import annotations

DILOCO_TTL = 60.0
READY_TTL = 120.0
EXCLUSION_TTL = 86400.0  # the longest exclusion a run may set (averaging.robust.ban.cap)


def diloco_peers(run_id: str) -> str:
    return f"{run_id}_diloco_peers"


def diloco_ready(run_id: str) -> str:
    return f"{run_id}_diloco_ready"


def exclusions(run_id: str) -> str:
    return f"{run_id}_exclusions"


METRICS_SUFFIX = "metrics"


def metrics_key(run_id: str) -> str:
    return f"{run_id}_{METRICS_SUFFIX}"


def manifest_key(fingerprint: str) -> str:
    return f"run_{fingerprint}_manifest"


def certificates_key(fingerprint: str) -> str:
    return f"run_{fingerprint}_certificates"
