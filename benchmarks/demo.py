"""README's main command, timed: ``aecfe demo`` from an empty workdir, as a new user runs it.

Runs ``aecfe demo`` (default size unless ``--per-class``) in a fresh temporary folder, with every core,
and writes ``docs/demo.md`` (or ``--out``): the wall time of the whole command against its 10-minute budget,
each stage's own time from its manifest, and the demo's balanced accuracies with the baselines of the same
run. The test suite runs the demo at a smaller size (tests/test_demo.py); this is where the budget is met.

    python benchmarks/demo.py [--per-class 60] [--out docs/demo.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from machine import machine_info  # noqa: E402
from stages import stage_seconds  # noqa: E402

BUDGET_SECONDS = 600
DOMAINS = ("lab_a", "lab_b")
BASELINES = ("raw_pixels", "color_histogram", "stain_normalized_histogram")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--per-class", type=int, default=None, help="cells per class and lab (default: the demo's)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "demo.md")
    args = parser.parse_args()
    extra = [] if args.per_class is None else ["--per-class", str(args.per_class)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    env.pop("AECFE_WORKDIR", None)
    with tempfile.TemporaryDirectory(prefix="aecfe-demo-bench-") as tmp:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-m", "aecfe_cli", "demo", *extra], cwd=tmp, env=env,
                                capture_output=True, text=True)
        seconds = time.perf_counter() - started
        if result.returncode != 0:
            print(result.stderr[-3000:], file=sys.stderr)
            return result.returncode
        work = Path(tmp) / "aecfe-demo"
        stages = _stage_rows(stage_seconds(work, list(DOMAINS)))
        scores = {source: json.loads((work / "evaluate" / source / "report.json").read_text()) for source in DOMAINS}
    text = _render(seconds, stages, scores, extra)
    args.out.write_text(text)
    print(text)
    return 0 if seconds <= BUDGET_SECONDS else 1


def _stage_rows(stages: dict) -> list[tuple[str, float]]:
    rows = [("detector training", stages["detector"])]
    rows += [(f"detect {name}", value) for name, value in stages["detect"].items()]
    rows.append(("autoencoder training", stages["train"]))
    rows += [(f"{stage} {name}", value) for stage in ("extract", "evaluate") for name, value in stages[stage].items()]
    return rows


def _render(seconds: float, stages, scores: dict, extra: list[str]) -> str:
    machine = f"{machine_info()['cpu_model']}, {os.cpu_count()} cores, no GPU used"
    command = " ".join(["aecfe demo", *extra])
    verdict = "within" if seconds <= BUDGET_SECONDS else "OVER"
    lines = [
        "# `aecfe demo`, timed (benchmarks/demo.py)",
        "",
        f"Command: `{command}` from an empty folder, every core; machine: {machine}; measured "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"**Whole command: {seconds / 60:.1f} min ({seconds:.0f} s), {verdict} the 10-minute budget.** "
        "The stages' own times (manifests) leave out start-up, writing the synthetic labs and pictures.",
        "",
        "| stage | seconds |",
        "|---|---|",
        *(f"| {name} | {value:.1f} |" for name, value in stages),
        "",
        "Balanced accuracy across labs (each lab's classifier scored on the other lab):",
        "",
        "| source -> target | AE-CFE | " + " | ".join(b.replace("_", " ") for b in BASELINES) + " |",
        "|---|---|" + "---|" * len(BASELINES),
    ]
    for source, report in scores.items():
        for target, scored in report["targets"].items():
            baselines = [report["baselines"].get(b, {}).get("targets", {}).get(target, {}).get("balanced_accuracy")
                         for b in BASELINES]
            shown = " | ".join("-" if value is None else f"{value:.3f}" for value in baselines)
            lines.append(f"| {source} -> {target} | {scored['balanced_accuracy']:.3f} | {shown} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
