"""`swarm doctor`: before committing a machine to a run, say what would go wrong, one line per check.

It takes the same config, addresses and ``--run`` as `swarm join` and checks, in this order: versions;
the data folder; device, memory and whether the run's model, optimizer and one batch fit (and how fast
a step is); disk for checkpoints; then, joined to the swarm as a short-lived peer: clock skew against
peers (hivemind's DHT refuses records more than 3 s off), whether a peer can dial back to this one,
and the bandwidth up and down to a few peers (the probes of :mod:`swarm.telemetry.probe`), set
against what the run's averaging sends. Each check ends in ``ok``, ``warn``, ``fail`` or ``skip``
with what to do; the command exits 0 unless a check failed.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import statistics
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

from swarm import __version__
from swarm.config.schema import SwarmConfig
from swarm.errors import SwarmError

MAX_PROBED_PEERS = 3
MAX_CLOCK_SKEW = 3.0  # seconds: hivemind's MAX_DHT_TIME_DISCREPANCY_SECONDS
WARN_CLOCK_SKEW = 1.0


@dataclass
class Verdict:
    check: str
    status: str  # ok, warn, fail or skip
    detail: str
    advice: str = ""

    def line(self) -> str:
        advice = f" -> {self.advice}" if self.advice else ""
        return f"[{self.status:>4}] {self.check:<12} {self.detail}{advice}"


def run_doctor(config: SwarmConfig, *, run: Optional[str], as_json: bool, probe_bytes: int,
               out: Callable[[str], None] = print) -> bool:
    """Run every check, print each verdict as it comes (or JSON at the end); True if none failed."""
    verdicts: list[Verdict] = []

    def report(verdict: Verdict) -> None:
        verdicts.append(verdict)
        if not as_json:
            out(verdict.line())

    for check in (_versions, _data, _device_and_memory, _disk):
        _guarded(check.__name__.strip("_"), lambda check=check: check(config), report)
    _network(config, run=run, probe_bytes=probe_bytes, report=report)
    ok = not any(verdict.status == "fail" for verdict in verdicts)
    if as_json:
        out(json.dumps({"ok": ok, "checks": [asdict(verdict) for verdict in verdicts]}, indent=2))
    else:
        out("joining should work" if ok else "joining would not work: see the failed checks above")
    return ok


def _guarded(name: str, check: Callable[[], list[Verdict]], report: Callable[[Verdict], None]) -> None:
    try:
        for verdict in check():
            report(verdict)
    except SwarmError as e:
        report(Verdict(name, "fail", str(e)))


# ---- local checks ----------------------------------------------------------------------------
def _versions(config: SwarmConfig) -> list[Verdict]:
    import hivemind
    import torch

    pins = {req.split("==")[0].strip(): req.split("==")[1].split(";")[0].strip()
            for req in metadata.requires("swarm") or [] if "==" in req and "extra" not in req}
    detail = f"swarm {__version__}, hivemind {hivemind.__version__}, torch {torch.__version__}"
    wrong = [f"{name} {pins[name]} (found {version})" for name, version in (("hivemind", hivemind.__version__),)
             if name in pins and pins[name] != version]
    if wrong:
        return [Verdict("versions", "fail", detail, f"install the pinned {', '.join(wrong)}: make install")]
    return [Verdict("versions", "ok", detail)]


def _data(config: SwarmConfig) -> list[Verdict]:
    from swarm.train.data import load_dataset

    dataset = load_dataset(config.data, config.model.seq_len)  # DataError: missing, empty, unreadable
    usable = dataset.train.numel() + dataset.heldout.numel()
    detail = (f"{dataset.source}: {usable:,} bytes usable ({dataset.num_train_files} training files, "
              f"{dataset.num_heldout_files} held out)")
    if usable >= config.data.max_bytes:
        return [Verdict("data", "ok", detail + ", capped at data.max_bytes")]
    return [Verdict("data", "ok", detail)]


def _device_and_memory(config: SwarmConfig) -> list[Verdict]:
    import torch

    from swarm.train.device import describe_device, resolve_device
    from swarm.train.fit import HEADROOM, choose_batch_size, free_memory, measure_step, resolve_precision
    from swarm.train.model import ByteGPT
    from swarm.train.sync import inner_optimizer_factory

    if config.training.threads is not None:
        torch.set_num_threads(config.training.threads)
    device = resolve_device(config.training.device)
    precision = resolve_precision(config.training.precision, device)

    def build():
        model = ByteGPT(config.model).to(device)
        return model, inner_optimizer_factory(config.optimizer)(model.parameters())

    parameters = sum(p.numel() for p in ByteGPT(config.model).parameters())
    free = free_memory(device)
    where = f"{describe_device(device)} ({precision}), model {parameters / 1e6:.1f}M parameters"
    batch = config.training.batch_size
    try:
        if batch == "auto":
            cost = choose_batch_size(build, seq_len=config.model.seq_len, device=device, precision=precision)
        else:
            model, optimizer = build()
            cost = measure_step(model, optimizer, batch_size=batch, seq_len=config.model.seq_len, device=device,
                                precision=precision)
    except torch.OutOfMemoryError:
        return [Verdict("memory", "fail", f"{where}: one step of batch {batch} does not fit",
                        _smaller_batch_advice(config))]
    chosen = " (chosen by batch_size auto)" if batch == "auto" else ""
    detail = (f"{where}: a step of batch {cost.batch_size}{chosen} takes about {cost.peak_bytes / 2**30:.2f} GiB "
              f"of {free / 2**30:.1f} GiB free and {cost.seconds:.2f} s ({cost.batch_size / cost.seconds:,.0f} "
              f"samples/s)")
    if cost.peak_bytes > HEADROOM * free:
        return [Verdict("memory", "fail" if cost.peak_bytes > free else "warn", detail, _smaller_batch_advice(config))]
    return [Verdict("memory", "ok", detail)]


def _smaller_batch_advice(config: SwarmConfig) -> str:
    advice = "--set training.batch_size=auto (the largest that fits)"
    if config.optimizer.name == "adamw" and config.training.device != "cpu":
        advice += "; --set optimizer.name=adamw8bit (GPU: a quarter of Adam's state memory)"
    if config.training.precision == "fp32" and config.training.device != "cpu":
        advice += "; --set training.precision=bf16"
    return advice


def _disk(config: SwarmConfig) -> list[Verdict]:
    if config.checkpoint is None:
        return [Verdict("disk", "skip", "checkpoints are off (checkpoint: null)")]
    from swarm.train.model import ByteGPT

    parameters = sum(p.numel() for p in ByteGPT(config.model).parameters())
    # model, Adam's two moments, and DiLoCo's outer parameters and momentum, in fp32; written atomically (x2)
    need = parameters * 4 * (3 + (2 if config.averaging.mode == "diloco" else 0)) * 2
    folder = Path(config.checkpoint.dir).expanduser().resolve()
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    free = shutil.disk_usage(existing).free
    detail = f"{free / 2**30:.1f} GiB free at {existing}; a checkpoint needs about {need / 2**20:.0f} MiB"
    if free < need:
        return [Verdict("disk", "fail", detail, "free some space or set checkpoint.dir elsewhere")]
    return [Verdict("disk", "ok", detail)]


# ---- checks against the swarm ------------------------------------------------------------------
def _network(config: SwarmConfig, *, run: Optional[str], probe_bytes: int, report) -> None:
    if not config.network.initial_peers:
        report(Verdict("swarm", "skip", "no --initial-peers: nothing to check against (a new swarm)"))
        return
    from peers.lifecycle import StopSignals
    from swarm.net.dht import shutdown_dht

    stop = StopSignals()
    started = time.monotonic()
    try:
        try:
            dht = _start_dht(config, stop.event)
        except SwarmError as e:
            report(Verdict("bootstrap", "fail", str(e), "check the address (copy the line the bootstrap peer "
                           "prints), that its TCP port is open from here, and this machine's clock (see below)"))
        else:
            try:
                report(Verdict("bootstrap", "ok", f"joined the DHT in {time.monotonic() - started:.1f} s"))
                report(_reachability(dht, config))
                _check_run(config, dht, run, report)
            finally:
                shutdown_dht(dht)
        # the probes go straight to the initial peers, so they also explain a DHT that refused to start
        asyncio.run(_probe(config, probe_bytes, report))
        stop.disarm()
    finally:
        stop.disarm()


def _start_dht(config: SwarmConfig, stop):
    """A listening DHT node like `swarm join`'s, on its port: a fresh identity (the user's own key may be
    in use by their running peer), or, with a certificate (a private run), the identity it admits."""
    from swarm.net.admission import authorizer_for, own_certificate
    from swarm.net.certificate_record import CertificateValidator
    from swarm.net.dht import start_dht
    from swarm.net.identity import load_identity

    network = config.network
    if config.peer.certificate is None:
        return start_dht(network.model_copy(update={"identity_path": None}), identity=load_identity(None), stop=stop)
    identity = load_identity(network.identity_path)
    run, certificate = own_certificate(config.peer.certificate, run=None, peer_id=identity.peer_id)
    return start_dht(network, identity=identity, stop=stop, record_validators=[CertificateValidator(run)],
                     authorizer=authorizer_for(identity, certificate, run))


def _check_run(config: SwarmConfig, dht, run: Optional[str], report) -> None:
    """With ``--run``: the run's manifest is in the DHT and checks out, as `swarm join` would need."""
    if run is None:
        return
    from swarm.net.manifest_record import ManifestValidator, fetch_manifest

    dht.add_validators([ManifestValidator(run)])
    try:
        signed = fetch_manifest(dht, run, timeout=config.network.bootstrap_timeout)
    except SwarmError as e:
        report(Verdict("run", "fail", str(e), "check the --run fingerprint the bootstrap peer printed"))
        return
    report(Verdict("run", "ok", f"manifest version {signed.manifest.version} of run {signed.manifest.run_id} "
                   f"({signed.manifest.admission})"))


async def _probe(config: SwarmConfig, probe_bytes: int, report) -> None:
    """Clock, dial back and bandwidth against up to :data:`MAX_PROBED_PEERS` initial peers, from a libp2p
    daemon listening where `swarm join` would."""
    from hivemind.p2p import P2P, PeerID

    from swarm.telemetry.probe import probe_peer

    network = config.network
    try:
        p2p = await P2P.create(initial_peers=network.initial_peers, host_maddrs=network.host_maddrs,
                                        announce_maddrs=network.announce_maddrs or None)
    except Exception as e:  # P2PDaemonError: the port is taken, or no initial peer could be dialed
        report(Verdict("probe", "fail", f"could not reach any initial peer: {str(e)[:160]}",
                       "check the address and that its TCP port is open from here"))
        return
    try:
        peers = list(dict.fromkeys(PeerID.from_base58(maddr.rsplit("/p2p/", 1)[1])
                                   for maddr in network.initial_peers))[:MAX_PROBED_PEERS]
        results = [await probe_peer(p2p, peer, probe_bytes=probe_bytes,
                                    timeout=network.bootstrap_timeout) for peer in peers]
    finally:
        await p2p.shutdown()
    answered = [result for result in results if result.error is None]
    for result in results:
        if result.error is not None:
            report(Verdict("probe", "warn", f"{result.peer[-8:]} did not answer the probes: {result.error}",
                           "an older swarm version, or a peer that is gone or overloaded"))
    if not answered:
        return
    report(_clock(answered))
    if probe_bytes:
        report(_bandwidth(answered, config))


def _clock(results) -> Verdict:
    worst = max(results, key=lambda result: abs(result.clock_offset))
    skew, margin = worst.clock_offset, worst.clock_uncertainty
    detail = f"this clock is {-skew:+.2f} s (+-{margin:.2f}) off {worst.peer[-8:]}'s"
    if abs(skew) - margin > MAX_CLOCK_SKEW:
        return Verdict("clock", "fail", detail, "the DHT refuses records more than 3 s off: sync the clock (NTP, "
                       "e.g. `timedatectl set-ntp true`)")
    if abs(skew) - margin > WARN_CLOCK_SKEW:
        return Verdict("clock", "warn", detail, "enable NTP before it drifts past 3 s")
    return Verdict("clock", "ok", detail)


def _reachability(dht, config: SwarmConfig) -> Verdict:
    """What the DHT's start decided (:mod:`swarm.net.reachability`: an initial peer dialed this one back,
    or it joined through a relay on the initial peers), as `swarm join` would find it."""
    from swarm.net.dht import reachability

    how = reachability(dht)
    port = config.network.port or "network.port"
    if how == "client":
        return Verdict("reachable", "skip", "network.client_mode=true: this peer accepts no connections (others "
                       "cannot fetch from it)")
    if how == "relayed":
        return Verdict("reachable", "warn", "no peer could connect back to this one (NAT without a forwarded "
                       "port?): it is reachable through a relay on the initial peers, which makes rounds slower",
                       f"forward TCP port {port} to this machine to be reached directly (docs/nat.md)")
    return Verdict("reachable", "ok", "an initial peer connected back to this one: reachable directly")


def _bandwidth(results, config: SwarmConfig) -> Verdict:
    from swarm.train.model import ByteGPT

    up = statistics.median(result.up_mbit for result in results)
    down = statistics.median(result.down_mbit for result in results)
    parameters = sum(p.numel() for p in ByteGPT(config.model).parameters())
    bits = {"none": 32, "fp16": 16, "scaled-fp16": 16}.get(config.averaging.compression, 8)
    payload = parameters * bits / 8 * 2  # an all-reduce sends and receives up to about twice its payload
    seconds = payload * 8 / 1e6 / max(min(up, down), 1e-3)
    detail = (f"{up:,.1f} Mbit/s up, {down:,.1f} down (median of {len(results)} peers); one averaging round "
              f"moves about {payload / 2**20:.0f} MiB: {seconds:.0f} s at that speed")
    timeout = config.averaging.averaging_timeout
    if seconds > timeout:
        return Verdict("bandwidth", "fail", detail, f"rounds would time out (averaging.averaging_timeout {timeout:g} "
                       "s): use averaging.mode=diloco with 8-bit compression, or a faster link")
    if seconds > timeout / 2:
        return Verdict("bandwidth", "warn", detail, "rounds will use much of averaging.averaging_timeout")
    return Verdict("bandwidth", "ok", detail)
