"""The `swarm` command: parse argv, build the config, run one peer role, map errors to exit codes."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from peers import exit_codes
from peers.health import DEFAULT_MAX_AGE, run_health
from swarm import __version__
from swarm.config.loading import config_tree, dump_config, load_config
from swarm.config.schema import SwarmConfig
from swarm.errors import ConfigError, SwarmError
from swarm.net.manifest import check_fingerprint, explicit_keys

logger = logging.getLogger("swarm.cli")

# Flags that stand for one config key each. A flag's value becomes the override ``key=value``, exactly as
# ``--set key=value`` would (typed by the schema: swarm.config.loading.typed_value), after the --set ones.
KEY_FLAGS: dict[str, tuple[str, dict]] = {
    "--port": ("network.port", dict(metavar="PORT", help="TCP port to listen on; 0 picks a free one (network.port)")),
    "--announce": ("network.announce_maddrs", dict(nargs="+", metavar="MADDR", help=(
        "address(es) to announce to others, e.g. /ip4/203.0.113.5/tcp/31337 behind a port forward "
        "(network.announce_maddrs)"))),
    "--identity": ("network.identity_path", dict(metavar="FILE", help=(
        "private key file, made if missing: the same peer id on every run (network.identity_path)"))),
    "--data": ("data.path", dict(metavar="DIR", help="folder of text files to train on (data.path; "
                                                      "default: the embedded corpus)")),
    "--name": ("peer.display_name", dict(metavar="NAME", help="name shown to the swarm (peer.display_name)")),
    "--device": ("training.device", dict(metavar="DEVICE", help="auto, cpu, cuda or mps (training.device)")),
    "--run-id": ("run_id", dict(metavar="RUN_ID", help="the run to take part in; peers of one run share it (run_id)")),
}

EXAMPLES = {
    "bootstrap": """\
  swarm bootstrap --port 31337 --identity ~/.swarm/bootstrap.key --address-file bootstrap.json
  swarm bootstrap --port 31337 --announce /ip4/203.0.113.5/tcp/31337 --manifest run-manifest.json""",
    "join": """\
  swarm join --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/QmBootstrap... --data ~/text --name lab-7
  swarm join --initial-peers-file bootstrap.json --identity ~/.swarm/peer.key --resume --device cuda
  swarm join --initial-peers /ip4/.../p2p/... --run FINGERPRINT --certificate certificate.json
  swarm join --new-swarm --config configs/debug.yaml      # the first peer of a new swarm""",
    "demo": """\
  swarm demo                        # 1 bootstrap + 3 trainers + a monitor, about 2 minutes on CPU
  swarm demo --peers 2 --epochs 3 --workdir demo-run""",
    "doctor": """\
  swarm doctor --config configs/default.yaml --initial-peers /ip4/203.0.113.5/tcp/31337/p2p/QmBootstrap...
  swarm doctor --initial-peers-file bootstrap.json --run FINGERPRINT --json --probe-mb 0""",
    "monitor": """\
  swarm monitor --initial-peers /ip4/.../p2p/... --set monitor.port=8470
  swarm monitor --export-csv history/ --set monitor.db_path=swarm-monitor.sqlite""",
    "status": """\
  swarm status --initial-peers /ip4/.../p2p/...
  swarm status --initial-peers-file bootstrap.json --json | jq '.totals'""",
    "health": """\
  swarm health --status-file /var/lib/swarm/status.json && echo alive
  SWARM_STATUS_FILE=status.json swarm health --json""",
    "run": """\
  swarm run create --config configs/default.yaml --out run-manifest.json
  swarm run create --config configs/default.yaml --private --refresh 30""",
    "create": """\
  swarm run create --config configs/default.yaml --out run-manifest.json
  swarm run create --config configs/default.yaml --private --refresh 30""",
    "admit": """\
  swarm admit 12D3KooW... --role institution --organization "Example University" --days 90""",
    "revoke": """\
  swarm revoke 12D3KooW... --manifest run-manifest.json""",
    "id": """\
  swarm id --identity ~/.swarm/peer.key""",
    "export": """\
  swarm export --checkpoint checkpoints/ --out my-model""",
    "generate": """\
  swarm generate --export my-model --prompt "def main(" --max-new-bytes 300
  swarm generate --checkpoint checkpoints/latest.pt --temperature 0 --seed 1""",
    "config": """\
  swarm config show --config configs/debug.yaml --set training.batch_size=8
  swarm config show --json""",
    "show": """\
  swarm config show --config configs/debug.yaml --set training.batch_size=8
  SWARM_DATA_PATH=/data swarm config show --json""",
}


def _command(commands, name: str, help: str) -> argparse.ArgumentParser:
    """A subcommand whose --help ends with examples (EXAMPLES[name])."""
    return commands.add_parser(name, help=help, description=help[:1].upper() + help[1:] + ".",
                               epilog="Examples:\n" + EXAMPLES[name],
                               formatter_class=argparse.RawDescriptionHelpFormatter)


def _with_key_flags(sub: argparse.ArgumentParser, *flags: str) -> argparse.ArgumentParser:
    for flag in flags:
        key, options = KEY_FLAGS[flag]
        sub.add_argument(flag, dest=_key_dest(flag), **options)
    return sub


def _key_dest(flag: str) -> str:
    return "key_" + flag.lstrip("-").replace("-", "_")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm",
        description="Train one shared model together over the internet, peer to peer.",
        epilog="Exit codes: 0 ok or left cleanly, 1 internal error, 2 usage/config/multiaddr, "
        "3 no initial peer answered, 4 data, 5 checkpoint, 6 monitor history or dashboard port, "
        "7 run manifest or certificate missing, forged, expired, revoked or contradicted, "
        "8 export (folder, --out or the export extra), 9 swarm doctor found a problem, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"swarm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_peer_commands(commands)
    _add_watch_commands(commands)
    _add_run_commands(commands, _with_config)
    _add_model_commands(commands)
    config = _command(commands, "config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    show = _with_peers(_with_config(_command(config_commands, "show",
                                             help="print the resolved config (YAML + env + --set)")))
    show.add_argument("--json", action="store_true", help="print JSON instead of YAML")
    return parser


def _with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub.add_argument("--config", type=Path, help="YAML run config (default: built-in defaults, or $SWARM_CONFIG)")
    sub.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config key, e.g. --set training.batch_size=8 (repeatable)",
    )
    return sub


def _with_peers(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub.add_argument(
        "--initial-peers", nargs="+", default=None, metavar="MADDR",
        help="full multiaddr(s) of peers already in the swarm; one reachable is enough",
    )
    sub.add_argument(
        "--initial-peers-file", type=Path, metavar="FILE",
        help="also join through the addresses in FILE, as written by `swarm bootstrap --address-file`",
    )
    return sub


def _with_certificate(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub.add_argument("--certificate", type=Path, metavar="FILE",
                     help="this peer's admission certificate from the run's owner (`swarm admit`): needed in a private "
                          "run, and it names the run (peer.certificate)")
    return sub


def _with_status(sub: argparse.ArgumentParser, help: str) -> argparse.ArgumentParser:
    sub.add_argument("--status-file", type=Path, default=_env_path("SWARM_STATUS_FILE"), help=help)
    return sub


def _add_peer_commands(commands) -> None:
    """The peers that take part: bootstrap, join, and the local demo of both."""
    bootstrap = _with_peers(_with_config(_command(commands, "bootstrap",
                                                  help="run a DHT-only peer that keeps the swarm reachable")))
    _with_key_flags(bootstrap, "--port", "--announce", "--identity", "--name", "--run-id")
    bootstrap.add_argument("--address-file", type=Path, help="also write the peer id and multiaddrs here as JSON")
    bootstrap.add_argument("--manifest", type=Path, metavar="FILE",
                           help="publish this run manifest (from `swarm run create`) and use its settings")
    _with_certificate(bootstrap)
    _with_status(bootstrap, "keep a JSON status of this peer here, for `swarm health` (default: $SWARM_STATUS_FILE)")

    join = _with_peers(_with_config(_command(commands, "join", help="join a swarm as a trainer peer")))
    join.add_argument("--new-swarm", action="store_true",
                      help="start a new swarm: this peer is its first (refused with initial peers; without it, "
                           "join refuses to start with none)")
    _with_key_flags(join, "--port", "--announce", "--identity", "--data", "--name", "--device", "--run-id")
    join.add_argument("--resume", action="store_true", help="restore model, optimizer and epoch from checkpoint.dir")
    join.add_argument("--run", metavar="FINGERPRINT",
                      help="join this run: fetch its signed manifest from the DHT and train with its settings")
    _with_certificate(join)
    _with_status(join, "keep a JSON status of this peer here, for scripts and `swarm health` "
                       "(default: $SWARM_STATUS_FILE)")

    doctor = _with_peers(_with_config(_command(
        commands, "doctor", help="check before joining: versions, data, memory, disk, clock, reachability, bandwidth")))
    doctor.add_argument("--run", metavar="FINGERPRINT", help="the run to check against, as for `swarm join`")
    _with_certificate(doctor)
    doctor.add_argument("--json", action="store_true", help="print the verdicts as JSON")
    doctor.add_argument("--probe-mb", type=_at_least(0, float), default=4.0, metavar="MB",
                        help="MB sent to and received from each probed peer to measure bandwidth; 0 skips it (default 4)")

    demo = _with_config(_command(commands, "demo",
                                 help="a local swarm: 1 bootstrap + 3 trainers + a monitor on 127.0.0.1"))
    demo.add_argument("--peers", type=int, default=3, help="number of trainer processes (default 3)")
    demo.add_argument("--epochs", type=int, default=None, help="swarm epochs to train (default: the demo's own)")
    demo.add_argument("--workdir", type=Path, help="keep logs and checkpoints here (default: a temporary folder)")


def _add_watch_commands(commands) -> None:
    """What watches a swarm or a peer: monitor, status, health."""
    monitor = _with_peers(_with_config(_command(
        commands, "monitor", help="watch a swarm: history in SQLite, a web dashboard, a JSON API and Prometheus /metrics")))
    _with_key_flags(monitor, "--run-id")
    monitor.add_argument("--url-file", type=Path, help="also write the dashboard's address here as JSON (for scripts)")
    _with_certificate(monitor)
    monitor.add_argument("--export-csv", type=Path, metavar="DIR",
                         help="write the history in monitor.db_path as CSV files into DIR and exit (no network)")

    status = _with_peers(_with_config(_command(commands, "status", help="print the swarm's peers as a table, from the DHT")))
    _with_key_flags(status, "--run-id")
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _with_certificate(status)
    status.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                        help="wait this long for the first metrics record (default 10)")

    health = _with_status(
        _command(commands, "health", help="exit 0 if the peer writing --status-file is alive and connected, else 1"),
        "the status file of the peer to check (default: $SWARM_STATUS_FILE)",
    )
    health.add_argument("--json", action="store_true", help="print the verdict and the peer's status as JSON")
    health.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE, metavar="SECONDS",
                        help=f"a status older than this means the peer is stuck or gone (default {DEFAULT_MAX_AGE:g})")


def _add_run_commands(commands, with_config) -> None:
    """What a run's owner does (`swarm run create`, `admit`, `revoke`) and what a peer does to be admitted (`id`)."""
    run = _command(commands, "run", help="own a run: its authority key and signed manifest")
    run_commands = run.add_subparsers(dest="run_command", required=True, metavar="SUBCOMMAND")
    create = with_config(_command(
        run_commands, "create", help="sign a manifest of the config's run (a new version if --out holds one of the same run)"))
    create.add_argument("--key", type=Path, default=Path("~/.swarm/run-authority.key"),
                        help="run authority key, made if missing; keep it private (default ~/.swarm/run-authority.key)")
    create.add_argument("--out", type=Path, default=Path("run-manifest.json"),
                        help="the signed manifest to write (default run-manifest.json)")
    create.add_argument("--private", action="store_true",
                        help="only peers with a certificate (`swarm admit`) take part; fixed for the run's lifetime")
    create.add_argument("--refresh", type=float, metavar="SECONDS",
                        help="how often peers re-read the manifest: a revocation takes effect within this long "
                             "(default 30, or the previous version's)")

    owner = {"--manifest": dict(type=Path, default=Path("run-manifest.json"),
                                help="the run's manifest file (default run-manifest.json)"),
             "--key": dict(type=Path, default=Path("~/.swarm/run-authority.key"),
                           help="the run authority key (default ~/.swarm/run-authority.key)")}
    admit = _command(commands, "admit", help="issue a certificate that admits one peer id to the run, with a role")
    revoke = _command(commands, "revoke", help="revoke a peer id: a new manifest version, refused within a refresh")
    for sub in (admit, revoke):
        sub.add_argument("peer_id", metavar="PEER_ID", help="the peer's id, as `swarm id` prints it")
        for flag, options in owner.items():
            sub.add_argument(flag, **options)
    admit.add_argument("--role", choices=["institution", "volunteer", "monitor", "bootstrap"], default="volunteer",
                       help="institution and volunteer train (institutions are preferred state donors); monitor watches; "
                            "bootstrap keeps the DHT reachable (default volunteer)")
    admit.add_argument("--organization", help="shown to the swarm (at most 64 characters)")
    admit.add_argument("--days", type=float, default=90.0, help="validity in days (default 90, at most 400)")
    admit.add_argument("--out", type=Path, default=Path("certificate.json"),
                       help="the certificate to write (default certificate.json)")
    ident = with_config(_command(commands, "id", help="print this peer's id (its key file is made if missing)"))
    _with_key_flags(ident, "--identity")


def _add_model_commands(commands) -> None:
    """What uses the trained model outside the swarm: export, generate (no network, no hivemind)."""
    checkpoint_help = "a checkpoint file, or a folder holding latest.pt (default: checkpoint.dir of the config)"
    export = _with_config(_command(
        commands, "export", help="write a checkpoint's model as a Hugging Face GPT-2 (model.safetensors, config.json)"))
    export.add_argument("--checkpoint", type=Path, metavar="PATH", help=checkpoint_help)
    export.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="the export folder to create; it must not exist or be empty")

    generate = _with_config(_command(commands, "generate", help="sample text from a checkpoint or an export"))
    source = generate.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", type=Path, metavar="PATH", help=checkpoint_help)
    source.add_argument("--export", type=Path, metavar="DIR", help="an export folder written by `swarm export`")
    generate.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    generate.add_argument("--max-new-bytes", type=_at_least(0, int), default=200, metavar="N",
                          help="bytes to sample after the prompt (default 200)")
    # None: the library's defaults (swarm.train.sampling), which export also writes to generation_config.json
    generate.add_argument("--temperature", type=_at_least(0, float), default=None, metavar="T",
                          help="below 1 sharper, above 1 more random, 0 always the most likely byte (default 0.8)")
    generate.add_argument("--top-k", type=_at_least(0, int), default=None, metavar="K",
                          help="sample among the K most likely bytes; 0 among all 256 (default 40)")
    generate.add_argument("--seed", type=int, default=None,
                          help="the same seed gives the same text from the same model (default: a fresh seed)")


def _at_least(minimum: float, kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value
    return parse


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "health":  # the container's health check: cheap, no logging set-up, no hivemind import
        return _health(args)
    # The config is read and checked before anything imports hivemind or torch (about 2-3 s together),
    # so that a user's mistake is answered with its one line at once.
    try:
        config = _load(args)
    except SwarmError as e:
        return _report(args, e)
    if args.command == "config":
        shown = json.dumps(config.model_dump(mode="json"), indent=2) + "\n" if args.json else dump_config(config)
        print(shown, end="")
        return exit_codes.OK
    if args.command == "join":
        try:
            _check_new_swarm(args, config)
        except SwarmError as e:
            return _report(args, e)
    if getattr(args, "run", None) is not None:
        try:
            check_fingerprint(args.run)
        except SwarmError as e:
            return _report(args, e)
    if args.command in ("export", "generate"):  # not a peer: plain logging, and no hivemind to import
        level = os.environ.get("SWARM_LOGLEVEL", "INFO").upper()
        logging.basicConfig(level=level if level in logging.getLevelNamesMapping() else "INFO",
                            format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
        return _run(args, config)
    from peers.lifecycle import setup_logging  # imports hivemind

    setup_logging({"join": "trainer"}.get(args.command, args.command))
    code = _run(args, config)
    if args.command in ("join", "bootstrap", "monitor", "status", "doctor"):
        # Everything was shut down explicitly. Skip interpreter finalization: hivemind's __del__ hooks
        # would try to shut the same averagers down again and can abort the process on the way out.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _load(args: argparse.Namespace) -> SwarmConfig:
    """The validated config of this command: YAML, ``SWARM_*``, ``--set`` and the flags that stand for keys."""
    if args.command == "demo":
        from peers.demo import demo_config  # no torch or hivemind at import

        return demo_config(args.config, args.overrides, num_peers=args.peers, epochs=args.epochs)
    return load_config(getattr(args, "config", None), _overrides(args))


def _overrides(args: argparse.Namespace) -> list[str]:
    """``--set`` and the flags that stand for config keys, as ``key=value`` overrides."""
    overrides = list(getattr(args, "overrides", []))
    initial_peers = list(getattr(args, "initial_peers", None) or [])
    if getattr(args, "initial_peers_file", None):
        initial_peers += _read_address_file(args.initial_peers_file)
    if initial_peers:
        overrides.append("network.initial_peers=" + ",".join(initial_peers))
    if getattr(args, "resume", False):
        overrides.append("checkpoint.resume=true")
    if getattr(args, "certificate", None) is not None:
        overrides.append(f"peer.certificate={args.certificate}")
    for flag, (key, _) in KEY_FLAGS.items():
        value = getattr(args, _key_dest(flag), None)
        if value is not None:
            overrides.append(f"{key}={','.join(value) if isinstance(value, list) else value}")
    return overrides


def _check_new_swarm(args: argparse.Namespace, config: SwarmConfig) -> None:
    """A trainer with no initial peer would train alone and look healthy: starting a swarm is said aloud."""
    if config.network.initial_peers and args.new_swarm:
        raise ConfigError("--new-swarm starts a swarm of its own, so it takes no initial peers "
                          "(drop --new-swarm to join the swarm of those peers)")
    if not config.network.initial_peers and not args.new_swarm:
        raise ConfigError("no initial peers: pass --initial-peers MADDR (or --initial-peers-file, or "
                          "SWARM_NETWORK_INITIAL_PEERS) to join a swarm, or --new-swarm to start a new one")


def _explicit(args: argparse.Namespace) -> set[str]:
    """The dotted keys this peer sets itself (YAML, ``SWARM_*``, ``--set``): checked against a run manifest."""
    return explicit_keys(config_tree(args.config, _overrides(args)))


def _report(args: argparse.Namespace, error: SwarmError) -> int:
    print(f"swarm {args.command}: error: {error}", file=sys.stderr, flush=True)
    return exit_codes.for_error(error)


def _run(args: argparse.Namespace, config: SwarmConfig) -> int:
    try:
        return _dispatch(args, config)
    except SwarmError as e:
        return _report(args, e)
    except KeyboardInterrupt:
        print(f"swarm {args.command}: interrupted", file=sys.stderr, flush=True)
        return exit_codes.INTERRUPTED
    except Exception:
        logger.exception("unexpected failure")
        return exit_codes.INTERNAL


def _dispatch(args: argparse.Namespace, config: SwarmConfig) -> int:
    """Run the role; each role module is imported only here, after the config is known to be valid."""
    if args.command == "demo":
        from peers.demo import run_demo

        return run_demo(config_path=args.config, overrides=args.overrides, num_peers=args.peers,
                        epochs=args.epochs, workdir=args.workdir)
    elif args.command == "bootstrap":
        from peers.bootstrap import run_bootstrap

        run_bootstrap(config, address_file=args.address_file,
                      status_path=args.status_file, manifest_path=args.manifest, explicit=_explicit(args))
    elif args.command == "join":
        from peers.trainer import run_trainer

        run_trainer(config, status_path=args.status_file, run=args.run, explicit=_explicit(args),
                    new_swarm=args.new_swarm)
    elif args.command == "doctor":
        from peers.doctor import run_doctor

        ok = run_doctor(config, run=args.run, as_json=args.json, probe_bytes=int(args.probe_mb * 2**20))
        return exit_codes.OK if ok else exit_codes.DOCTOR
    elif args.command == "monitor":
        from peers.monitor import export_csv, run_monitor

        if args.export_csv is not None:
            export_csv(config, args.export_csv)
        else:
            run_monitor(config, url_file=args.url_file)
    elif args.command == "run":
        from peers.run import create_run

        create_run(config, key_path=args.key, out=args.out, private=args.private, refresh=args.refresh)
    elif args.command == "admit":
        from peers.run import admit

        admit(peer_id=args.peer_id, manifest_path=args.manifest, key_path=args.key, role=args.role,
              organization=args.organization, days=args.days, out=args.out)
    elif args.command == "revoke":
        from peers.run import revoke

        revoke(peer_id=args.peer_id, manifest_path=args.manifest, key_path=args.key)
    elif args.command == "id":
        from peers.run import print_id

        print_id(config.network.identity_path)
    elif args.command == "status":
        from peers.status import run_status

        run_status(config, as_json=args.json, wait=args.wait)
    elif args.command == "export":
        from peers.use_model import run_export

        run_export(config, checkpoint=args.checkpoint, out=args.out)
    elif args.command == "generate":
        from peers.use_model import run_generate

        run_generate(config, checkpoint=args.checkpoint, export=args.export, prompt=args.prompt,
                     max_new_bytes=args.max_new_bytes, temperature=args.temperature, top_k=args.top_k, seed=args.seed)
    return exit_codes.OK


def _health(args: argparse.Namespace) -> int:
    if args.status_file is None:
        print("swarm health: error: no status file: pass --status-file or set SWARM_STATUS_FILE", file=sys.stderr)
        return exit_codes.USAGE
    return run_health(args.status_file, max_age=args.max_age, as_json=args.json)


def _read_address_file(path: Path) -> list[str]:
    """The multiaddrs in a JSON file written by `swarm bootstrap --address-file`."""
    try:
        maddrs = json.loads(Path(path).read_text())["maddrs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"cannot read initial peers from {path} ({type(e).__name__}: {e}); it should be "
                          f"the --address-file of a running `swarm bootstrap`") from None
    if not isinstance(maddrs, list) or not all(isinstance(maddr, str) for maddr in maddrs):
        raise ConfigError(f"{path}: 'maddrs' should be a list of multiaddrs")
    return maddrs


def _env_path(name: str) -> Optional[Path]:
    return Path(os.environ[name]) if os.environ.get(name) else None
