"""Refuse a model whose custom ops a target's TF Lite runtime lacks, before any device gets it.

`models add --profile` checks the profile's runtime; `deploy` checks each target device's own
runtime (as it reported in `hello`), else its profile's. The evidence is converters/checks.py's
custom_ops_registered: a load on that runtime version when one is reachable, else the op table
generated from the runtimes' resolvers.
"""

from __future__ import annotations

import logging
from pathlib import Path

from controller.errors import FleetError

log = logging.getLogger(__name__)


def refuse_missing_custom_ops(model_path: Path, targets: dict[str, tuple[str, str, str]]) -> None:
    """Raise FleetError naming the op and runtime for the first target that lacks a custom op.

    `targets` maps a label ('profile rpi4', 'device cam-1') to (runtime, version, compiler kind).
    Without the converters' TF Lite schema (a controller with no ai-edge-litert) nothing is
    checked and a warning is logged: the device's self-test still refuses the model.
    """
    if not _is_tflite(model_path):
        return  # add_artifact refuses it with the precise reason
    try:
        from converters.checks import custom_op_problem
        from converters.errors import ConverterError, InspectError
        from converters.tflite_inspect import schema

        schema()  # the flatbuffer schema comes with ai-edge-litert or tensorflow
    except (ImportError, InspectError) as exc:  # a controller without either: cannot read ops
        log.warning("custom ops not checked (%s): the device self-test will catch them", exc)
        return
    seen: dict[tuple[str, str, str], str | None] = {}
    for label, runtime in sorted(targets.items()):
        if runtime not in seen:
            try:
                seen[runtime] = custom_op_problem(model_path, *runtime)
            except (ConverterError, ValueError) as exc:
                # A file the parser cannot read is the device self-test's to refuse, with the
                # runtime's own message; this check only refuses ops it has identified.
                log.warning("custom ops of %s not checked: %s", model_path, exc)
                return
        problem = seen[runtime]
        if problem:
            raise FleetError(f"{model_path.name} cannot run on {label}: {problem}")


def _is_tflite(path: Path) -> bool:
    """Whether `path` is a readable file with the TFLite identifier at offset 4."""
    try:
        with Path(path).open("rb") as fh:
            return fh.read(8)[4:8] == b"TFL3"
    except OSError:
        return False
