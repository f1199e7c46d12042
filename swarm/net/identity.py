"""A peer's identity: one RSA key that is both its libp2p peer id and the key that signs its DHT records.

libp2p derives an RSA peer id from the public key (sha256 multihash of the protobuf-encoded key), and
hivemind's :class:`~hivemind.dht.crypto.RSASignatureValidator` signs records whose subkey names the
owner's public key. Using one key for both lets anyone check that a signed record claiming peer id X
was written by X itself: recompute the peer id from the record's owner key (see :func:`peer_id_of_owner`).

A peer given ``network.identity_path`` keeps its key (and so its peer id) across restarts; other peers
get a fresh key for every run. That one lives in memory: p2pd reads keys from files only, so
:meth:`Identity.key_file` writes it to a private temporary folder for the start of the daemon and
removes it afterwards, whether the start succeeded or not.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey

from swarm.errors import ConfigError
from swarm.hivemind_private import rsa_private_key_from_der

_SHA2_256_MULTIHASH_PREFIX = bytes([0x12, 0x20])  # multihash code of sha2-256, then the digest length (32)
_OWNER_RE = re.compile(rb"^\[owner:(.+)\]$", re.DOTALL)


@dataclass
class Identity:
    """An RSA private key, where p2pd reads it from, and the peer id it gives."""

    private_key: RSAPrivateKey
    path: Optional[Path]  # the key file; None for an ephemeral identity (see key_file)
    peer_id: str
    fresh: bool  # generated just now: no other peer can be using it yet
    _key: bytes = b""  # an ephemeral identity's key, in libp2p's format

    @property
    def owner(self) -> bytes:
        """The ``[owner:<ssh-rsa ...>]`` tag that marks a DHT subkey as written by this peer."""
        return RSASignatureValidator(self.private_key).local_public_key

    @contextlib.contextmanager
    def key_file(self) -> Iterator[Path]:
        """A file p2pd can read the key from, for the ``with`` block: the key file itself, or for an
        ephemeral identity a private temporary one, removed when the block ends (also on an error)."""
        if self.path is not None:
            yield self.path
            return
        with _private_folder() as folder:
            path = folder / "identity.key"
            path.write_bytes(self._key)
            yield path

    def __str__(self) -> str:
        return str(self.path) if self.path is not None else f"ephemeral identity {self.peer_id}"


def load_identity(path: Optional[Path]) -> Identity:
    """Read the key file at ``path`` (written there first if missing), or make an ephemeral identity
    (kept in memory: no file outlives this call).

    :raises ConfigError: the file exists but does not hold an RSA key in libp2p's format.
    """
    if path is None:
        with _private_folder() as folder:
            P2P.generate_identity(str(folder / "identity.key"))
            identity = _read(folder / "identity.key", fresh=True)
        identity.path = None  # the key stays in memory (identity._key); its file is gone with the folder
        return identity
    path = Path(path).expanduser()
    fresh = not path.exists()
    if fresh:
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    return _read(path, fresh=fresh)


@contextlib.contextmanager
def _private_folder() -> Iterator[Path]:
    folder = tempfile.mkdtemp(prefix="swarm-identity-")  # mode 0700: only this user reads the key
    try:
        yield Path(folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _read(path: Path, *, fresh: bool) -> Identity:
    try:
        data = path.read_bytes()
        key_proto = crypto_pb2.PrivateKey.FromString(data)
        if key_proto.key_type != crypto_pb2.KeyType.RSA:
            raise ValueError("not an RSA key")
        der = key_proto.data
        private = serialization.load_der_private_key(der, password=None)
        if not isinstance(private, rsa.RSAPrivateKey):
            raise ValueError("not an RSA key")
    except (OSError, ValueError, TypeError, DecodeError) as e:
        raise ConfigError(
            f"identity file {path} does not hold an RSA private key in libp2p's format ({e}); "
            f"move it away and a new one is written"
        ) from None
    return Identity(private_key=rsa_private_key_from_der(der), path=path, peer_id=str(PeerID.from_identity(data)),
                    fresh=fresh, _key=data)


def peer_id_of_owner(owner: bytes) -> Optional[str]:
    """The libp2p peer id of the RSA key in an ``[owner:...]`` tag, or None if the tag holds no RSA key."""
    match = _OWNER_RE.match(owner)
    return None if match is None else peer_id_of_public_key(match.group(1))


def peer_id_of_private_key(key: RSAPrivateKey) -> str:
    """The libp2p peer id of hivemind's RSA private key (what its signatures speak for)."""
    return peer_id_of_public_key(key.get_public_key().to_bytes())


def peer_id_of_public_key(ssh_key: bytes) -> Optional[str]:
    """The libp2p peer id of an RSA public key in OpenSSH format (``ssh-rsa ...``), or None if it is not one."""
    try:
        public = serialization.load_ssh_public_key(ssh_key)
    except (ValueError, TypeError, serialization.UnsupportedAlgorithm):
        return None
    if not isinstance(public, rsa.RSAPublicKey):
        return None
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = crypto_pb2.PublicKey(key_type=crypto_pb2.RSA, data=der).SerializeToString()
    return PeerID(_SHA2_256_MULTIHASH_PREFIX + hashlib.sha256(encoded).digest()).to_base58()


MAX_KEY_BYTES = 1024  # an OpenSSH RSA public key: about 380 bytes for 2048 bits
MAX_SIGNATURE_BYTES = 1024  # 256 bytes for RSA-2048


@lru_cache(maxsize=1024)
def public_key_of(key: bytes) -> Optional[tuple[str, RSAPublicKey]]:
    """(peer id, key) for an OpenSSH RSA public key, or None if it is not one. Cached: a group's few
    reducers are parsed once, not at every receipt."""
    peer_id = peer_id_of_public_key(key)
    if peer_id is None:
        return None
    try:
        return peer_id, RSAPublicKey.from_bytes(key)
    except Exception:  # cryptography raises several types on a malformed key; all mean "not a key"
        return None


def signer_of(key: bytes, message: bytes, signature: bytes) -> Optional[str]:
    """The peer id of ``key`` if ``signature`` is its valid signature of ``message``, else None."""
    if not isinstance(key, bytes) or len(key) > MAX_KEY_BYTES or not isinstance(signature, bytes) \
            or len(signature) > MAX_SIGNATURE_BYTES:
        return None
    parsed = public_key_of(key)
    if parsed is None:
        return None
    peer_id, public = parsed
    try:
        return peer_id if public.verify(message, signature) else None
    except Exception:  # a malformed signature
        return None
