"""Direct links: an authenticated, encrypted TCP connection between two peers, beside libp2p.

Through libp2p every byte of a round goes Python -> unix socket -> p2pd (Go: noise, yamux) -> TCP ->
p2pd -> unix socket -> Python. At N=4 on 2 cores that daemon hop costs almost as much CPU as the peer
itself (benchmarks/allreduce_links.py). A peer that can reach another one's direct port fetches over a
connection of its own instead; where it cannot (NAT, a firewall, a peer without direct links) the caller
falls back to libp2p.

Handshake. Each side proves the libp2p identity it speaks for (its RSA key, the one its peer id comes
from, :mod:`swarm.net.identity`)::

    client -> server  MAGIC, the client's ephemeral X25519 key (32 bytes)
    server -> client  the server's ephemeral key, its public key, its signature of the transcript
    client -> server  its public key, its signature of the transcript

The transcript binds a domain tag, the run's namespace and both ephemeral keys; each side signs it with
its role appended. The client checks that the server is the peer it meant to reach, the server learns
the client's peer id (what libp2p's authenticated caller id is to an RPC). Both derive one AES-GCM key
per direction (HKDF-SHA256 of the X25519 secret and the transcript); a frame's nonce is its counter, so
a replayed, reordered, dropped or altered frame fails to decrypt and ends the connection. A fresh
ephemeral key per connection gives forward secrecy.

Frames: a 4-byte length, checked against :data:`MAX_FRAME` before anything is read, then the ciphertext
of one kind byte and a body. A connection carries one exchange at a time: a REQUEST, RESPONSE frames,
END. Everything read here is bounded in size and, by the caller, in time.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import struct
import time
from typing import AsyncIterator, Callable, Optional

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hivemind.utils import get_logger
from hivemind.utils.crypto import RSAPrivateKey

from swarm.net.identity import MAX_KEY_BYTES, MAX_SIGNATURE_BYTES, signer_of

logger = get_logger(__name__)

MAGIC = b"swarm-direct/1\n"
MAX_FRAME = (1 << 20) + 4096  # ciphertext bytes of one frame: a 1 MiB chunk of a tensor and its message
REQUEST, RESPONSE, END = 1, 2, 3
HANDSHAKE_TIMEOUT = 10.0  # seconds a connection may take to prove who it is
_TAG = 16  # AES-GCM's authentication tag


class DirectError(Exception):
    """The direct link failed (unreachable, not the expected peer, broken off, malformed): use libp2p."""


class Channel:
    """One authenticated, encrypted connection to ``peer_id``. Not safe for two exchanges at once."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, peer_id: str,
                 send_key: bytes, receive_key: bytes):
        self.reader, self.writer, self.peer_id = reader, writer, peer_id
        self._send, self._receive = AESGCM(send_key), AESGCM(receive_key)
        self._sent = self._received = 0
        self.broken = False  # a frame was cut or refused: the stream cannot be read on from here

    async def send(self, kind: int, body: bytes) -> None:
        ciphertext = self._send.encrypt(self._sent.to_bytes(12, "big"), bytes((kind,)) + body, None)
        self._sent += 1
        self.writer.write(struct.pack(">I", len(ciphertext)))
        self.writer.write(ciphertext)
        await self.writer.drain()

    async def receive(self) -> tuple[int, bytes]:
        try:
            (length,) = struct.unpack(">I", await self.reader.readexactly(4))
            if not _TAG < length <= MAX_FRAME:
                raise DirectError(f"a frame of {length} bytes (at most {MAX_FRAME})")
            ciphertext = await self.reader.readexactly(length)
            try:
                plain = self._receive.decrypt(self._received.to_bytes(12, "big"), ciphertext, None)
            except Exception:  # cryptography's InvalidTag: altered, replayed or out of order
                raise DirectError("a frame failed authentication") from None
            self._received += 1
            return plain[0], plain[1:]
        except (asyncio.IncompleteReadError, ConnectionError, OSError) as e:
            self.broken = True
            raise DirectError(f"the connection broke off ({type(e).__name__})") from None
        except BaseException:  # refused, or cancelled mid-frame (a caller's timeout)
            self.broken = True
            raise

    async def exchange(self, request: bytes) -> AsyncIterator[bytes]:
        """Send ``request``; yield the body of every response frame until END. The channel may carry the next
        exchange only if this iterator ran to its end (:attr:`reusable`)."""
        self.broken = True  # until END arrives
        try:
            await self.send(REQUEST, request)
        except (ConnectionError, OSError) as e:
            raise DirectError(f"the connection broke off ({type(e).__name__})") from None
        while True:
            kind, body = await self.receive()
            if kind == END:
                self.broken = False
                return
            if kind != RESPONSE:
                raise DirectError(f"a frame of kind {kind} in a response")
            yield body

    @property
    def reusable(self) -> bool:
        return not self.broken and not self.writer.is_closing()

    def close(self) -> None:
        self.broken = True
        self.writer.close()


def _transcript(namespace: str, client_ephemeral: bytes, server_ephemeral: bytes) -> bytes:
    return hashlib.sha256(MAGIC + namespace.encode() + b"\0" + client_ephemeral + server_ephemeral).digest()


def _keys(secret: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(client -> server key, server -> client key)."""
    keys = HKDF(algorithm=hashes.SHA256(), length=64, salt=None, info=transcript).derive(secret)
    return keys[:32], keys[32:]


def _raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _proof(private_key: RSAPrivateKey, transcript: bytes, role: bytes) -> bytes:
    public = private_key.get_public_key().to_bytes()
    signature = private_key.sign(transcript + role)
    return struct.pack(">H", len(public)) + public + struct.pack(">H", len(signature)) + signature


async def _read_proof(reader: asyncio.StreamReader, transcript: bytes, role: bytes) -> Optional[str]:
    """The peer id proven by the key and signature that follow, or None if they prove nothing."""
    (key_length,) = struct.unpack(">H", await reader.readexactly(2))
    if key_length > MAX_KEY_BYTES:
        return None
    key = await reader.readexactly(key_length)
    (signature_length,) = struct.unpack(">H", await reader.readexactly(2))
    if signature_length > MAX_SIGNATURE_BYTES:
        return None
    return signer_of(key, transcript + role, await reader.readexactly(signature_length))


async def connect(host: str, port: int, *, expected_peer: str, private_key: RSAPrivateKey, namespace: str,
                  timeout: float) -> Channel:
    """A channel to the peer at ``host:port``, which must prove to be ``expected_peer`` within ``timeout``.

    :raises DirectError: unreachable, silent, or not that peer.
    """
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError) as e:
        raise DirectError(f"cannot connect to {host}:{port} ({type(e).__name__})") from None
    try:
        return await asyncio.wait_for(_client_handshake(reader, writer, expected_peer, private_key, namespace), timeout)
    except BaseException as e:
        writer.close()
        if isinstance(e, DirectError):
            raise
        if isinstance(e, (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, struct.error)):
            raise DirectError(f"no handshake with {host}:{port} ({type(e).__name__})") from None
        raise


async def _client_handshake(reader, writer, expected_peer: str, private_key: RSAPrivateKey, namespace: str) -> Channel:
    ephemeral = X25519PrivateKey.generate()
    writer.write(MAGIC + _raw(ephemeral))
    await writer.drain()
    server_ephemeral = await reader.readexactly(32)
    transcript = _transcript(namespace, _raw(ephemeral), server_ephemeral)
    server = await _read_proof(reader, transcript, b"server")
    if server != expected_peer:
        raise DirectError(f"the peer there is not {expected_peer}")
    writer.write(_proof(private_key, transcript, b"client"))
    await writer.drain()
    secret = ephemeral.exchange(X25519PublicKey.from_public_bytes(server_ephemeral))
    to_server, to_client = _keys(secret, transcript)
    return Channel(reader, writer, peer_id=server, send_key=to_server, receive_key=to_client)


async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, private_key: RSAPrivateKey,
                 namespace: str) -> Optional[Channel]:
    """The server's half of the handshake: a channel to the client it proves to be, or None (logged at debug)."""
    try:
        if await reader.readexactly(len(MAGIC)) != MAGIC:
            return None
        client_ephemeral = await reader.readexactly(32)
        ephemeral = X25519PrivateKey.generate()
        transcript = _transcript(namespace, client_ephemeral, _raw(ephemeral))
        writer.write(_raw(ephemeral) + _proof(private_key, transcript, b"server"))
        await writer.drain()
        client = await _read_proof(reader, transcript, b"client")
        if client is None:
            return None
        secret = ephemeral.exchange(X25519PublicKey.from_public_bytes(client_ephemeral))
    except (OSError, asyncio.IncompleteReadError, ValueError, struct.error) as e:
        logger.debug(f"a direct connection failed its handshake: {e!r}")
        return None
    to_server, to_client = _keys(secret, transcript)
    return Channel(reader, writer, peer_id=client, send_key=to_client, receive_key=to_server)


Serve = Callable[[str, bytes], AsyncIterator[bytes]]


class DirectServer:
    """Accepts direct connections and answers each REQUEST with ``serve(peer id, request)``'s bodies.

    :param admit: peer id -> None if it may connect, else why not (the connection is closed unanswered).
    :param max_connections: open connections at once, authenticated or not (the rest are closed at once).
    :param max_per_peer: open connections of one proven peer at once.
    """

    def __init__(self, *, private_key: RSAPrivateKey, namespace: str, serve: Serve,
                 admit: Callable[[str], Optional[str]] = lambda peer: None,
                 max_connections: int = 64, max_per_peer: int = 8, idle_timeout: float = 300.0):
        self.private_key, self.namespace, self.serve, self.admit = private_key, namespace, serve, admit
        self.max_connections, self.max_per_peer, self.idle_timeout = max_connections, max_per_peer, idle_timeout
        self._per_peer: dict[str, int] = {}
        self._server: Optional[asyncio.base_events.Server] = None
        self._connections: set[asyncio.Task] = set()
        self.port: Optional[int] = None

    async def start(self, host: str, port: int) -> int:
        """Listen on ``host:port`` (0: a free port); returns the port."""
        self._server = await asyncio.start_server(self._handle, host, port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self.max_connections:
            writer.close()
            return
        task = asyncio.current_task()
        self._connections.add(task)
        peer = None
        try:
            channel = await asyncio.wait_for(accept(reader, writer, private_key=self.private_key,
                                                    namespace=self.namespace), HANDSHAKE_TIMEOUT)
            if channel is None or self._per_peer.get(channel.peer_id, 0) >= self.max_per_peer \
                    or self.admit(channel.peer_id) is not None:
                return
            peer = channel.peer_id
            self._per_peer[peer] = self._per_peer.get(peer, 0) + 1
            while True:
                kind, body = await asyncio.wait_for(channel.receive(), self.idle_timeout)
                if kind != REQUEST:
                    return
                async with contextlib.aclosing(self.serve(peer, body)) as replies:
                    async for reply in replies:
                        await channel.send(RESPONSE, reply)
                await channel.send(END, b"")
        except (DirectError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
            logger.debug(f"a direct connection ended: {e!r}")
        except asyncio.CancelledError:  # close(): the outermost frame of this connection's task, so it ends here
            pass  # (asyncio's server callback would log a cancelled task as an error)
        except Exception as e:  # a bug in serving one connection must not take the others down
            logger.warning(f"serving a direct connection failed: {e!r}", exc_info=e)
        finally:
            self._connections.discard(task)
            if peer is not None:
                self._per_peer[peer] -= 1
                if self._per_peer[peer] <= 0:
                    del self._per_peer[peer]
            writer.close()


class DirectPool:
    """This peer's direct channels to others: where each peer listens, idle channels to reuse, and which
    peers could not be reached lately (not tried again for ``retry_after`` seconds).

    :param connect_timeout: seconds to connect and finish the handshake with one endpoint.
    """

    MAX_IDLE_PER_PEER = 4

    def __init__(self, *, private_key: RSAPrivateKey, namespace: str, connect_timeout: float,
                 retry_after: float = 300.0):
        self.private_key, self.namespace = private_key, namespace
        self.connect_timeout, self.retry_after = connect_timeout, retry_after
        self.endpoints: dict[str, list[tuple[str, int]]] = {}
        self._idle: dict[str, list[Channel]] = {}
        self._failed_until: dict[str, float] = {}

    def usable(self, peer: str) -> bool:
        return bool(self.endpoints.get(peer)) and time.monotonic() >= self._failed_until.get(peer, 0.0)

    def due(self, peer: str) -> bool:
        """Whether to ask ``peer`` again where its direct links listen: not usable, and not failed lately."""
        return not self.usable(peer) and time.monotonic() >= self._failed_until.get(peer, 0.0)

    def fail(self, peer: str, reason: str, log: bool = True) -> None:
        """Stop using direct links to ``peer`` for ``retry_after`` seconds."""
        if log and time.monotonic() >= self._failed_until.get(peer, 0.0):
            logger.info(f"direct link to {peer} failed ({reason}); using libp2p for {self.retry_after:g}s")
        self._failed_until[peer] = time.monotonic() + self.retry_after
        for channel in self._idle.pop(peer, []):
            channel.close()

    async def channel(self, peer: str) -> Channel:
        """An idle channel to ``peer`` or a new one. :raises DirectError: none could be opened (``peer`` is
        then marked failed)."""
        idle = self._idle.get(peer, [])
        while idle:
            channel = idle.pop()
            if channel.reusable:
                return channel
        errors = []
        for host, port in self.endpoints.get(peer, []):
            try:
                return await connect(host, port, expected_peer=peer, private_key=self.private_key,
                                     namespace=self.namespace, timeout=self.connect_timeout)
            except DirectError as e:
                errors.append(str(e))
        reason = "; ".join(errors) or "no endpoints"
        self.fail(peer, reason)
        raise DirectError(reason)

    def release(self, channel: Channel) -> None:
        """Give back a channel after an exchange: kept for the next one if it ran to its end, else closed."""
        idle = self._idle.setdefault(channel.peer_id, [])
        if channel.reusable and len(idle) < self.MAX_IDLE_PER_PEER:
            idle.append(channel)
        else:
            channel.close()

    def close(self) -> None:
        for channels in self._idle.values():
            for channel in channels:
                channel.close()
        self._idle.clear()
