"""The `swarm` command: parse argv, build the config, run one peer role, map errors to exit codes."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from peers import exit_codes
from peers.lifecycle import setup_logging
from swarm import __version__
from swarm.config_loading import dump_config, load_config
from swarm.errors import SwarmError

logger = logging.getLogger("swarm.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="swarm",
        description="Train one shared model together over the internet, peer to peer.",
        epilog="Exit codes: 0 ok or left cleanly, 1 internal error, 2 usage/config/multiaddr, "
        "3 no initial peer answered, 4 data, 5 checkpoint, 6 monitor history or dashboard port, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"swarm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument("--config", type=Path, help="YAML run config (default: built-in defaults, or $SWARM_CONFIG)")
        sub.add_argument(
            "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
            help="override one config key, e.g. --set training.batch_size=8 (repeatable)",
        )
        return sub

    def with_peers(sub: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sub.add_argument(
            "--initial-peers", nargs="+", default=None, metavar="MADDR",
            help="full multiaddr(s) of peers already in the swarm; one reachable is enough",
        )
        return sub

    bootstrap = with_peers(with_config(commands.add_parser("bootstrap", help="run a DHT-only peer that keeps the swarm reachable")))
    bootstrap.add_argument("--identity", type=Path, help="private key file (default: network.identity_path or ~/.swarm/bootstrap.key)")
    bootstrap.add_argument("--address-file", type=Path, help="also write the peer id and multiaddrs here as JSON")

    join = with_peers(with_config(commands.add_parser("join", help="join a swarm as a trainer peer")))
    join.add_argument("--resume", action="store_true", help="restore model, optimizer and epoch from checkpoint.dir")
    join.add_argument("--status-file", type=Path, help="keep a JSON status of this peer here (for scripts)")

    demo = with_config(commands.add_parser("demo", help="a local swarm: 1 bootstrap + 3 trainers + a monitor on 127.0.0.1"))
    demo.add_argument("--peers", type=int, default=3, help="number of trainer processes (default 3)")
    demo.add_argument("--epochs", type=int, default=None, help="swarm epochs to train (default: the demo's own)")
    demo.add_argument("--workdir", type=Path, help="keep logs and checkpoints here (default: a temporary folder)")

    monitor = with_peers(with_config(commands.add_parser(
        "monitor", help="watch a swarm: history in SQLite, a web dashboard, a JSON API and Prometheus /metrics")))
    monitor.add_argument("--url-file", type=Path, help="also write the dashboard's address here as JSON (for scripts)")
    monitor.add_argument("--export-csv", type=Path, metavar="DIR",
                         help="write the history in monitor.db_path as CSV files into DIR and exit (no network)")

    status = with_peers(with_config(commands.add_parser("status", help="print the swarm's peers as a table, from the DHT")))
    status.add_argument("--json", action="store_true", help="print JSON instead of a table")
    status.add_argument("--wait", type=float, default=10.0, metavar="SECONDS",
                        help="wait this long for the first metrics record (default 10)")

    config = commands.add_parser("config", help="inspect configs")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    with_peers(with_config(config_commands.add_parser("show", help="print the resolved config (YAML + env + --set)")))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    role = {"join": "trainer"}.get(args.command, args.command)
    setup_logging(role)
    code = _run(args)
    if args.command in ("join", "bootstrap", "monitor", "status"):
        # Everything was shut down explicitly. Skip interpreter finalization: hivemind's __del__ hooks
        # would try to shut the same averagers down again and can abort the process on the way out.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run(args: argparse.Namespace) -> int:
    try:
        return _dispatch(args)
    except SwarmError as e:
        print(f"swarm {args.command}: error: {e}", file=sys.stderr, flush=True)
        return exit_codes.for_error(e)
    except KeyboardInterrupt:
        print(f"swarm {args.command}: interrupted", file=sys.stderr, flush=True)
        return exit_codes.INTERRUPTED
    except Exception:
        logger.exception("unexpected failure")
        return exit_codes.INTERNAL


def _dispatch(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    if getattr(args, "initial_peers", None):
        overrides.append("network.initial_peers=" + ",".join(args.initial_peers))
    if getattr(args, "resume", False):
        overrides.append("checkpoint.resume=true")

    if args.command == "demo":
        from peers.demo import run_demo

        return run_demo(config_path=args.config, overrides=args.overrides, num_peers=args.peers,
                        epochs=args.epochs, workdir=args.workdir)

    config = load_config(args.config, overrides)
    if args.command == "config":
        print(dump_config(config), end="")
    elif args.command == "bootstrap":
        from peers.bootstrap import run_bootstrap

        run_bootstrap(config, identity_path=args.identity, address_file=args.address_file)
    elif args.command == "join":
        from peers.trainer import run_trainer

        run_trainer(config, status_file=args.status_file)
    elif args.command == "monitor":
        from peers.monitor import export_csv, run_monitor

        if args.export_csv is not None:
            export_csv(config, args.export_csv)
        else:
            run_monitor(config, url_file=args.url_file)
    elif args.command == "status":
        from peers.status import run_status

        run_status(config, as_json=args.json, wait=args.wait)
    return exit_codes.OK
