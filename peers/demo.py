"""`swarm demo`: a whole swarm on this machine, as separate processes on 127.0.0.1.

One bootstrap peer and N trainers (the first an institution, the rest volunteers) train the debug
model on shards of the embedded corpus, and a monitor serves a live dashboard of them. The run has an
owner, as a real one does: the demo makes a run authority key and signs an open run manifest, which
the bootstrap peer publishes and the trainers join by its fingerprint; the first trainer is an
institution through a certificate the authority signs for its peer id. The demo runs
DiLoCo with 8-bit pseudo-gradients by default (``--set averaging.mode=sync`` shows hivemind.Optimizer
instead). Progress is read from the trainers' status files and shown as one line every few seconds;
the summary compares held-out loss before and after and checks that the peers' final models agree.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

from harness.processes import PeerProcess, read_json, wait_for
from swarm.config.loading import load_config
from swarm.config.schema import SwarmConfig
from swarm.errors import ConfigError, SwarmError

DEBUG_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "debug.yaml"
DEFAULT_EPOCHS = 30  # rounds in DiLoCo mode: about 2.5 minutes on 2 CPU cores
DEMO_DEFAULTS = ("averaging.mode=diloco", "averaging.compression=blockwise8")  # before the user's --set
PROGRESS_PERIOD = 3.0  # seconds between progress lines
STARTUP_TIMEOUT = 120.0
STALL_TIMEOUT = 180.0  # give up if no trainer advances an epoch for this long


def run_demo(
    *,
    config_path: Optional[Path],
    overrides: Sequence[str],
    num_peers: int,
    epochs: Optional[int],
    workdir: Optional[Path],
) -> int:
    config = demo_config(config_path, overrides, num_peers=num_peers, epochs=epochs)
    config_path, epochs = config_path or DEBUG_CONFIG, epochs or DEFAULT_EPOCHS
    overrides = _demo_overrides(overrides, epochs)  # the children get the same keys
    unit = "round" if config.averaging.mode == "diloco" else "epoch"
    what = (f"DiLoCo rounds of {config.diloco.inner_steps} local steps, {config.averaging.compression} pseudo-gradients"
            if unit == "round" else f"sync epochs of {config.training.target_batch_size} samples")

    keep = workdir is not None
    workdir = Path(workdir or tempfile.mkdtemp(prefix="swarm-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    base = ["--config", str(config_path), *[arg for item in overrides for arg in ("--set", item)]]
    started = time.monotonic()
    print(f"swarm demo: 1 bootstrap + {num_peers} trainers on 127.0.0.1, run {config.run_id!r}, "
          f"{epochs} {what}; logs in {workdir}", flush=True)

    fingerprint = _own_run(config, workdir)
    peers: list[PeerProcess] = []
    try:
        bootstrap = PeerProcess(
            "bootstrap",
            ["bootstrap", *base, "--set", "network.listen_host=127.0.0.1", "--manifest", str(workdir / "manifest.json"),
             "--identity", str(workdir / "bootstrap.key"), "--address-file", str(workdir / "bootstrap.json")],
            log_path=workdir / "bootstrap.log",
        )
        peers.append(bootstrap)
        address = wait_for(lambda: read_json(workdir / "bootstrap.json"), timeout=STARTUP_TIMEOUT,
                           what="the bootstrap peer", alive=[bootstrap])["maddrs"][0]
        trainers = [_start_trainer(index, num_peers, [*base, "--run", fingerprint], address, workdir)
                    for index in range(num_peers)]
        peers.extend(trainers)
        peers.append(_start_monitor(config_path, base, address, workdir, config.run_id))
        _show_progress(trainers, workdir, epochs, started, unit)
        for trainer in trainers:
            trainer.stop()
        return _summarize(trainers, workdir, started, num_peers, keep)
    finally:
        for peer in reversed(peers):
            peer.stop()


def demo_config(config_path: Optional[Path], overrides: Sequence[str], *, num_peers: int,
                epochs: Optional[int]) -> SwarmConfig:
    """The demo's config, checked once here rather than in every child; imports neither torch nor hivemind.

    :raises ConfigError: the config file is missing, a key or value is wrong, or ``num_peers`` is out of range.
    """
    config_path = config_path or DEBUG_CONFIG
    if not Path(config_path).is_file():
        raise ConfigError(f"the demo's config {config_path} is missing; pass --config configs/debug.yaml")
    if not 1 <= num_peers <= 8:
        raise ConfigError(f"--peers must be between 1 and 8, got {num_peers}")
    return load_config(config_path, _demo_overrides(overrides, epochs or DEFAULT_EPOCHS))


def _demo_overrides(overrides: Sequence[str], epochs: int) -> list[str]:
    return [*DEMO_DEFAULTS, *overrides, f"training.max_epochs={epochs}"]


def _own_run(config: SwarmConfig, workdir: Path) -> str:
    """The demo run's authority key, signed open manifest (``workdir/manifest.json``) and an institution
    certificate for peer0's identity (``workdir/peer0``); returns the run's fingerprint."""
    from peers.lifecycle import write_json_atomic  # these import hivemind: not before the config is checked
    from swarm.net.certificate import issue_certificate
    from swarm.net.identity import load_identity
    from swarm.net.manifest import new_manifest
    from swarm.net.manifest_record import authority_of, sign_manifest

    authority = load_identity(workdir / "authority.key").private_key
    signed = sign_manifest(new_manifest(config, authority=authority_of(authority)), authority)
    write_json_atomic(workdir / "manifest.json", signed.as_dict())
    institution = load_identity(workdir / "peer0" / "identity.key")
    certificate = issue_certificate(authority, run_id=config.run_id, admission="open", peer_id=institution.peer_id,
                                    role="institution", organization="demo institution", valid_for=86400.0)
    write_json_atomic(workdir / "peer0" / "certificate.json", certificate.as_dict())
    return signed.fingerprint


def _start_trainer(index: int, num_peers: int, base: list[str], address: str, workdir: Path) -> PeerProcess:
    peer_dir = workdir / f"peer{index}"
    certified = [] if index else ["--certificate", str(peer_dir / "certificate.json"),
                                  "--set", f"network.identity_path={peer_dir / 'identity.key'}"]
    return PeerProcess(
        f"peer{index}",
        ["join", *base, *certified, "--initial-peers", address,
         "--set", "network.listen_host=127.0.0.1",
         "--set", f"data.num_shards={num_peers}", "--set", f"data.shard_index={index}",
         "--set", f"peer.display_name=peer{index}",
         "--set", f"checkpoint.dir={peer_dir / 'checkpoints'}", "--status-file", str(peer_dir / "status.json")],
        log_path=peer_dir / "trainer.log",
    )


def _start_monitor(config_path: Path, base: list[str], address: str, workdir: Path, run_id: str) -> PeerProcess:
    """A monitor on a free port; the demo goes on without it if it cannot start (it only watches)."""
    monitor = PeerProcess(
        "monitor",
        ["monitor", "--config", str(config_path), "--set", "monitor.port=0",
         "--set", f"monitor.db_path={workdir / 'monitor.sqlite'}", *base[2:], "--initial-peers", address,
         "--url-file", str(workdir / "monitor.json")],
        log_path=workdir / "monitor.log",
    )
    try:
        url = wait_for(lambda: read_json(workdir / "monitor.json"), timeout=STARTUP_TIMEOUT, what="the monitor",
                       alive=[monitor])["url"]
    except (RuntimeError, TimeoutError) as e:
        print(f"swarm demo: the monitor did not start ({e}); training goes on without it", flush=True)
        return monitor
    print(f"swarm demo: dashboard at {url} (JSON {url}api/swarm, Prometheus {url}metrics)", flush=True)
    print(f"  or in a terminal: swarm status --config {config_path} --initial-peers {address}", flush=True)
    return monitor


def _show_progress(trainers: list[PeerProcess], workdir: Path, epochs: int, started: float, unit: str) -> None:
    last_line, last_advance, best_epoch = 0.0, time.monotonic(), -1
    while True:
        statuses = [read_json(workdir / f"peer{index}" / "status.json") for index in range(len(trainers))]
        running = [status for status in statuses if status]
        for trainer in trainers:
            if trainer.poll() not in (None, 0):
                raise SwarmError(f"{trainer.name} failed (exit {trainer.poll()}):\n{trainer.log_tail()}")
        if running and max(status["epoch"] for status in running) > best_epoch:
            best_epoch, last_advance = max(status["epoch"] for status in running), time.monotonic()
        if time.monotonic() - last_advance > STALL_TIMEOUT:
            raise SwarmError(f"the swarm made no progress for {STALL_TIMEOUT:g}s; see the logs in {workdir}")
        if len(running) == len(trainers) and all(status["finished"] for status in running):
            print(_progress_line(running, epochs, started, unit), flush=True)
            return
        if time.monotonic() - last_line >= PROGRESS_PERIOD:
            last_line = time.monotonic()
            if running:
                print(_progress_line(running, epochs, started, unit), flush=True)
            else:
                print(f"[{time.monotonic() - started:4.0f}s] starting {len(trainers)} trainers ...", flush=True)
        time.sleep(0.5)


def _progress_line(statuses: list[dict], epochs: int, started: float, unit: str) -> str:
    epoch = max(status["epoch"] for status in statuses)
    heldout = _mean(status["heldout_loss"] for status in statuses)
    train = _mean(status["train_loss"] for status in statuses)
    speed = sum(status["samples_per_second"] for status in statuses if not status["finished"])
    peers = max(status["swarm_peers"] for status in statuses)
    return (f"[{time.monotonic() - started:4.0f}s] {unit} {epoch:3d}/{epochs} | train loss {_fmt(train)} | "
            f"held-out {_fmt(heldout)} | {speed:4.0f} samples/s | {peers} peers training")


def _summarize(trainers: list[PeerProcess], workdir: Path, started: float, num_peers: int, keep: bool) -> int:
    import torch  # only here: the demo's own process needs torch for nothing else

    from swarm.train.checkpoint import checkpoint_path

    statuses = [read_json(workdir / f"peer{index}" / "status.json") for index in range(num_peers)]
    before = _mean(status["initial_heldout_loss"] for status in statuses)
    after = _mean(status["heldout_loss"] for status in statuses)
    models = [torch.load(checkpoint_path(workdir / f"peer{index}" / "checkpoints"), weights_only=True)["model"]
              for index in range(num_peers)]
    disagreement = max(
        (float((tensor - other[name]).abs().max()) for other in models[1:] for name, tensor in models[0].items()),
        default=0.0,
    )
    print(f"\nswarm demo finished in {time.monotonic() - started:.0f}s")
    print(f"  held-out loss   {before:.3f} -> {after:.3f} ({after - before:+.3f} nats/byte)")
    print(f"  epochs/rounds   {max(status['epoch'] for status in statuses)} (all peers at "
          f"{sorted({status['epoch'] for status in statuses})})")
    shares = ", ".join(f"{status['role']} {status['samples']:,}" for status in statuses)
    print(f"  samples         {sum(status['samples'] for status in statuses):,} ({shares})")
    print(f"  peers           {num_peers} trainers + 1 bootstrap; final models differ by at most {disagreement:.2e}")
    if keep:
        print(f"  logs, checkpoints, status files and the monitor's history (monitor.sqlite) in {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if after < before else 1


def _mean(values) -> Optional[float]:
    values = [value for value in values if value is not None]
    return sum(values) / len(values) if values else None


def _fmt(value: Optional[float]) -> str:
    return f"{value:.3f}" if value is not None else "  -  "
