"""benchmarks/run.py's arithmetic: theoretical peak, fractions of it (run_report), where a report may be written."""

import subprocess
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import machine  # noqa: E402
import run  # noqa: E402
import run_report  # noqa: E402


def _machine(**overrides):
    return {"flags": ["avx", "avx2", "fma"], "torch_threads": 2, "usable_cpus": 2, "threads_per_core": 1, "mhz": 1996,
            **overrides}


def test_theoretical_peak_is_cores_clock_fma_units_lanes_and_two():
    assert machine.theoretical_peak(_machine())["gflops"] == pytest.approx(2 * 1.996 * 2 * 8 * 2)
    assert machine.theoretical_peak(_machine(flags=["avx", "avx2", "avx512f"]))["gflops"] == pytest.approx(2 * 1.996 * 2 * 16 * 2)
    assert machine.theoretical_peak(_machine(max_mhz=3500))["clock_ghz"] == 3.5  # the maximum clock, when known
    assert machine.theoretical_peak(_machine(), clock_ghz=3.0)["clock_ghz"] == 3.0
    # SMT siblings share one core's FMA units; fewer torch threads use fewer cores.
    assert machine.theoretical_peak(_machine(usable_cpus=4, torch_threads=4, threads_per_core=2))["cores"] == 2
    assert machine.theoretical_peak(_machine(usable_cpus=8, torch_threads=2))["cores"] == 2
    assert machine.theoretical_peak(_machine(mhz=None))["gflops"] is None


def _results(detect_rate):
    return {"machine": {"theoretical": {"gflops": 100.0}},
            "peak": {"ok": True, "gflops_best": 70.0}, "peak_end": {"ok": True, "gflops_best": 80.0},
            "detect": {"ok": True, "default": {"rate": detect_rate, "flops": 20e9}, "paper": {"rate": 0.1, "flops": 300e9}}}


def test_fraction_of_peak_divides_executed_flops_by_the_theoretical_peak():
    d = run_report.derived(_results(detect_rate=2.0))
    assert d["stages"]["detect"]["default_fraction"] == pytest.approx(0.4)  # 20 GFLOP x 2 /s of 100 GFLOP/s
    assert d["stages"]["detect"]["paper_fraction"] == pytest.approx(0.3)
    assert d["kernel_gflops"] == 80.0 and d["kernel_fraction"] == pytest.approx(0.8)
    assert d["above_peak"] == []


def test_a_figure_above_the_theoretical_peak_is_flagged_not_hidden():
    assert run_report.derived(_results(detect_rate=6.0))["above_peak"] == ["detect (default)"]
    assert "above the bound" in run_report.fmt_fraction(1.2)


def test_only_a_full_run_writes_the_committed_reference(tmp_path):
    assert run.report_path(quick=False, partial=False, out=None) == run.DEFAULT_OUT
    assert run.report_path(quick=True, partial=False, out=None) is None  # printed instead
    assert run.report_path(quick=False, partial=True, out=None) is None
    assert run.report_path(quick=True, partial=False, out=tmp_path / "quick.md") == tmp_path / "quick.md"
    with pytest.raises(ValueError, match="reference of full runs"):
        run.report_path(quick=True, partial=False, out=run.DEFAULT_OUT)


def test_a_quick_run_aimed_at_the_reference_stops_before_measuring():
    before = run.DEFAULT_OUT.read_bytes()
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--out", str(run.DEFAULT_OUT)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "reference of full runs" in result.stderr
    assert run.DEFAULT_OUT.read_bytes() == before


def test_accuracy_report_keeps_parts_apart_from_baselines():
    """benchmarks/accuracy.py: the latent and morphology columns scored alone are listed, but the "best
    baseline" column takes only the baselines (a part beating the whole must not pass as a baseline)."""
    import accuracy

    def scored(value):
        return {"n": 10, "balanced_accuracy": value, "accuracy": value, "macro_f1": value}

    def report(aecfe, latent, morphology, histogram):
        methods = {"aecfe": aecfe, "latent": latent, "morphology": morphology, "color_histogram": histogram}
        return {"methods": {m: {"in_domain": scored(v), "lab_b": scored(v / 2)} for m, v in methods.items()}}

    entry = {"suite": "real", "variant": "default", "seed": 0, "quick": False, "per_class": 0, "settings": {},
             "wall_seconds": 1.0, "stage_seconds": {}, "cells": {"lab_a": {"cells": 10}}, "machine": "cpu",
             "finished": "now", "reports": {"lab_a": report(0.8, 0.4, 0.9, 0.6)},
             "cross_validation": {"lab_a": {"mean": 0.8, "std": 0.01, "latent": {"mean": 0.5, "std": 0.0},
                                            "morphology": {"mean": 0.7, "std": 0.0}}}}
    text = accuracy.markdown({"runs": [entry]})
    generated = text.split("## Suite `real`")[1]  # past the hand-written notes, whose tables may name variants too
    mean_row = next(line for line in generated.splitlines() if line.startswith("| default |"))
    assert mean_row.split(" | ")[-3:] == ["0.300", "0.200", "0.450 |"]  # best baseline, latent, morphology
    assert "(latent only 0.500) (morphology only 0.700)" in text
    # Where a direction scores a class of a few cells, the run's table gives the mean without such classes.
    entry["classifier_spread"] = {"aecfe": {"lab_a->lab_b": {"mean": 0.4, "std": 0.1, "common_mean": 0.55}},
                                  "latent": {"lab_a->lab_b": {"mean": 0.2, "std": 0.0}}}
    text = accuracy.markdown({"runs": [entry]})
    assert "the mean over the other classes: lab_a->lab_b aecfe 0.550." in text
