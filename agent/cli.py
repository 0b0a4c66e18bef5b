"""`edgefleet-agent`: run the on-device daemon, or benchmark a model standalone.

argparse, not typer: typer 0.29 imports pydantic when an app runs, which costs a device
several MB of RSS for two subcommands (docs/agent.md). The controller CLI uses typer.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from agent import __version__
from agent.protocol.config import ConfigError, load_config


def _positive(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The agent's command line."""
    parser = argparse.ArgumentParser(
        prog="edgefleet-agent",
        description="edgefleet on-device agent: follows desired state over MQTT, measures models.",
    )
    parser.add_argument("--version", action="version", version=f"edgefleet-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the agent daemon until SIGTERM/SIGINT")
    run.add_argument(
        "--config",
        "-c",
        type=Path,
        default=Path(os.environ.get("EDGEFLEET_AGENT_CONFIG", "agent.toml")),
        help="agent.toml (env EDGEFLEET_AGENT_CONFIG; default ./agent.toml)",
    )
    run.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING")

    service = sub.add_parser(
        "install-service",
        help="install the systemd unit and this bundle's config (/etc/edgefleet-agent), enable it",
    )
    service.add_argument("--config", "-c", type=Path, required=True, help="the bundle's agent.toml")
    service.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        help="install into this tree instead of / (files only)",
    )
    service.add_argument("--dry-run", action="store_true", help="print what would be done")
    service.add_argument("--user", default="edgefleet-agent", help="the service's system user")

    bench = sub.add_parser(
        "benchmark", help="measure a model like benchmark_model: init, percentiles, memory, power"
    )
    bench.add_argument("model", type=Path, help="a .tflite file")
    bench.add_argument("--runs", type=_positive, default=50, help="timed invocations")
    bench.add_argument("--warmup", type=_non_negative, default=5, help="untimed invocations first")
    bench.add_argument("--threads", type=_positive, default=None, help="interpreter threads")
    bench.add_argument("--json", dest="as_json", action="store_true", help="print JSON")
    return parser


def run(config: Path, log_level: str) -> int:
    """Run the agent daemon until SIGTERM/SIGINT."""
    from agent.daemon import Agent
    from agent.failpoint import FailpointError

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        agent = Agent(cfg)
    except FailpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    agent.run()
    return 0


def benchmark(model: Path, runs: int, warmup: int, threads: int | None, as_json: bool) -> int:
    """Benchmark one model file and print the result."""
    from agent.benchmark import benchmark_model, format_result
    from agent.runtime import ModelLoadError

    if not model.is_file():
        print(f"error: {model}: no such file", file=sys.stderr)
        return 2
    try:
        result = benchmark_model(model, runs=runs, warmup=warmup, threads=threads)
    except ModelLoadError as exc:
        print(f"error: model does not load: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.to_dict(), indent=2) if as_json else format_result(result))
    return 0


def install_service(config: Path, root: Path, dry_run: bool, user: str) -> int:
    """Install the systemd unit and the bundle's config; exit 2 with a one-line error."""
    from agent.protocol.config import ConfigError
    from agent.service import InstallError
    from agent.service import install_service as install

    try:
        install(config, root=root, dry_run=dry_run, user=user)
    except (ConfigError, InstallError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "run":
        return run(args.config, args.log_level)
    if args.command == "install-service":
        return install_service(args.config, args.root, args.dry_run, args.user)
    return benchmark(args.model, args.runs, args.warmup, args.threads, args.as_json)


def console_main() -> None:
    """Console-script wrapper: exit with main()'s code."""
    sys.exit(main())


if __name__ == "__main__":
    console_main()
