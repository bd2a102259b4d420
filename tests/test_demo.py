"""README's first command: the embedded demo, end to end, what it claims, and `status` after it.

The demo runs with half its default cells per class (30): the same stages and settings on fewer cells, so
that the suite stays within CI's time on two cores. README's figures and its 10-minute budget are measured
on the default size by benchmarks/demo.py (docs/demo.md)."""

import json
import os

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow(minutes=10)

CHANCE = 1 / 6  # six synthetic classes
# README's main command runs as a user's would, on every core, even where parallel test workers give the
# other tests one thread each (conftest): with one thread the demo alone outlasts the rest of the suite.
EVERY_CORE = {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}
PER_CLASS = ("--per-class", "30")


def test_demo_features_beat_chance_and_the_pixel_and_colour_baselines_across_labs(tmp_path):
    result = run_cli("demo", *PER_CLASS, cwd=tmp_path, timeout=2400, env=EVERY_CORE)  # a safety limit for loaded machines, not a speed test
    assert result.returncode == 0, result.stderr
    assert "cross-domain white-cell classification" in result.stdout
    for source, target in (("lab_a", "lab_b"), ("lab_b", "lab_a")):
        report = json.loads((tmp_path / "aecfe-demo" / "evaluate" / source / "report.json").read_text())
        aecfe = report["targets"][target]["balanced_accuracy"]
        baselines = {kind: b["targets"][target]["balanced_accuracy"] for kind, b in report["baselines"].items()}
        assert aecfe > 3 * CHANCE, (source, target, aecfe)
        # README: above raw pixels and plain colour histograms across labs. The stain-normalised histogram is
        # not in the claim: it undoes the colour change that mostly separates these labs and is on par.
        assert aecfe > max(baselines["raw_pixels"], baselines["color_histogram"]) + 0.1, (source, target, aecfe, baselines)
    # status right after demo: judged by the demo's own settings, every stage is up to date; it writes nothing.
    saved = (tmp_path / "aecfe-demo" / "config.yaml").read_bytes()
    status = run_cli("--workdir", "aecfe-demo", "status", "--json", cwd=tmp_path)
    assert status.returncode == 0, status.stderr
    rows = json.loads(status.stdout)
    assert {r["stage"] for r in rows} == {"detector", "detect", "train", "extract", "evaluate"}
    assert {r["state"] for r in rows} == {"done"}, rows
    assert (tmp_path / "aecfe-demo" / "config.yaml").read_bytes() == saved
    # A working command in the demo's workdir, with no config of its own, goes on with the demo's settings.
    follow_up = run_cli("--workdir", "aecfe-demo", "evaluate", "--source", "lab_a", "--target", "lab_b", cwd=tmp_path)
    assert follow_up.returncode == 0, follow_up.stderr
    assert "evaluate lab_a: up to date, reusing" in follow_up.stderr and "training" not in follow_up.stderr
    again = run_cli("demo", *PER_CLASS, cwd=tmp_path, env=EVERY_CORE)
    assert again.returncode == 0
    assert "training" not in again.stderr and "train (lab_a, lab_b): up to date, reusing" in again.stderr
