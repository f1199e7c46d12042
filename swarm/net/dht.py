"""Start this peer's DHT node and connect it to the swarm through the initial peers.

Connecting is retried only for the one named transient failure (no initial peer answered), with
exponential backoff and jitter, up to ``network.bootstrap_timeout``; then :class:`NetworkError`.

While the DHT runs, a :class:`~swarm.net.rejoin.Rejoin` loop (``dht.rejoin``) pings the initial peers
every ``network.rejoin_period`` seconds, so that a peer finds its way back after a partition. Shut a
DHT from :func:`start_dht` down with :func:`shutdown_dht`, which stops that loop first.
"""

from __future__ import annotations

import asyncio
import random
import re
import threading
import time
from typing import Iterable, Optional

import hivemind
from hivemind.dht.protocol import ValidationError as DHTValidationError
from hivemind.dht.validation import RecordValidatorBase
from hivemind.p2p.p2p_daemon_bindings.utils import P2PDaemonError
from hivemind.utils import get_logger
from hivemind.utils.auth import AuthorizerBase

from swarm.config.schema import NetworkConfig
from swarm.errors import ConfigError, NetworkError
from swarm.hivemind_private import use_static_relays
from swarm.net.identity import Identity, load_identity
from swarm.net.reachability import reachable, relay_options, serve_dial_back
from swarm.net.rejoin import Rejoin

logger = get_logger(__name__)

_BOOTSTRAP_FAILURES = ("failed to connect to bootstrap peers", "could not connect to initial peers",
                       "none of the initial_peers responded")

# What a call into the DHT process raises when that one call failed, not the DHT: a timeout, a broken
# pipe, or its coroutine destroyed or cancelled inside the DHT process (hivemind keeps no reference to
# the task it runs a coroutine in, so the garbage collector can end one while it waits, and hivemind
# hands the GeneratorExit on through the future). Periodic callers retry these at the next period.
DHT_CALL_FAILURES: tuple[type[BaseException], ...] = (TimeoutError, OSError, EOFError, GeneratorExit,
                                                      asyncio.CancelledError)


def start_dht(
    config: NetworkConfig,
    *,
    identity: Optional[Identity] = None,
    record_validators: Iterable[RecordValidatorBase] = (),
    client_mode: Optional[bool] = None,
    authorizer: Optional[AuthorizerBase] = None,
    stop: Optional[threading.Event] = None,
) -> hivemind.DHT:
    """Start a DHT node (its own process and a p2pd daemon) joined to the swarm, with its rejoin loop
    as ``dht.rejoin`` (None without initial peers or with ``network.rejoin_period`` 0).

    Reachability (:mod:`swarm.net.reachability`): a peer that accepts connections serves dial-backs. With
    ``network.use_auto_relay`` null, a joining peer asks an initial peer to dial it back and, if that fails
    (behind NAT, no forwarded port), starts again reachable through a relay on the initial peers; ``true``
    goes through the relay at once, ``false`` never. A client (``client_mode``) only dials out.

    :param identity: the key that makes this peer's id (see :mod:`swarm.net.identity`); default: the one at
      network.identity_path, else an ephemeral one (whose key is on disk only while p2pd starts).
    :param record_validators: :func:`swarm.net.validators.run_validators` for this identity and run.
    :param client_mode: overrides network.client_mode (monitors and `swarm status` are clients).
    :param authorizer: signs and checks every DHT request and response (a private run's
      :class:`~swarm.net.authorizer.RunAuthorizer`); such a node talks only to nodes of the same run.
    :param stop: set it to abandon the retries early (e.g. on SIGINT); raises NetworkError then.
    :raises NetworkError: none of the initial peers answered before network.bootstrap_timeout.
    :raises ConfigError: the identity is already used by another peer of the swarm.
    """
    identity = identity or load_identity(config.identity_path)
    client_mode = config.client_mode if client_mode is None else client_mode
    stop = stop or threading.Event()
    relay = False if client_mode or not config.initial_peers else config.use_auto_relay
    options = dict(identity=identity, record_validators=list(record_validators), client_mode=client_mode,
                   authorizer=authorizer, stop=stop)
    dht = _connect(config, relay=bool(relay), **options)
    if not client_mode:
        serve_dial_back(dht)
    if relay is None and reachable(dht, config.initial_peers) is False:
        logger.warning("the swarm cannot connect to this peer (behind NAT without a forwarded port?): "
                       "joining again, reachable through a relay on the initial peers")
        dht.shutdown()
        dht = _connect(config, relay=True, check_identity=False, **options)  # the identity was ours a moment ago
        serve_dial_back(dht)
    return _with_rejoin(dht, config)


def _connect(config: NetworkConfig, *, relay: bool, identity: Identity, record_validators: list,
             client_mode: bool, authorizer: Optional[AuthorizerBase], stop: threading.Event,
             check_identity: bool = True) -> hivemind.DHT:
    """Start the DHT, retrying while no initial peer answers (see :func:`start_dht`)."""
    deadline = time.monotonic() + config.bootstrap_timeout
    delay, attempt = 1.0, 0
    if relay:
        use_static_relays()
    network = relay_options(config.initial_peers) if relay else dict(
        use_auto_relay=False, announce_maddrs=config.announce_maddrs or None)
    if relay and config.announce_maddrs:  # a user's announced addresses (a forwarded port) come first
        network["announce_maddrs"] = config.announce_maddrs + network["announce_maddrs"]
    while True:
        attempt += 1
        try:
            with identity.key_file() as key_file:  # an ephemeral key's file exists only for this start
                return hivemind.DHT(
                    initial_peers=config.initial_peers,
                    start=True,
                    host_maddrs=config.host_maddrs,
                    client_mode=client_mode,
                    identity_path=str(key_file),
                    # a key made just now cannot be taken already: skip hivemind's probe (it starts another p2pd)
                    check_if_identity_free=check_identity and not identity.fresh,
                    record_validators=record_validators,
                    authorizer=authorizer,
                    **network,
                )
        except DHTValidationError as e:  # an initial peer refused this one (its clock differs, or another reason)
            raise NetworkError(_clock_message(e)) from None
        except (P2PDaemonError, RuntimeError) as e:
            if "already taken" in str(e):
                raise ConfigError(f"identity {identity} is already used by another peer in the swarm") from None
            if not any(marker in str(e) for marker in _BOOTSTRAP_FAILURES):
                raise
        remaining = deadline - time.monotonic()
        if remaining <= 0 or stop.is_set():
            private = (" and, for a private run, that this peer has a valid certificate of it (--certificate)"
                       if authorizer is None else " and that they belong to the run of this peer's certificate")
            raise NetworkError(
                f"none of the initial peers answered within {config.bootstrap_timeout:g}s "
                f"after {attempt} attempts ({', '.join(config.initial_peers)}); "
                f"check the addresses, that those peers are running{private}"
            )
        wait = min(delay * random.uniform(1.0, 1.5), remaining)
        logger.warning(f"no initial peer answered (attempt {attempt}); retrying in {wait:.1f}s")
        stop.wait(wait)
        delay = min(delay * 2, 30.0)


def _clock_message(error: Exception) -> str:
    times = re.search(r"local: ([0-9.]+), peer: ([0-9.]+)", str(error))
    if times is None:  # hivemind refused the initial peer for another reason: say which
        return f"an initial peer was refused by hivemind's DHT: {error}"
    off = f"{float(times[1]) - float(times[2]):+.1f} s "
    return (f"this machine's clock is {off}off an initial peer's, beyond the 3 s hivemind's DHT accepts: "
            f"sync it (NTP, e.g. `timedatectl set-ntp true`); `swarm doctor` measures it")


def _with_rejoin(dht: hivemind.DHT, config: NetworkConfig) -> hivemind.DHT:
    dht.rejoin = None
    if config.initial_peers and config.rejoin_period > 0:
        dht.rejoin = Rejoin(dht=dht, initial_peers=config.initial_peers, period=config.rejoin_period).start()
    return dht


def shutdown_dht(dht: hivemind.DHT, *, timeout: float = 3.0) -> None:
    """Stop the rejoin loop of a DHT from :func:`start_dht` (waiting at most ``timeout`` seconds for a
    round of pings in flight), then shut the DHT down."""
    rejoin = getattr(dht, "rejoin", None)
    if rejoin is not None:
        rejoin.shutdown(timeout)
    dht.shutdown()


def visible_maddrs(dht: hivemind.DHT) -> list[str]:
    """Addresses others can join with, loopback last (it works only on this machine)."""
    maddrs = [str(maddr) for maddr in dht.get_visible_maddrs(latest=True)]
    return sorted(maddrs, key=lambda maddr: ("/127.0.0.1/" in maddr or "/::1/" in maddr, maddr))


def client_network(config: NetworkConfig) -> NetworkConfig:
    """The network section for a short-lived client on this machine (monitor, status): any free port,
    whatever port the run's config fixes for its peers."""
    return config.model_copy(update={"port": 0})


def reachability(dht: hivemind.DHT) -> str:
    """``client`` (outbound only), ``relayed`` (reachable through a libp2p relay) or ``direct``."""
    if dht.client_mode:
        return "client"
    maddrs = [str(maddr) for maddr in dht.get_visible_maddrs()]
    # a peer that found a relay announces circuit addresses: others reach it through the relay
    return "relayed" if any("/p2p-circuit" in maddr for maddr in maddrs) else "direct"


async def _list_connected_peers(_dht: hivemind.DHT, node) -> int:
    return len(await node.p2p.list_peers())


def count_connected_peers(dht: hivemind.DHT, timeout: float = 5.0) -> Optional[int]:
    """How many peers this peer's libp2p daemon is connected to (DHT and averaging share it).

    Runs inside the DHT process through ``DHT.run_coroutine``. None if the DHT did not answer within
    ``timeout`` seconds or is gone, which callers report as "not connected".
    """
    try:
        return dht.run_coroutine(_list_connected_peers, return_future=True).result(timeout)
    except DHT_CALL_FAILURES as e:
        logger.warning(f"the DHT did not report its connections: {e!r}")
        return None


def short_id(dht: hivemind.DHT) -> str:
    """The last characters of the peer id, enough to tell peers apart in logs."""
    return str(dht.peer_id)[-6:]
