"""A peer's identity: one RSA key that is both its libp2p peer id and the key that signs its DHT records.

libp2p derives an RSA peer id from the public key (sha256 multihash of the protobuf-encoded key), and
hivemind's :class:`~hivemind.dht.crypto.RSASignatureValidator` signs records whose subkey names the
owner's public key. Using one key for both lets anyone check that a signed record claiming peer id X
was written by X itself: recompute the peer id from the record's owner key (see :func:`peer_id_of_owner`).

A peer given ``network.identity_path`` keeps its key (and so its peer id) across restarts; other peers
get a fresh key for every run, written to a private temporary file only for as long as p2pd needs it.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.protobuf.message import DecodeError
from hivemind.dht.crypto import RSASignatureValidator
from hivemind.p2p import P2P, PeerID
from hivemind.proto import crypto_pb2
from hivemind.utils.crypto import RSAPrivateKey

from swarm.errors import ConfigError
from swarm.hivemind_private import rsa_private_key_from_der

_SHA2_256_MULTIHASH_PREFIX = bytes([0x12, 0x20])  # multihash code of sha2-256, then the digest length (32)
_OWNER_RE = re.compile(rb"^\[owner:(.+)\]$", re.DOTALL)


@dataclass
class Identity:
    """An RSA private key, the file p2pd reads it from, and the peer id it gives."""

    private_key: RSAPrivateKey
    path: Path
    peer_id: str
    fresh: bool  # generated just now: no other peer can be using it yet
    _tempdir: Optional[str] = None  # set for an ephemeral identity, whose file is removed after start

    @property
    def owner(self) -> bytes:
        """The ``[owner:<ssh-rsa ...>]`` tag that marks a DHT subkey as written by this peer."""
        return RSASignatureValidator(self.private_key).local_public_key

    def discard_file(self) -> None:
        """Remove an ephemeral key file once p2pd has read it (the key stays in memory)."""
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None


def load_identity(path: Optional[Path]) -> Identity:
    """Read the key file at ``path`` (written there first if missing), or make an ephemeral identity.

    :raises ConfigError: the file exists but does not hold an RSA key in libp2p's format.
    """
    if path is None:
        tempdir = tempfile.mkdtemp(prefix="swarm-identity-")
        key_path = Path(tempdir) / "identity.key"
        P2P.generate_identity(str(key_path))
        identity = _read(key_path, fresh=True)
        identity._tempdir = tempdir
        return identity
    path = Path(path).expanduser()
    fresh = not path.exists()
    if fresh:
        path.parent.mkdir(parents=True, exist_ok=True)
        P2P.generate_identity(str(path))
    return _read(path, fresh=fresh)


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
    return Identity(private_key=rsa_private_key_from_der(der), path=path, peer_id=str(PeerID.from_identity(data)), fresh=fresh)


def peer_id_of_owner(owner: bytes) -> Optional[str]:
    """The libp2p peer id of the RSA key in an ``[owner:...]`` tag, or None if the tag holds no RSA key."""
    match = _OWNER_RE.match(owner)
    return None if match is None else peer_id_of_public_key(match.group(1))


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
