"""`models explain` prints every output of every candidate with the host's fidelity numbers."""

from __future__ import annotations

from controller.cli.explain import output_lines


def test_every_output_gets_a_line_and_flat_ones_say_so() -> None:
    host = {
        "outputs": [
            {"index": 0, "name": "scores", "shape": [64, 1], "kind": "tensor", "snr_db": 41.25,
             "cosine": 0.99991, "max_abs_error": 0.0123, "top1_agreement": None, "flat": False},
            {"index": 1, "name": "probs", "shape": [1000], "kind": "class", "snr_db": 0.0,
             "cosine": 1.0, "max_abs_error": 0.0016, "top1_agreement": 0.0, "flat": True},
        ]
    }  # fmt: skip
    lines = output_lines([{"profile": "rpi4", "rank": 1, "recipe": "int8", "host": host}])
    assert len(lines) == 2
    assert lines[0].startswith("  rpi4 #1 int8: output 0 'scores' [64x1] tensor: SNR 41.2")
    assert "cosine 0.999910" in lines[0] and "top-1" not in lines[0]
    assert "top-1 0.0 %" in lines[1] and "flat fp32 reference: not judged" in lines[1]
    assert output_lines([{"profile": "x", "rank": 1, "recipe": "fp32", "host": {}}]) == []
