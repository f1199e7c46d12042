"""The signed metrics record every peer publishes under ``{run_id}_metrics``: schema and validators.

``{run_id}_metrics`` is protected three ways, on every peer that stores or fetches it:

1. hivemind's :class:`RSASignatureValidator`: the subkey names the owner's RSA public key and the
   value carries the owner's signature, so no one else can write or overwrite that subkey;
2. hivemind's :class:`SchemaValidator` with :class:`MetricsSchema` (strict types, bounded sizes);
3. :class:`MetricsRecordGuard`, which checks the same before them, counts what it refuses and why
   (each peer publishes those counts in its own record, so attacks show swarm-wide), caps the
   record's size, and checks that the ``peer_id`` a record claims is the one derived from the key
   that signed it (see :mod:`swarm.net.identity`): a peer cannot speak for another peer id.

Values that pass all three can still be implausible (a peer may lie about its own numbers); the
monitor flags those (:mod:`swarm.telemetry.collector`) rather than trusting them.
"""

from __future__ import annotations

from typing import Dict, Optional

from hivemind.dht.crypto import RSASignatureValidator
from hivemind.dht.schema import BytesWithPublicKey, SchemaValidator
from hivemind.dht.validation import DHTRecord, RecordValidatorBase
from hivemind.utils import get_logger
from hivemind.utils.crypto import RSAPrivateKey
from pydantic.v1 import BaseModel, Extra, StrictFloat, ValidationError, confloat, conint, constr, validator

from swarm.config.schema import MAX_METRICS_TTL
from swarm.net.identity import peer_id_of_owner
from swarm.net.keys import metrics_key
from swarm.net.refusals import MAX_REASONS, REASON_PATTERN
from swarm.net.signed_record import SignedRecordGuard, Verdict

logger = get_logger(__name__)

# A genuine record is about 700 bytes with its signature, 2.3 kB at most (every name and refusal reason
# at its bound; measured in tests/test_metrics_records.py); anything larger is an attack.
MAX_RECORD_BYTES = 4096
ROLES = ("bootstrap", "volunteer", "institution")
STATES = ("running", "finished", "left")
REACHABILITY = ("direct", "relayed", "client")


def _one_of(values: tuple[str, ...]):
    return constr(strict=True, regex="^(" + "|".join(values) + r")\Z")


# pydantic v1 constrained types, named once: strict, so hivemind's SchemaValidator never converts.
# Patterns end in \Z: pydantic v1 matches with re.match, and $ would accept a trailing newline.
_PeerId = constr(strict=True, regex=r"^[1-9A-HJ-NP-Za-km-z]{32,128}\Z")  # a base58 libp2p peer id
_Role, _State, _Reachability = _one_of(ROLES), _one_of(STATES), _one_of(REACHABILITY)
_Reason = constr(strict=True, regex=REASON_PATTERN)  # open: see swarm.net.refusals
_Name = Optional[constr(strict=True, max_length=64)]
_Count = conint(strict=True, ge=0, le=2**62)
_Rate = confloat(strict=True, ge=0.0, le=1e12)
_Seconds = confloat(strict=True, ge=0.0, le=1e10)
_Loss = Optional[confloat(strict=True, ge=0.0, le=1e6)]
_Version = constr(strict=True, max_length=32)


class PeerMetrics(BaseModel):
    """One peer's own report. Strict types: hivemind's SchemaValidator refuses anything it would convert."""

    peer_id: _PeerId
    role: _Role
    state: _State
    display_name: _Name
    organization: _Name
    device: _Name
    epoch: _Count  # the peer's local epoch (swarm epochs it has applied)
    samples_total: _Count  # samples this process trained on since it started
    samples_per_second: _Rate
    loss: _Loss  # training loss, exponential moving average over local steps
    heldout_loss: _Loss  # mean loss on the fixed held-out batches at the last epoch change
    bytes_sent: Optional[_Count]  # None: cannot be measured on this peer (see swarm.telemetry.traffic)
    bytes_received: Optional[_Count]
    rounds_ok: _Count  # gradient all-reduce rounds that completed
    rounds_failed: _Count  # rounds that failed or timed out (the peer then used its local gradients)
    # what this peer refused, by reason (attacks it has seen; at most MAX_REASONS each, see swarm.net.refusals):
    refused: Dict[_Reason, _Count]  # distinct DHT records its DHT node refused (of any signed kind)
    refused_requests: Dict[_Reason, _Count]  # other peers' requests its averaging service refused
    reachability: _Reachability
    uptime: _Seconds  # seconds since the peer process started
    version: _Version
    time: StrictFloat  # DHT time of writing

    class Config:
        extra = Extra.forbid

    @validator("refused", "refused_requests")
    def _few_reasons(cls, counts: dict) -> dict:
        if len(counts) > MAX_REASONS:
            raise ValueError(f"{len(counts)} reasons, at most {MAX_REASONS}")
        return counts


class MetricsSchema(BaseModel):
    """The schema of ``{run_id}_metrics`` for hivemind's SchemaValidator (its field name is the key suffix)."""

    metrics: Dict[BytesWithPublicKey, PeerMetrics]


def metrics_validators(run_id: str, private_key: RSAPrivateKey) -> list[RecordValidatorBase]:
    """Validators every swarm peer's DHT needs; pass them to :func:`swarm.net.dht.start_dht`.

    ``private_key`` must be the peer's identity key: the DHT keeps the first RSASignatureValidator
    it is given and signs every ``[owner:...]`` record with its key (hivemind.Optimizer's tracker
    must get the same key, see :mod:`swarm.train.sync`).
    """
    signatures = RSASignatureValidator(private_key)
    return [signatures, SchemaValidator(MetricsSchema, prefix=run_id), MetricsRecordGuard(run_id, signatures)]


class MetricsRecordGuard(SignedRecordGuard):
    """Checks ``{run_id}_metrics`` records before hivemind's validators do, and says why it refuses one
    (:class:`~swarm.net.signed_record.SignedRecordGuard`): ``oversized``, ``unsigned`` (the subkey
    names no RSA owner), ``bad_signature``, ``schema``, ``impersonation`` (the claimed peer id is not
    the signer's).
    """

    def __init__(self, run_id: str, signatures: RSASignatureValidator):
        # metrics.ttl is each peer's own setting, bounded for every peer by the same MAX_METRICS_TTL
        super().__init__(keys={metrics_key(run_id): MAX_METRICS_TTL}, signatures=signatures, max_bytes=MAX_RECORD_BYTES)
        self.run_id = run_id

    def check_value(self, key: str, owner: str, value, record: DHTRecord) -> Verdict:
        try:
            parsed = PeerMetrics.parse_obj(value)
        except (ValidationError, ValueError, TypeError) as e:
            return "schema", f"from {owner}: {_first_line(e)}"
        if parsed.dict() != value:
            return "schema", f"from {owner}: missing fields or values of the wrong type"
        if parsed.peer_id != owner:
            return "impersonation", f"signed by {owner} but claims to be {parsed.peer_id}"
        return None, ""


def parse_metrics(value) -> tuple[list[tuple[str, PeerMetrics]], list[dict]]:
    """Records of a ``dht.get(metrics_key(...), latest=True)`` result: genuine ``(owner peer id, metrics)``
    pairs, and a description of each entry that fails the same checks (normally none: the DHT node
    already dropped them, this is a second line of defence in the reading process)."""
    entries = getattr(value, "value", None)
    if not isinstance(entries, dict):
        return [], []
    genuine, refused = [], []
    for owner, item in entries.items():
        payload = getattr(item, "value", None)
        owner_peer_id = peer_id_of_owner(owner) if isinstance(owner, bytes) else None
        try:
            metrics = PeerMetrics.parse_obj(payload)
        except (ValidationError, TypeError) as e:
            refused.append({"reason": "schema", "detail": _first_line(e)})
            continue
        if owner_peer_id is None or metrics.peer_id != owner_peer_id:
            refused.append({"reason": "impersonation", "detail": f"claims {metrics.peer_id}"})
            continue
        genuine.append((owner_peer_id, metrics))
    return genuine, refused


def _first_line(error: Exception) -> str:
    return " ".join(str(error).split())[:200]
