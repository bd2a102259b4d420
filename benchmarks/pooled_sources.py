"""Two labelled labs pooled as one source (``--source A --source B``) against each alone, scored on the third.

Reads finished workdirs of ``benchmarks/accuracy.py`` (real suite: datasets ``pbc``, ``zheng`` and ``bccd``
detected and extracted) and runs the evaluation stage alone on their stored features, with the default
evaluate settings and the given classifier seeds: for every lab, each other lab as the source, then both
other labs pooled. Each target's score depends on its source alone, so one single-source run serves both of
its targets. Writes ``pooled_sources.json`` and ``pooled_sources.md`` into ``--out``; draws already there for
other workdirs or seeds are kept (a rerun replaces its own), so seeds can be added run by run. A workdir that
lacks a lab's features is skipped with a line saying so.

    python benchmarks/pooled_sources.py --workdir RUN0/work --workdir RUN1/work [--classifier-seeds 0] --out docs
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/run.py: idle threads must sleep

import argparse  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from aecfe_cli.config import EvaluateConfig  # noqa: E402
from aecfe_cli.evaluate import evaluation_settings, run_evaluation  # noqa: E402
from aecfe_cli.feature_sets import load_feature_set, pool  # noqa: E402
from aecfe_cli.io import read_json, write_json, write_text  # noqa: E402
from machine import machine_info  # noqa: E402

LABS = ("pbc", "zheng", "bccd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, action="append", required=True, help="a finished real-suite workdir")
    parser.add_argument("--classifier-seeds", default="0", help="comma-separated seeds of the classifier")
    parser.add_argument("--out", type=Path, required=True, help="folder of pooled_sources.json/.md")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # scikit-learn's per-fit warnings would flood the log
    seeds = [int(seed) for seed in args.classifier_seeds.split(",")]
    settings = evaluation_settings(EvaluateConfig())
    out_file = args.out / "pooled_sources.json"
    draws = read_json(out_file)["draws"] if out_file.is_file() else []
    measured = 0
    for workdir in args.workdir:
        missing = [lab for lab in LABS if not (workdir / "extract" / lab / "features.npy").is_file()]
        if missing:
            print(f"skipped {workdir}: no features of {', '.join(missing)}")
            continue
        labs = {lab: load_feature_set(workdir, lab) for lab in LABS}
        for seed in seeds:
            draw = _draw(str(workdir), labs, seed, settings)
            draws = [d for d in draws if (d["workdir"], d["classifier_seed"]) != (draw["workdir"], seed)] + [draw]
            draws.sort(key=lambda d: (d["classifier_seed"], d["workdir"]))
            measured += 1
            print(_draw_line(draw), flush=True)
            _write(args.out, draws, settings)  # after every draw: a stopped run keeps what it measured
    print(f"{measured} draws measured; {args.out / 'pooled_sources.md'} holds {len(draws)}" if measured
          else "no finished workdir: nothing measured")


def _write(out: Path, draws: list[dict], settings: dict) -> None:
    result = {"machine": machine_info(), "settings": settings, "draws": draws, "summary": _summary(draws)}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "pooled_sources.json", result)
    write_text(out / "pooled_sources.md", _markdown(result))


def _draw(workdir: str, labs: dict, seed: int, settings: dict) -> dict:
    """Every target's balanced accuracy from each single source and from the other two pooled, one seed."""
    single, pooled, seconds = {}, {}, {}
    with tempfile.TemporaryDirectory() as scratch:
        for source in LABS:
            started = time.perf_counter()
            report = run_evaluation(labs[source], [labs[t] for t in LABS if t != source], Path(scratch) / source,
                                    seed=seed, **settings)
            seconds[source] = round(time.perf_counter() - started, 1)
            single.update({(source, target): scores["balanced_accuracy"]
                           for target, scores in report["targets"].items()})
        for target in LABS:
            sources = [lab for lab in LABS if lab != target]
            started = time.perf_counter()
            pooled_set = pool([labs[lab] for lab in sources])
            report = run_evaluation(pooled_set, [labs[target]], Path(scratch) / pooled_set.name, seed=seed, **settings)
            seconds[pooled_set.name] = round(time.perf_counter() - started, 1)
            pooled[target] = {
                "sources": sources,
                "pooled": report["targets"][target]["balanced_accuracy"],
                "single": {source: single[(source, target)] for source in sources},
                "baselines": {kind: entry["targets"][target]["balanced_accuracy"]
                              for kind, entry in report["baselines"].items()},
                "in_domain": report["in_domain"]["balanced_accuracy"],
            }
    return {"workdir": workdir, "classifier_seed": seed, "targets": pooled, "seconds": seconds}


def _draw_line(draw: dict) -> str:
    parts = [f"{target}: both {entry['pooled']:.3f}, "
             + ", ".join(f"{source} {score:.3f}" for source, score in entry["single"].items())
             for target, entry in draw["targets"].items()]
    return f"{draw['workdir']} seed {draw['classifier_seed']}: " + "; ".join(parts)


def _summary(draws: list[dict]) -> dict:
    """Per draw, the mean over the three targets of: one source (both of them), the better single source (a
    bound: only the target's labels name it) and the pooled source; then their means and spreads."""
    rows = {"one_source": [], "better_single_source": [], "pooled": [], "best_baseline_of_pooled": []}
    for draw in draws:
        entries = list(draw["targets"].values())
        rows["one_source"].append(np.mean([score for e in entries for score in e["single"].values()]))
        rows["better_single_source"].append(np.mean([max(e["single"].values()) for e in entries]))
        rows["pooled"].append(np.mean([e["pooled"] for e in entries]))
        rows["best_baseline_of_pooled"].append(np.mean([max(e["baselines"].values()) for e in entries]))
    pooled, single = np.array(rows["pooled"]), np.array(rows["one_source"])
    return {
        "per_draw": {key: [round(float(v), 3) for v in values] for key, values in rows.items()},
        "mean": {key: round(float(np.mean(values)), 3) for key, values in rows.items()},
        "sd": {key: round(float(np.std(values, ddof=1)), 3) if len(values) > 1 else None for key, values in rows.items()},
        "pooled_above_one_source": int((pooled > single).sum()),
        "draws": len(draws),
    }


def _markdown(result: dict) -> str:
    summary = result["summary"]
    lines = [
        "# Two labelled labs as one source",
        "",
        "Generated by `benchmarks/pooled_sources.py` from finished real-suite workdirs of `benchmarks/accuracy.py`;",
        "the evaluation stage alone, default evaluate settings. Balanced accuracy on the target (the third lab),",
        "over the classes it shares with the source.",
        "",
        f"Machine: {result['machine'].get('cpu_model', '?')}, {result['machine'].get('usable_cpus', '?')} usable CPUs.",
        "",
        "| workdir | classifier seed | target | from the first source | from the second | from both pooled | best baseline of the pooled run |",
        "|---|---|---|---|---|---|---|",
    ]
    for draw in result["draws"]:
        for target, entry in draw["targets"].items():
            (first, a), (second, b) = entry["single"].items()
            lines.append(f"| {draw['workdir']} | {draw['classifier_seed']} | {target} | {first} {a:.3f} | {second} {b:.3f} "
                         f"| {entry['pooled']:.3f} | {max(entry['baselines'].values()):.3f} |")
    lines += ["", "Mean over the three targets, per draw, then over the draws (sd over the draws):", "",
              "| | per draw | mean (sd) |", "|---|---|---|"]
    names = {"one_source": "one source (both single sources)", "better_single_source":
             "the better single source (a bound: only the target's labels name it)", "pooled": "both pooled",
             "best_baseline_of_pooled": "the best baseline of the pooled run"}
    for key, name in names.items():
        per_draw = " / ".join(f"{v:.3f}" for v in summary["per_draw"][key])
        spread = "" if summary["sd"][key] is None else f" ({summary['sd'][key]:.3f})"
        lines.append(f"| {name} | {per_draw} | {summary['mean'][key]:.3f}{spread} |")
    lines += ["", f"Pooled above one source on {summary['pooled_above_one_source']} of {summary['draws']} draws.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
