"""Parsing and validation of peer addresses (multiaddrs) with py-multiaddr.

A peer joins a swarm through the multiaddr of any peer already in it, which must name that peer's
id (``/p2p/<peer id>``): libp2p refuses to dial an address whose identity it cannot verify, and
without the id the failure would surface only as a vague timeout much later.
"""

from __future__ import annotations

from typing import Iterable

from multiaddr import Multiaddr
from multiaddr.exceptions import Error as MultiaddrError

_TRANSPORTS = {"tcp", "udp", "quic", "quic-v1", "ws", "wss"}


def parse_peer_multiaddr(text: str) -> Multiaddr:
    """Parse one full peer address such as ``/ip4/203.0.113.5/tcp/31337/p2p/QmYyQSo1c1Ym...``.

    :raises ValueError: with a one-line message naming the address and what is wrong with it.
    """
    text = text.strip()
    try:
        maddr = Multiaddr(text)
    except (MultiaddrError, ValueError) as e:
        reason = str(e).split(" (string:")[0]
        raise ValueError(f"malformed multiaddr {text!r}: {reason}") from None
    protocols = [proto.name for proto in maddr.protocols()]
    if "p2p" not in protocols:
        raise ValueError(
            f"multiaddr {text!r} has no /p2p/<peer id> part; copy the full address a peer prints "
            f"(e.g. /ip4/1.2.3.4/tcp/31337/p2p/QmYyQSo1c1Ym...)"
        )
    if not _TRANSPORTS.intersection(protocols) and protocols[0] != "p2p":
        raise ValueError(f"multiaddr {text!r} names no transport (tcp, udp/quic, ...)")
    return maddr


def split_peer_list(value: str | Iterable[str]) -> list[str]:
    """Accept a list, or one string of addresses separated by commas or whitespace (env variables)."""
    if isinstance(value, str):
        return [item for item in value.replace(",", " ").split() if item]
    return [str(item) for item in value]
