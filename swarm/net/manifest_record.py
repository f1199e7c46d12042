"""The signed run manifest (see :mod:`swarm.net.manifest`) on disk and in the DHT.

Signing uses hivemind's :class:`~hivemind.utils.crypto.RSAPrivateKey` (the run authority key is a key
file like a peer's identity, read by :func:`swarm.net.identity.load_identity`). The signature covers
the manifest's canonical bytes, so a manifest checks out the same way in a file, in a DHT record and
in a joiner's hands.

In the DHT it lives under ``run_{fingerprint}_manifest`` (:func:`swarm.net.keys.manifest_key`), one
subkey per version, value ``[canonical bytes, signature]``. Every node that knows the fingerprint (the
run's bootstrap peers and trainers) runs :class:`ManifestValidator` and refuses, under that key, any
record that is not a manifest of that fingerprint signed by its authority, whose subkey is not its
version, that is larger than :data:`MAX_RECORD_BYTES` or that expires more than
:data:`MAX_EXPIRATION_AHEAD` seconds ahead. Readers take the newest valid version.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import hivemind
from cryptography.exceptions import UnsupportedAlgorithm
from hivemind.dht.validation import DHTRecord
from hivemind.utils import MSGPackSerializer, get_dht_time, get_logger
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm.errors import ManifestError
from swarm.loops import PeriodicLoop
from swarm.net.keys import manifest_key
from swarm.net.manifest import MAX_MANIFEST_BYTES, RunManifest, canonical_json, parse_manifest
from swarm.net.signed_record import KeyGuard

logger = get_logger(__name__)

MANIFEST_TTL = 900.0  # seconds a published manifest record lives; publishers store it again every manifest.refresh
FILE_POLL = 1.0  # seconds between a publisher's looks at its manifest file
MAX_EXPIRATION_AHEAD = MANIFEST_TTL + 60.0  # slack for clocks that differ a little
MAX_RECORD_BYTES = MAX_MANIFEST_BYTES + 1024  # plus the signature (344 bytes for RSA-2048) and msgpack framing
FETCH_RETRY = 1.0  # seconds between DHT reads while the manifest has not been found


@dataclass(frozen=True)
class SignedManifest:
    manifest: RunManifest
    signature: bytes  # base64, as RSAPrivateKey.sign returns it

    @property
    def fingerprint(self) -> str:
        return self.manifest.fingerprint

    def as_dict(self) -> dict:
        """The file ``swarm run create`` writes (the fingerprint is there for people; it is recomputed on reading)."""
        return {"manifest": self.manifest.model_dump(mode="json"), "signature": self.signature.decode(),
                "fingerprint": self.fingerprint}


def authority_of(key: RSAPrivateKey) -> str:
    """The ``ssh-rsa ...`` public key a manifest names as its authority."""
    return key.get_public_key().to_bytes().decode()


def sign_manifest(manifest: RunManifest, key: RSAPrivateKey) -> SignedManifest:
    if authority_of(key) != manifest.authority:
        raise ManifestError("the manifest names another authority than the key signing it")
    return SignedManifest(manifest, key.sign(manifest.canonical()))


def verify_manifest(data: bytes, signature: bytes, fingerprint: Optional[str] = None) -> SignedManifest:
    """The manifest in ``data`` if ``signature`` is its authority's and (if given) it has ``fingerprint``.

    :raises ManifestError: malformed, oversized, not canonical, of another run, or a bad signature.
    """
    manifest = parse_manifest(data)
    if fingerprint is not None and manifest.fingerprint != fingerprint:
        raise ManifestError(f"manifest of run {manifest.fingerprint}, not of {fingerprint}")
    try:
        public = RSAPublicKey.from_bytes(manifest.authority.encode())
    except (ValueError, TypeError, UnsupportedAlgorithm):
        raise ManifestError("the manifest's authority is not an RSA public key") from None
    if not isinstance(signature, bytes) or not public.verify(data, signature):
        raise ManifestError(f"the signature of the manifest of run {manifest.fingerprint} is not its authority's")
    return SignedManifest(manifest, signature)


def read_manifest_file(path: Path) -> SignedManifest:
    """A manifest file written by ``swarm run create``, checked. :raises ManifestError: unreadable or forged."""
    try:
        tree = json.loads(Path(path).read_text())
        data = canonical_json(tree["manifest"])
        signature = tree["signature"].encode()
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ManifestError(f"cannot read a run manifest from {path} ({type(e).__name__}: {e})") from None
    try:
        return verify_manifest(data, signature)
    except ManifestError as e:
        raise ManifestError(f"{path}: {e}") from None


class ManifestValidator(KeyGuard):
    """Refuses, under the manifest key of ``fingerprint``, every record but the authority's (see module doc)."""

    def __init__(self, fingerprint: str):
        super().__init__(manifest_key(fingerprint), f"a manifest record of run {fingerprint}")
        self.fingerprint = fingerprint

    def check(self, record: DHTRecord) -> tuple[Optional[str], str]:
        """(None, "") for a genuine record, else (reason, detail); reasons: ``expiration``, ``oversized``,
        ``undecodable``, ``forged`` (not the authority's manifest of this run), ``version``."""
        ahead = record.expiration_time - get_dht_time()
        if ahead > MAX_EXPIRATION_AHEAD:
            return "expiration", f"expires {ahead:.0f}s ahead, at most {MAX_EXPIRATION_AHEAD:g}"
        if len(record.value) > MAX_RECORD_BYTES:
            return "oversized", f"{len(record.value)} bytes, at most {MAX_RECORD_BYTES}"
        try:
            version = MSGPackSerializer.loads(record.subkey)
            data, signature = MSGPackSerializer.loads(record.value)
        except Exception as e:  # msgpack raises several types for garbage; all mean the same here
            return "undecodable", type(e).__name__
        if not isinstance(data, bytes):
            return "undecodable", "not [manifest bytes, signature]"
        try:
            signed = verify_manifest(data, signature, self.fingerprint)
        except ManifestError as e:
            return "forged", str(e)
        if signed.manifest.version != version:
            return "version", f"stored under version {version!r} but is version {signed.manifest.version}"
        return None, ""


def publish_manifest(dht: hivemind.DHT, signed: SignedManifest) -> bool:
    """Store ``signed`` in the DHT for :data:`MANIFEST_TTL` seconds; True if a node took it."""
    manifest = signed.manifest
    return bool(dht.store(manifest_key(signed.fingerprint), subkey=manifest.version,
                          value=[manifest.canonical(), signed.signature],
                          expiration_time=get_dht_time() + MANIFEST_TTL))


def newest_manifest(dht: hivemind.DHT, fingerprint: str) -> Optional[SignedManifest]:
    """The newest version of the run's manifest the DHT holds that checks out, or None."""
    found = dht.get(manifest_key(fingerprint), latest=True)
    entries = getattr(found, "value", None)
    best = None
    for item in (entries.values() if isinstance(entries, dict) else ()):
        try:
            data, signature = item.value
            signed = verify_manifest(data, signature, fingerprint)
        except (ManifestError, TypeError, ValueError) as e:
            logger.warning(f"ignored a manifest record of run {fingerprint}: {e}")  # a second line of defence
            continue
        if best is None or signed.manifest.version > best.manifest.version:
            best = signed
    return best


def fetch_manifest(dht: hivemind.DHT, fingerprint: str, *, timeout: float,
                   stop: Optional[threading.Event] = None) -> SignedManifest:
    """Wait up to ``timeout`` seconds for the run's manifest. :raises ManifestError: none found in time."""
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout
    while True:
        signed = newest_manifest(dht, fingerprint)
        if signed is not None:
            return signed
        if time.monotonic() >= deadline or stop.wait(min(FETCH_RETRY, max(0.0, deadline - time.monotonic()))):
            raise ManifestError(f"no manifest of run {fingerprint} found in the DHT within {timeout:g}s; check the "
                                f"--run fingerprint and that a bootstrap peer of this run publishes it (--manifest)")


class ManifestPublisher:
    """Keeps the newest manifest in a file published in the DHT (what a run's bootstrap peer runs).

    It looks at the file every :data:`FILE_POLL` seconds: a newer version of the same run (signed by
    the authority, e.g. one that revokes a peer) is published at once; and it stores the manifest again
    every ``manifest.refresh`` seconds (well below :data:`MANIFEST_TTL`). A file that no longer checks
    out, or holds another run, is logged and the last good version stays published.

    :param path: the file ``swarm run create`` wrote; read (and checked) at once, errors reach the caller.
    """

    def __init__(self, *, path: Path):
        self.path = Path(path)
        self.signed = read_manifest_file(self.path)
        self._mtime = self._file_mtime()
        self._stored_at = -float("inf")
        self._dht: Optional[hivemind.DHT] = None
        self._loop: Optional[PeriodicLoop] = None

    def start(self, dht: hivemind.DHT) -> "ManifestPublisher":
        """Publish now (in the caller's thread), then keep it published in the background."""
        self._dht = dht
        self._loop = PeriodicLoop(name="manifest publisher", iteration=self._refresh, period=FILE_POLL,
                                  startup=self._store).start()
        return self

    def _file_mtime(self) -> Optional[tuple[int, int]]:
        try:
            stat = self.path.stat()
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size

    def _refresh(self) -> None:
        mtime = self._file_mtime()
        if mtime != self._mtime:
            self._mtime = mtime
            self._reread()
        elif time.monotonic() - self._stored_at < self.signed.manifest.refresh:
            return
        self._store()

    def _reread(self) -> None:
        current = self.signed.manifest
        try:
            newest = read_manifest_file(self.path)
        except ManifestError as e:
            logger.warning(f"{e}; still publishing version {current.version}")
            return
        if newest.fingerprint != self.signed.fingerprint:
            logger.warning(f"{self.path} now holds another run ({newest.fingerprint}); "
                           f"still publishing {self.signed.fingerprint}")
        elif newest.manifest.version > current.version:
            logger.info(f"publishing version {newest.manifest.version} of the manifest (was {current.version})")
            self.signed = newest

    def _store(self) -> None:
        self._stored_at = time.monotonic()
        if not publish_manifest(self._dht, self.signed):
            logger.warning(f"no DHT node took the manifest; trying again in {self.signed.manifest.refresh:g}s")

    def check(self) -> None:
        if self._loop is not None:
            self._loop.check()

    def shutdown(self, timeout: float = 2.0) -> None:
        if self._loop is not None:
            self._loop.shutdown(timeout)
