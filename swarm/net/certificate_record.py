"""Admission certificates (:mod:`swarm.net.certificate`) in the DHT, where peers look each other's up.

Under ``run_{fingerprint}_certificates`` (:func:`swarm.net.keys.certificates_key`) each certified peer
stores its own certificate, subkey its peer id, value ``[canonical certificate, authority signature]``,
for :data:`CERTIFICATE_TTL` seconds, refreshed. The value speaks for itself (the authority signed it),
so no owner signature is needed: storing someone else's certificate gains nothing. Every node of the
run runs :class:`CertificateValidator`, which refuses under that key anything that is not a valid,
unexpired certificate of the run for the peer id in the subkey, larger than :data:`MAX_RECORD_BYTES`,
or expiring later than the certificate or :data:`CERTIFICATE_TTL` (plus clock slack) ahead.
"""

from __future__ import annotations

from typing import Optional

import hivemind
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time, get_logger

from swarm.errors import ManifestError
from swarm.net.certificate import MAX_CERTIFICATE_BYTES, Certificate, SignedCertificate, verify_certificate
from swarm.net.keys import certificates_key
from swarm.net.signed_record import CLOCK_SLACK, KeyGuard

logger = get_logger(__name__)

CERTIFICATE_TTL = 600.0
MAX_RECORD_BYTES = MAX_CERTIFICATE_BYTES + 512  # the signature (344 bytes for RSA-2048) and msgpack framing


class CertificateValidator(KeyGuard):
    """Refuses, under the certificates key of run ``run`` (a fingerprint), every record but a valid certificate."""

    def __init__(self, run: str):
        super().__init__(certificates_key(run), f"a certificate record of run {run}")
        self.run = run

    def check(self, record: DHTRecord) -> tuple[Optional[str], str]:
        """(None, "") for a genuine record, else (reason, detail); reasons: ``oversized``, ``undecodable``,
        ``forged`` (not a valid certificate of this run), ``identity`` (filed under another peer id),
        ``expiration``."""
        if len(record.value) > MAX_RECORD_BYTES:
            return "oversized", f"{len(record.value)} bytes, at most {MAX_RECORD_BYTES}"
        try:
            peer_id = MSGPackSerializer.loads(record.subkey)
            data, signature = MSGPackSerializer.loads(record.value)
        except Exception as e:  # msgpack raises several types for garbage; all mean the same here
            return "undecodable", type(e).__name__
        try:
            certificate = verify_certificate(data, signature, self.run)
        except ManifestError as e:
            return "forged", str(e)
        if certificate.peer_id != peer_id:
            return "identity", f"the certificate of {certificate.peer_id} stored under {str(peer_id)[:64]!r}"
        limit = min(certificate.expires, get_dht_time() + CERTIFICATE_TTL) + CLOCK_SLACK
        if record.expiration_time > limit:
            return "expiration", f"expires {record.expiration_time - get_dht_time():.0f}s ahead, past its limit"
        return None, ""


def publish_certificate(dht: hivemind.DHT, signed: SignedCertificate, run: str) -> bool:
    """Store this peer's certificate for :data:`CERTIFICATE_TTL` seconds (not past its expiry); True if a node took it."""
    expiration = min(get_dht_time() + CERTIFICATE_TTL, signed.certificate.expires)
    return bool(dht.store(certificates_key(run), subkey=signed.certificate.peer_id,
                          value=[signed.data, signed.signature], expiration_time=expiration))


def read_certificates(dht: hivemind.DHT, run: str, timeout: Optional[float] = None) -> dict[str, Certificate]:
    """peer id -> certificate, for every valid certificate of the run the DHT holds (checked again here)."""
    found = dht.get(certificates_key(run), latest=True, return_future=True).result(timeout)
    entries = getattr(found, "value", None)
    certificates = {}
    for peer_id, item in (entries.items() if isinstance(entries, dict) else ()):
        try:
            data, signature = item.value
            certificate = verify_certificate(data, signature, run)
        except (ManifestError, TypeError, ValueError):
            continue  # the DHT nodes refuse these; one that gets through is simply not counted
        if certificate.peer_id == peer_id:
            certificates[peer_id] = certificate
    return certificates
