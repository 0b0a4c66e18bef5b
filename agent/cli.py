"""`edgefleet-agent`: run the on-device daemon, or benchmark a model standalone."""

from __future__ import annotations

import json
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated

import typer

from agent.config import ConfigError, load_config

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="edgefleet on-device agent: follows desired state over MQTT and measures models.",
)


@app.command()
def run(
    config: Annotated[
        Path, typer.Option("--config", "-c", envvar="EDGEFLEET_AGENT_CONFIG", help="agent.toml")
    ] = Path("agent.toml"),
    log_level: Annotated[str, typer.Option(help="DEBUG, INFO, WARNING")] = "INFO",
) -> None:
    """Run the agent daemon until SIGTERM/SIGINT."""
    from agent.daemon import Agent

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_config(config)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    agent = Agent(cfg)
    signal.signal(signal.SIGTERM, lambda *_: agent.stop())
    signal.signal(signal.SIGINT, lambda *_: agent.stop())
    agent.run()


@app.command()
def benchmark(
    model: Annotated[Path, typer.Argument(help="a .tflite file")],
    runs: Annotated[int, typer.Option(min=1, help="timed invocations")] = 50,
    warmup: Annotated[int, typer.Option(min=0, help="untimed invocations first")] = 5,
    threads: Annotated[int | None, typer.Option(min=1, help="interpreter threads")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Measure a model like benchmark_model: init, first run, percentiles, memory, power."""
    from agent.benchmark import benchmark_model, format_result
    from agent.runtime import ModelLoadError

    if not model.is_file():
        typer.echo(f"error: {model}: no such file", err=True)
        raise typer.Exit(2)
    try:
        result = benchmark_model(model, runs=runs, warmup=warmup, threads=threads)
    except ModelLoadError as exc:
        typer.echo(f"error: model does not load: {exc}", err=True)
        raise typer.Exit(1) from None
    if as_json:
        typer.echo(json.dumps(result.to_dict(), indent=2))
    else:
        typer.echo(format_result(result))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    sys.exit(main())
