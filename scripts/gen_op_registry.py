"""Generate converters/data/op_registry.json from the TF Lite runtimes' own op resolvers.

For every BuiltinOperator code and version 1, 2, ... this builds a one-operator .tflite and asks
the runtime to build an interpreter for it: the runtime's BuiltinOpResolver either finds a kernel
("Didn't find op for builtin opcode ..." when not) or goes on to parse and prepare the node,
which may fail for other reasons that do not matter here. Custom ops are probed the same way
("Encountered unresolved custom op" when the resolver lacks them) for every candidate name found
as a string in the runtime's shared libraries plus the custom ops TF Lite and MediaPipe models
are known to use. So the table is what each runtime resolves, read from the runtime itself.

    .venv/bin/python scripts/gen_op_registry.py            # probes litert here, tflite-runtime
                                                           # in .venv-slim, writes the table
    python scripts/gen_op_registry.py probe MODELS_DIR     # (internal) probe with this runtime

Needs ai-edge-litert (for the schema) in the running interpreter; the slim venv only runs the
`probe` step with PYTHONPATH pointing at the repo.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from converters.op_probe import probe_model  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "converters" / "data" / "op_registry.json"
SLIM_PYTHON = REPO / ".venv-slim" / "bin" / "python"
# Op versions are registered as contiguous ranges from 1; none is above 20 today (FC is at 13).
MAX_VERSION = 20
# Custom ops seen in deployed TF Lite models (MediaPipe, TF Lite support, detection heads);
# probed in addition to the names scraped from the runtimes' libraries.
KNOWN_CUSTOM = (
    "Convolution2DTransposeBias",
    "MaxPoolingWithArgmax2D",
    "MaxUnpooling2D",
    "TFLite_Detection_PostProcess",
    "AudioSpectrogram",
    "Mfcc",
    "Landmarks2TransformMatrix",
    "TransformLandmarks",
    "TransformTensorBilinear",
    "TransformTensor",
    "FlexConv2D",
    "ethos-u",
    "edgetpu-custom-op",
)
# What a runtime says for a builtin op code or version its resolver lacks.
_UNRESOLVED_BUILTIN = ("Didn't find op for builtin opcode", "builtin_code out of range")
# What a runtime says for a custom op its resolver lacks (Flex ops need the Flex delegate).
_UNRESOLVED_CUSTOM = ("unresolved custom op", "Select TensorFlow op(s)")
# CamelCase identifiers of 6-40 characters: custom op names are registered as such literals.
_CANDIDATE_RE = re.compile(rb"[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9_]*")


def _resolves(interpreter_class: type, data: bytes, *, custom: bool) -> bool:
    """Whether the runtime's resolver knows the op of a probe model.

    A builtin op is resolved while the interpreter is built: it counts unless the build fails
    with "Didn't find op for builtin opcode" (unknown version) or "builtin_code out of range"
    (an op code newer than the runtime's schema). An unresolved custom op only fails in
    allocate_tensors (its placeholder kernel's Prepare), so custom probes are allocated, and any
    failure other than the unresolved/Flex messages is past resolution.
    """
    try:
        interp = interpreter_class(model_content=data)
    except Exception as exc:  # the runtimes raise ValueError/RuntimeError while building
        # Other build errors (LSTM/StableHLO without their options) come after resolution.
        return not any(marker in str(exc) for marker in _UNRESOLVED_BUILTIN)
    if not custom:
        return True
    try:
        interp.allocate_tensors()
    except Exception as exc:  # Prepare of a resolved kernel may refuse the probe's tensors
        text = str(exc)
        return not any(marker in text for marker in _UNRESOLVED_CUSTOM)
    return True


def probe(models_dir: Path, skip: set[str]) -> None:
    """Probe each model of `models_dir` on this process's runtime, one JSON line per result.

    A line {"try": key} precedes each attempt so that the parent can tell which probe crashed
    the process (some kernels segfault on the probe's bogus tensors) and restart after it.
    """
    sys.path.insert(0, str(REPO))
    from agent.runtime import runtime_info

    info = runtime_info()
    interpreter_class = __import__(info.module, fromlist=["Interpreter"]).Interpreter
    print(json.dumps({"runtime": info.name, "version": info.version}), flush=True)
    index = json.loads((models_dir / "index.json").read_text())
    for name, versions in index["builtin"].items():
        for version, file in versions:
            key = f"builtin:{name}:{version}"
            if key in skip:
                continue
            print(json.dumps({"try": key}), flush=True)
            ok = _resolves(interpreter_class, (models_dir / file).read_bytes(), custom=False)
            print(json.dumps({"key": key, "ok": ok}), flush=True)
            if not ok:
                break
    for name, file in index["custom"].items():
        key = f"custom:{name}"
        if key in skip:
            continue
        print(json.dumps({"try": key}), flush=True)
        ok = _resolves(interpreter_class, (models_dir / file).read_bytes(), custom=True)
        print(json.dumps({"key": key, "ok": ok}), flush=True)


def probe_runtime(python: Path, forced: str, models_dir: Path) -> dict[str, object]:
    """Run `probe` in a child with `python`, restarting after crashes; the runtime's table.

    A probe that crashes the runtime got past op resolution, so it counts as resolved.
    """
    env = {"PYTHONPATH": str(REPO), "EDGEFLEET_TFLITE_RUNTIME": forced, "PATH": "/usr/bin"}
    results: dict[str, bool] = {}
    runtime: dict[str, str] = {}
    while True:
        skip = models_dir / "skip.json"
        skip.write_text(json.dumps(sorted(results)))
        proc = subprocess.run(
            [str(python), __file__, "probe", str(models_dir)], env=env, capture_output=True,
            text=True, check=False,
        )  # fmt: skip
        tried = None
        for line in proc.stdout.splitlines():
            item = json.loads(line)
            if "runtime" in item:
                runtime = item
            elif "try" in item:
                tried = item["try"]
            else:
                results[item["key"]] = item["ok"]
                tried = None
        if proc.returncode == 0:
            break
        if tried is None:
            raise RuntimeError(f"probe failed outside a probe: {proc.stderr[-500:]}")
        results[tried] = True
    builtin: dict[str, int] = {}
    for key, ok in results.items():
        kind, name, *rest = key.split(":", 2)
        if kind == "builtin" and ok:
            builtin[name] = max(builtin.get(name, 0), int(rest[0]))
    custom = sorted(
        k.split(":", 1)[1] for k, ok in results.items() if k.startswith("custom:") and ok
    )
    return {**runtime, "builtin": dict(sorted(builtin.items())), "custom": custom}


def _library_strings(package_dir: Path) -> set[str]:
    """CamelCase strings in the runtime's shared libraries: candidate custom op names."""
    found: set[str] = set()
    for lib in package_dir.rglob("*.so"):
        if "vendors" in lib.parts:
            continue
        for match in _CANDIDATE_RE.findall(lib.read_bytes()):
            if 6 <= len(match) <= 40:
                found.add(match.decode())
    return found


def make_models(out: Path, custom_candidates: set[str]) -> None:
    """Write every probe model and an index.json naming them."""
    from ai_edge_litert import schema_py_generated as s

    ops = {k: v for k, v in vars(s.BuiltinOperator).items() if not k.startswith("_")}
    index: dict[str, dict] = {"builtin": {}, "custom": {}}
    for name, code in sorted(ops.items()):
        if name in ("CUSTOM", "PLACEHOLDER_FOR_GREATER_OP_CODES", "DELEGATE"):
            continue
        files = []
        for version in range(1, MAX_VERSION + 1):
            file = f"b{code}_v{version}.tflite"
            (out / file).write_bytes(probe_model(code, version))
            files.append((version, file))
        index["builtin"][name] = files
    for i, name in enumerate(sorted(custom_candidates)):
        file = f"c{i}.tflite"
        (out / file).write_bytes(probe_model(None, 1, custom=name))
        index["custom"][name] = file
    (out / "index.json").write_text(json.dumps(index))


def _site_package(python: Path, module: str) -> Path:
    """The installed package directory of `module` for an interpreter."""
    code = f"import {module}, os; print(os.path.dirname({module}.__file__))"
    return Path(subprocess.check_output([str(python), "-c", code], text=True).strip())


def main() -> int:
    """Probe every available runtime and write the table (or run one `probe` step)."""
    if len(sys.argv) == 3 and sys.argv[1] == "probe":
        models = Path(sys.argv[2])
        skip = models / "skip.json"
        probe(models, set(json.loads(skip.read_text())) if skip.exists() else set())
        return 0
    slim = Path(sys.argv[1]) if len(sys.argv) > 1 else SLIM_PYTHON
    if not slim.exists():
        slim = Path("/work/main/.venv-slim/bin/python")
    runtimes = [(Path(sys.executable), "ai_edge_litert", "litert")]
    if slim.exists():
        runtimes.append((slim, "tflite_runtime", "tflite-runtime"))
    candidates = set(KNOWN_CUSTOM)
    for python, module, _ in runtimes:
        candidates |= _library_strings(_site_package(python, module))
    results = []
    with tempfile.TemporaryDirectory(prefix="op-registry-") as tmp:
        make_models(Path(tmp), candidates)
        for python, _, forced in runtimes:
            results.append(probe_runtime(python, forced, Path(tmp)))
    doc = {
        "schema": "edgefleet.op-registry/v1",
        "source": (
            "generated by scripts/gen_op_registry.py: one-operator models built from the TF Lite "
            "schema, loaded by each runtime's own BuiltinOpResolver (builtin op code and version, "
            f"custom op names from {len(candidates)} candidates scraped from the runtimes' "
            "libraries plus known MediaPipe/TF Lite custom ops)"
        ),
        "runtimes": results,
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n")
    for r in results:
        print(
            f"{r['runtime']} {r['version']}: {len(r['builtin'])} builtin ops, custom {r['custom']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
