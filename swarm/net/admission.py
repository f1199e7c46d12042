"""Who may take part in a run with a manifest, as this peer knows it: :class:`Admission`.

A peer that joined a run by its fingerprint keeps, in the background, every ``manifest.refresh``
seconds: the newest manifest (its revocations take effect here and in the DHT process's authorizer;
a version that changes the run's settings makes :meth:`Admission.check` raise, so the peer restarts
into it), its own certificate published in the DHT, and the certificates of the others
(:mod:`swarm.net.certificate_record`).

The averaging service asks :meth:`Admission.refusal` about the authenticated caller of every request
(libp2p's ``context.remote_id``): in a **private** run only a peer with a valid, unexpired, unrevoked
certificate with a training role gets an answer; in an **open** run anyone does, except revoked peers.
:meth:`Admission.role` is what other code may believe about a peer's role: ``institution`` only
through a certificate, in every policy.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Optional

import hivemind
from hivemind.utils import get_logger

from swarm.errors import ManifestError
from swarm.loops import PeriodicLoop
from swarm.net.authorizer import RunAuthorizer, install_revocations
from swarm.net.certificate import (
    TRAINING_ROLES,
    Certificate,
    SignedCertificate,
    check_own_certificate,
    read_certificate,
)
from swarm.net.certificate_record import publish_certificate, read_certificates
from swarm.net.dht import DHT_CALL_FAILURES
from swarm.net.identity import Identity
from swarm.net.manifest_record import SignedManifest, newest_manifest

logger = get_logger(__name__)

MIN_WAKE_INTERVAL = 2.0  # seconds: an unknown caller triggers an early refresh at most this often
DHT_TIMEOUT = 20.0


class Admission:
    """This peer's view of a run's admissions (see module doc).

    :param run: the run's fingerprint.
    :param manifest: the manifest this peer joined with (its settings are this peer's).
    :param certificate: this peer's own certificate, if it has one (published for the others).
    :param follows_settings: a new manifest version that changes the run's settings makes :meth:`check`
      raise (a trainer restarts into them); False for peers that do not train (bootstrap, monitor).
    """

    def __init__(self, *, dht: hivemind.DHT, run: str, manifest: SignedManifest,
                 certificate: Optional[SignedCertificate] = None, follows_settings: bool = True):
        self.dht, self.run, self.certificate = dht, run, certificate
        self.follows_settings = follows_settings
        self.manifest = manifest.manifest
        self.private = self.manifest.admission == "private"
        self.revoked: frozenset[str] = frozenset(self.manifest.revoked)
        self.changed: Optional[str] = None  # why this peer must restart: a new manifest version changed the settings
        self._certificates: dict[str, Certificate] = {}
        self._lock = threading.Lock()
        self._last_wake = 0.0
        self._loop = PeriodicLoop(name="admission", iteration=self.refresh, period=self.manifest.refresh,
                                  startup=self.refresh, retry_on=DHT_CALL_FAILURES)

    def start(self) -> "Admission":
        """Read the certificates and publish this peer's own once (errors reach the caller), then keep them fresh."""
        self._loop.start()
        return self

    def refusal(self, peer) -> Optional[str]:
        """None if ``peer`` (a PeerID or its base58 text) may average with this peer, else the reason: ``revoked``, ``not-admitted``,
        ``expired`` or ``role`` (a monitor's or bootstrap peer's certificate does not admit to training)."""
        peer_id = str(peer)
        if peer_id in self.revoked:
            return "revoked"
        if not self.private:
            return None
        with self._lock:
            certificate = self._certificates.get(peer_id)
        if certificate is None:
            self._wake()  # perhaps a newcomer whose certificate came after the last refresh
            return "not-admitted"
        if certificate.expired():
            return "expired"
        return None if certificate.role in TRAINING_ROLES else "role"

    def role(self, peer_id: str) -> str:
        """``institution`` for a peer with a valid institution certificate, else ``volunteer``."""
        with self._lock:
            certificate = self._certificates.get(peer_id)
        valid = certificate is not None and not certificate.expired() and peer_id not in self.revoked
        return "institution" if valid and certificate.role == "institution" else "volunteer"

    def refresh(self) -> None:
        """One round: the newest manifest, this peer's certificate published, the others' read."""
        newest = newest_manifest(self.dht, self.run)
        if newest is not None and newest.manifest.version > self.manifest.version:
            self._adopt(newest)
        if self.private or self.revoked:
            install_revocations(self.dht, self.revoked)
        if self.certificate is not None and not publish_certificate(self.dht, self.certificate, self.run):
            logger.warning(f"no DHT node took this peer's certificate; trying again in {self.manifest.refresh:g}s")
        certificates = read_certificates(self.dht, self.run, timeout=DHT_TIMEOUT)
        with self._lock:
            self._certificates = certificates

    def _adopt(self, newest: SignedManifest) -> None:
        manifest = newest.manifest
        added = sorted(set(manifest.revoked) - self.revoked)
        logger.info(f"run manifest version {manifest.version} (was {self.manifest.version})"
                    + (f"; revoked: {', '.join(added)}" if added else ""))
        if self.follows_settings and (manifest.settings != self.manifest.settings
                                      or manifest.codecs != self.manifest.codecs):
            self.changed = (f"version {manifest.version} of the manifest of run {self.run} changed the run's "
                            f"settings; restart this peer to train with them")
        self.revoked = frozenset(manifest.revoked)
        self.manifest = manifest
        own = self.certificate.certificate.peer_id if self.certificate is not None else None
        if own is not None and own in self.revoked:
            self.changed = f"the run authority revoked this peer's certificate ({own}) in manifest version {manifest.version}"

    def _wake(self) -> None:
        now = time.monotonic()
        if now - self._last_wake >= MIN_WAKE_INTERVAL:
            self._last_wake = now
            self._loop.wake()

    def check(self) -> None:
        """:raises BackgroundError: the refresh loop died. :raises ManifestError: this peer must restart (see :attr:`changed`)."""
        self._loop.check()
        if self.changed is not None:
            raise ManifestError(self.changed)

    def shutdown(self, timeout: float = 2.0) -> None:
        self._loop.shutdown(timeout)


def own_certificate(path: Optional[Path], *, run: Optional[str], peer_id: str) -> tuple[Optional[str], Optional[SignedCertificate]]:
    """This peer's certificate (from ``peer.certificate``) and the run it joins: ``run`` if given, else
    the certificate's. (None, None) without either.

    :raises ManifestError: the certificate is unreadable, forged, expired, of another run or of another peer id.
    """
    if path is None:
        return run, None
    signed, certified_run = read_certificate(path)
    check_own_certificate(signed, run=run or certified_run, peer_id=peer_id)
    return run or certified_run, signed


def certified_run_id(path: Optional[Path], default: str) -> str:
    """The run id the certificate at ``path`` names (a certificate names its run), else ``default``.

    :raises ManifestError: the certificate is unreadable, forged or expired.
    """
    return read_certificate(path)[0].certificate.run_id if path is not None else default


def own_role(certificate: Optional[SignedCertificate]) -> str:
    """The role this peer trains as: its certificate's (institution or volunteer), else volunteer."""
    role = certificate.certificate.role if certificate is not None else "volunteer"
    return role if role in TRAINING_ROLES else "volunteer"


def authorizer_for(identity: Identity, certificate: Optional[SignedCertificate], run: Optional[str]) -> Optional[RunAuthorizer]:
    """The DHT authorizer this peer needs: one for a private run's certificate, else None (open runs' DHTs check no one)."""
    if certificate is None or certificate.certificate.admission != "private":
        return None
    return RunAuthorizer(identity.private_key, certificate, run)


def check_admitted(manifest: SignedManifest, certificate: Optional[SignedCertificate], *, trains: bool) -> None:
    """:raises ManifestError: a private run and no certificate, or (``trains``) one without a training role."""
    if manifest.manifest.admission != "private":
        return
    if certificate is None:
        raise ManifestError(f"run {manifest.manifest.run_id} ({manifest.fingerprint}) is private: ask its owner for a "
                            f"certificate (`swarm admit` with your peer id from `swarm id`) and pass --certificate")
    if trains and certificate.certificate.role not in TRAINING_ROLES:
        raise ManifestError(f"this peer's certificate makes it a {certificate.certificate.role}, which does not train "
                            f"in run {manifest.manifest.run_id}")
