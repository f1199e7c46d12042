"""Admission certificates: the run authority's signed word that a peer id may take part, and as what.

``swarm admit`` signs one with the run authority key (the key that signs the run's manifest, see
:mod:`swarm.net.manifest`) for one peer id, with a role, an organization and an expiry. A certificate
names the run (its id and the authority's public key, which together give the run's fingerprint), so
it checks out with nothing but itself and the fingerprint: a peer can verify one before it has read
the manifest, and the DHT nodes of a private run check one in every request (:mod:`swarm.net.authorizer`).

Roles: ``institution`` and ``volunteer`` train (institutions are preferred as state donors; the role
exists only through a certificate, in every admission policy), ``monitor`` watches (``swarm monitor``,
``swarm status``: DHT reads only), ``bootstrap`` keeps the DHT reachable. A certificate is refused
once it expires or its peer id is in the manifest's ``revoked`` list.

The signature covers the certificate's canonical JSON (as the manifest's does). This module imports
neither hivemind's DHT nor torch.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from cryptography.exceptions import UnsupportedAlgorithm
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from swarm.config.loading import describe_validation_error
from swarm.config.schema import SwarmConfig
from swarm.errors import ManifestError
from swarm.net.manifest import PEER_ID_RE, canonical_json, fingerprint

FORMAT = 1
ROLES = ("institution", "volunteer", "monitor", "bootstrap")
TRAINING_ROLES = frozenset({"institution", "volunteer"})
MAX_CERTIFICATE_BYTES = 2048  # about 600 bytes with a 2048-bit authority key (measured)
MAX_VALIDITY = 400 * 86400.0  # seconds; a longer-lived admission is a new certificate


class Certificate(BaseModel):
    """What the authority says about one peer id (unsigned)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[1] = FORMAT
    run_id: str = Field(pattern=SwarmConfig.model_fields["run_id"].metadata[0].pattern)
    authority: str = Field(pattern=r"^ssh-rsa [A-Za-z0-9+/=]{100,1200}$")
    peer_id: str = Field(pattern=PEER_ID_RE.pattern)
    role: Literal[ROLES]
    organization: Optional[str] = Field(None, max_length=64, pattern=r"^[^\x00-\x1f\x7f]*$")
    admission: Literal["open", "private"] = Field(
        description="the run's admission policy (it never changes): a private run's DHT admits certified peers only")
    issued: float = Field(ge=0, le=1e11)
    expires: float = Field(ge=0, le=1e11)

    def canonical(self) -> bytes:
        return canonical_json(self.model_dump(mode="json"))

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.authority, self.run_id)

    def expired(self, now: Optional[float] = None) -> bool:
        return (time.time() if now is None else now) >= self.expires


@dataclass(frozen=True)
class SignedCertificate:
    certificate: Certificate
    signature: bytes  # base64, as RSAPrivateKey.sign returns it

    @property
    def data(self) -> bytes:
        return self.certificate.canonical()

    def as_dict(self) -> dict:
        """The file ``swarm admit`` writes."""
        return {"certificate": self.certificate.model_dump(mode="json"), "signature": self.signature.decode(),
                "fingerprint": self.certificate.fingerprint}


def issue_certificate(key: RSAPrivateKey, *, run_id: str, admission: str, peer_id: str, role: str,
                      organization: Optional[str], valid_for: float, now: Optional[float] = None) -> SignedCertificate:
    """A certificate for ``peer_id`` signed by the run authority ``key``, valid ``valid_for`` seconds.

    :raises ManifestError: a field is out of bounds (e.g. a malformed peer id, validity beyond a year).
    """
    if not 0 < valid_for <= MAX_VALIDITY:
        raise ManifestError(f"a certificate is valid for more than 0 and at most {MAX_VALIDITY / 86400:g} days")
    now = time.time() if now is None else now
    try:
        certificate = Certificate(run_id=run_id, authority=key.get_public_key().to_bytes().decode(), peer_id=peer_id,
                                  role=role, organization=organization, admission=admission, issued=now,
                                  expires=now + valid_for)
    except ValidationError as e:
        raise ManifestError(f"cannot issue this certificate: {describe_validation_error(e)}") from None
    return SignedCertificate(certificate, key.sign(certificate.canonical()))


def verify_certificate(data: bytes, signature: bytes, run: str, *, now: Optional[float] = None) -> Certificate:
    """The certificate in ``data`` if it is in canonical form, of the run with fingerprint ``run``,
    signed by that run's authority and not expired.

    :raises ManifestError: it is none of these (the message says which).
    """
    if not isinstance(data, bytes) or len(data) > MAX_CERTIFICATE_BYTES:
        raise ManifestError(f"a certificate is bytes of at most {MAX_CERTIFICATE_BYTES}")
    try:
        certificate = Certificate.model_validate_json(data)
    except ValidationError as e:
        raise ManifestError(f"not a valid certificate: {describe_validation_error(e)}") from None
    if certificate.canonical() != data:
        raise ManifestError("certificate is not in canonical form")
    if certificate.fingerprint != run:
        raise ManifestError(f"certificate of run {certificate.fingerprint}, not of {run}")
    try:
        authority = RSAPublicKey.from_bytes(certificate.authority.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ManifestError("the certificate's authority is not an RSA public key") from None
    if not isinstance(signature, bytes) or not authority.verify(data, signature):
        raise ManifestError(f"the certificate of {certificate.peer_id} is not signed by the authority of run {run}")
    if certificate.expired(now):
        raise ManifestError(f"the certificate of {certificate.peer_id} expired at {_when(certificate.expires)}")
    return certificate


def read_certificate(path: Path) -> tuple[SignedCertificate, str]:
    """The certificate file at ``path`` (checked) and its run's fingerprint.

    :raises ManifestError: unreadable, forged or expired.
    """
    try:
        tree = json.loads(Path(path).expanduser().read_text())
        data = canonical_json(tree["certificate"])
        signature = tree["signature"].encode()
        run = fingerprint(tree["certificate"]["authority"], tree["certificate"]["run_id"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"cannot read a certificate from {path} ({type(e).__name__}: {e})") from None
    try:
        certificate = verify_certificate(data, signature, run)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None
    return SignedCertificate(certificate, signature), run


def check_own_certificate(signed: SignedCertificate, *, run: str, peer_id: str) -> Certificate:
    """``signed`` if it admits this peer (``peer_id``) to run ``run``. :raises ManifestError: it does not."""
    certificate = signed.certificate
    if certificate.fingerprint != run:
        raise ManifestError(f"the certificate is for run {certificate.fingerprint}, not {run}")
    if certificate.peer_id != peer_id:
        raise ManifestError(f"the certificate is for peer {certificate.peer_id}, but this peer's identity is {peer_id}; "
                            f"run with the identity it was issued for (network.identity_path)")
    return certificate


def _when(timestamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(timestamp))
