"""`edgefleet optimize`: per-profile artifacts from one model, and `--check` of a .tflite."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer

import firmware_profiles
from controller.cli.progress import ProgressDisplay
from controller.cli.quiet import native_stderr_filtered
from controller.cli.render import as_json, ms, num, table


def _profiles(selector: str) -> list[firmware_profiles.Profile]:
    """`all` or a comma-separated list of profile ids; unknown ids exit 2 naming them."""
    try:
        if selector == "all":
            return list(firmware_profiles.load_all().values())
        return [firmware_profiles.load(p.strip()) for p in selector.split(",") if p.strip()]
    except firmware_profiles.ProfileError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


# converters.prune.DEFAULT_SPARSITY / DEFAULT_EPOCHS, repeated so that the CLI starts without
# numpy (a test keeps them equal).
PRUNE_SPARSITY = 0.5
PRUNE_EPOCHS = 4


class _Progress:
    """Progress on stderr: a bar of profiles done (N/12) with elapsed time on a terminal, else
    one line per step: `[ 3/12 rpi4        12.3s] convert int8 …`."""

    def __init__(self, profiles: list[str], display: ProgressDisplay) -> None:
        """Count profiles in the order they were asked for; the clock starts now."""
        self.profiles = profiles
        self.display = display
        self.start = time.monotonic()
        self.width = max((len(p) for p in profiles), default=0)
        self.done: set[str] = set()

    def __call__(self, event: Any) -> None:
        """One step of the pipeline: the bar moves (or a line with N/M and the elapsed time)."""
        n = self.profiles.index(event.profile) + 1 if event.profile in self.profiles else 0
        total = len(self.profiles)
        recipe = f" {event.recipe}" if event.recipe else ""
        elapsed = time.monotonic() - self.start
        if event.stage == "done":
            self.done.add(event.profile)
        line = (
            f"  [{n:>{len(str(total))}}/{total} {event.profile:{self.width}} {elapsed:6.1f}s] "
            f"{event.stage:10}{recipe} {event.message}".rstrip()
        )
        if self.display.terminal and event.stage in ("done", "warning"):
            self.display.note(line)  # the outcome of each profile stays in the scrollback
        self.display.update(
            "profiles",
            description=f"{event.profile} {event.stage}{recipe}",
            completed=len(self.done),
            total=total,
            unit="profiles",
            line=line,
        )
        self.display.refresh()  # the next step may hold the GIL for seconds (a conversion)


def _fidelity_cell(ev: Any) -> str:
    """Accuracy with labels, else top-1 agreement of a class output, plus the worst SNR."""
    if ev is None:
        return "-"
    parts = []
    if ev.accuracy is not None:
        parts.append(num(100 * ev.accuracy, 1))
    elif ev.top1_agreement is not None:
        parts.append(f"agree {num(100 * ev.top1_agreement, 1)}")
    if ev.snr_db is not None and any(o.kind == "tensor" for o in ev.outputs):
        parts.append(f"snr {ev.snr_db:.1f}")
    return " ".join(parts) or "flat"


def _variant_rows(report: Any) -> list[tuple[object, ...]]:
    """One table row per variant of every profile."""
    rows: list[tuple[object, ...]] = []
    for prof in report.profiles:
        if not prof.variants:
            rows.append((prof.profile, "-", prof.status, "-", "-", "-", "-", "-", prof.error or ""))
        for v in prof.variants:
            ev = v.evaluation
            accuracy = _fidelity_cell(ev)
            size = f"{ev.size_bytes / 1024:.1f}" if ev else "-"
            gz = f"{ev.compressed_bytes / 1024:.1f}" if ev and ev.compressed_bytes else "-"
            sparse = (
                num(100 * ev.weight_sparsity, 1) if ev and ev.weight_sparsity is not None else "-"
            )
            latency = f"{ms(v.latency_ms)} ({v.latency_source})" if v.latency_ms else "-"
            rows.append(
                (
                    prof.profile,
                    v.variant or v.recipe,
                    v.status,
                    size,
                    gz,
                    sparse,
                    accuracy,
                    latency,
                    v.reason,
                )
            )
    return rows


def optimize(
    model: Annotated[Path, typer.Argument(help=".keras/.h5, SavedModel dir, .tflite or .onnx")],
    profile: Annotated[str, typer.Option("--profile", "-p", help="profile id(s), or 'all'")],
    calib: Annotated[Path | None, typer.Option(help="calibration data (.npz/.npy/dir)")] = None,
    val: Annotated[
        Path | None, typer.Option(help="validation data (with labels for top-1)")
    ] = None,
    max_accuracy_drop: Annotated[
        float,
        typer.Option(
            help="accuracy budget in percentage points vs fp32 (top-1 disagreement without "
            "labels), for class-shaped outputs"
        ),
    ] = 1.0,
    min_snr_db: Annotated[
        float,
        typer.Option(
            help="lowest SNR in dB (peak, as AI Hub's PSNR) allowed for every other output"
        ),
    ] = 20.0,  # = converters.fidelity.DEFAULT_MIN_SNR_DB, not imported to keep CLI start light
    out: Annotated[Path, typer.Option(help="output directory")] = Path("artifacts"),
    train: Annotated[
        Path | None,
        typer.Option(
            help="training data (.npz/dir with x and y): also try TF-MOT magnitude-pruned "
            "variants (needs the prune extra)"
        ),
    ] = None,
    prune_sparsity: Annotated[
        float, typer.Option(help="target share of zero weights for --train pruning")
    ] = PRUNE_SPARSITY,
    prune_epochs: Annotated[
        int, typer.Option(help="fine-tuning epochs while pruning (--train)")
    ] = PRUNE_EPOCHS,
    candidates: Annotated[
        int,
        typer.Option(
            help="rank the top K (variant, threads) candidates per profile into "
            "<out>/<profile>/candidates.json (for rollout --candidates)"
        ),
    ] = 1,
    check: Annotated[
        bool, typer.Option("--check", help="only run the checks on a .tflite")
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Build and select the best artifact per device profile, or --check a .tflite against them."""
    from converters.errors import ConverterError

    profiles = _profiles(profile)
    if not model.exists():
        typer.echo(f"error: {model}: no such file or directory", err=True)
        raise typer.Exit(2)
    if check:
        _check(model, profiles, json_out)
        return
    from converters.pipeline import optimize as run_optimize

    typer.echo(f"optimizing {model} for {len(profiles)} profile(s)", err=True)
    try:
        # The bar lives inside the capture: it draws on the terminal the capture restores.
        with native_stderr_filtered(), ProgressDisplay() as display:
            report = run_optimize(
                model,
                profiles,
                calib=calib,
                val=val,
                max_accuracy_drop=max_accuracy_drop,
                out_dir=out,
                progress=_Progress([p.id for p in profiles], display),
                train=train,
                prune_sparsity=prune_sparsity,
                prune_epochs=prune_epochs,
                candidates=candidates,
                min_snr_db=min_snr_db,
            )
    except (ConverterError, ValueError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if json_out:
        typer.echo(as_json(report.to_dict()))
    else:
        typer.echo(
            table(
                _variant_rows(report),
                [
                    "PROFILE",
                    "VARIANT",
                    "STATUS",
                    "KIB",
                    "GZIP KIB",
                    "ZEROS %",
                    "ACC % / SNR DB",
                    "LATENCY",
                    "WHY",
                ],
            )
        )
        for line in _candidate_lines(report):
            typer.echo(line)
        for note in report.notes:
            typer.echo(f"note: {note}")
        if report.pruning:
            typer.echo(_pruning_line(report.pruning))
    for warning in report.warnings:  # e.g. a compiler that is not installed
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(report.summary(), err=json_out)  # the closing line: which profiles lack what
    raise typer.Exit(0 if report.ok else 1)


def _candidate_lines(report: Any) -> list[str]:
    """One line per ranked candidate of every profile: rank, variant, threads, latency, manifest."""
    lines = []
    for prof in report.profiles:
        for c in prof.candidates:
            threads = "- (compiled)" if c.threads is None else str(c.threads)
            v = c.variant
            latency = f"{ms(v.latency_ms)} ({v.latency_source})" if v.latency_ms else "-"
            lines.append(
                f"candidate {prof.profile} #{c.rank}: {v.variant or v.recipe} "
                f"threads={threads} {latency} {c.manifest}"
            )
    return lines


def _pruning_line(pruning: dict[str, Any]) -> str:
    """One line summing up the --train pruning run: target, reached, time."""
    layers = ", ".join(f"{k} {100 * v:.0f}%" for k, v in pruning["layer_sparsity"].items())
    return (
        f"pruning: target {100 * pruning['target_sparsity']:.0f}%, pruned kernels "
        f"{100 * pruning['kernel_sparsity']:.1f}% zero ({layers}); {pruning['epochs']} epochs, "
        f"train accuracy {100 * pruning['train_accuracy']:.1f}%, {pruning['seconds']:.0f} s"
    )


def _check(model: Path, profiles: list[firmware_profiles.Profile], json_out: bool) -> None:
    """Run every compatibility check of a .tflite against each profile and print them."""
    from converters.checks import check_tflite

    if model.suffix != ".tflite":
        typer.echo(f"error: --check needs a .tflite file, got {model}", err=True)
        raise typer.Exit(2)
    from converters.errors import ConverterError

    results: dict[str, list[Any]] = {}
    try:
        with (
            native_stderr_filtered(),
            tempfile.TemporaryDirectory(prefix="edgefleet-check-") as work,
        ):
            for prof in profiles:
                results[prof.id] = check_tflite(model, prof, work_dir=Path(work) / prof.id)
    except ConverterError as exc:  # not a model at all: one line, like `optimize` itself
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    failed = any(not r.ok and r.blocking for rs in results.values() for r in rs)
    if json_out:
        typer.echo(as_json({p: [r.to_dict() for r in rs] for p, rs in results.items()}))
    else:
        typer.echo(
            table(
                [
                    (p, r.name, "ok" if r.ok else ("FAIL" if r.blocking else "warn"), r.detail)
                    for p, rs in results.items()
                    for r in rs
                ],
                ["PROFILE", "CHECK", "RESULT", "DETAIL"],
            )
        )
    raise typer.Exit(1 if failed else 0)
