"""Cross-lab accuracy of aecfe: the whole pipeline, from an empty workdir, per variant and seed.

Suites (each a set of labs trained on together, label-free, then scored source -> every other lab):

* ``real``       the triangle in ``../shared/data``: PBC (Acevedo-20 sample, Barcelona, MGG), Zheng
                 (Jiangxi Tecom, rapid stain) and BCCD (smear fields with one WBC type per field: the
                 field is cut to a window twice the size of its annotated WBC box, so the detector still
                 has to find the cell; fields with no type or mixed types are left out).
* ``synthetic``  three synthetic labs (``aecfe synth --domain lab_a|lab_b|lab_c``).

Every (variant, seed) runs ``aecfe train`` (which detects first), ``extract`` and ``evaluate`` for each
source, as a user would, in its own workdir; variants that differ only after detection share the
detections of an identical detector (copied, so every run still starts from its own workdir). Rows hold
balanced accuracy, accuracy and macro-F1 of the learned features and of every baseline of the same run,
in-domain (the 20 % split, and 5-fold stratified cross-validation repeated twice on all cells, which
has less variance) and for every cross-lab direction, with the wall time of each stage.

Results accumulate in a JSON file (one entry per suite, variant and seed; reruns replace their entry)
and the Markdown report is rebuilt from all of it: ``docs/accuracy.json`` and ``docs/accuracy.md``.
``--quick`` (a before-and-after check in a few minutes: small subsets, short training) writes to
``accuracy-quick/`` in the current folder instead, never to the committed reference. ``--features-of
VARIANT`` scores levers of the evaluate section alone on the finished workdirs of an earlier run of VARIANT
(same seeds), so they differ from it in nothing else and only the evaluation runs.

    python benchmarks/accuracy.py [--suite real|synthetic] [--variants NAME,...] [--seeds 0,1,2] [--quick]
    python benchmarks/accuracy.py --variants default+no_self_training --features-of default --seeds 0,1,2
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see benchmarks/run.py: idle threads must sleep

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import xml.etree.ElementTree as ElementTree  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy_levers import QUICK, VARIANTS  # noqa: E402
from aecfe_cli.classify import RARE_CLASS_CELLS  # noqa: E402
from aecfe_cli.detect import DETECTOR_KEYS  # noqa: E402
from aecfe_cli.feature_sets import ID_COLUMNS, morphology_columns  # noqa: E402
from aecfe_cli.io import read_json, write_json, write_text  # noqa: E402
from machine import machine_info  # noqa: E402
from stages import stage_seconds  # noqa: E402

# Resolved, so the image lists (and so the detections of a run) do not depend on where the checkout lies.
DATA = (ROOT / ".." / "shared" / "data").resolve()
NOTES = ROOT / "docs" / "accuracy_notes.md"

CV_FOLDS, CV_REPEATS = 5, 2
SPREAD_REPEATS = 3
PARTS = ("latent", "morphology")  # columns of the learned features scored alone, not baselines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=("real", "synthetic"), default="real")
    parser.add_argument("--variants", default="default", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--seeds", default="0", help="comma-separated pipeline seeds")
    parser.add_argument("--per-class", type=int, default=0, help="use at most N images per class of each lab (0: all)")
    parser.add_argument("--quick", action="store_true", help="small subsets and short training; writes accuracy-quick/")
    parser.add_argument("--out", type=Path, default=None, help="folder of accuracy.json/.md (default docs/)")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/aecfe-accuracy"), help="workdirs and prepared data")
    parser.add_argument("--features-of", default=None, metavar="VARIANT",
                        help="score evaluate-only variants on the features of an earlier run of VARIANT (same seed) "
                             "in --scratch instead of running the pipeline")
    args = parser.parse_args()
    unknown = [v for v in [*args.variants.split(","), *([args.features_of] if args.features_of else [])]
               if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")
    if args.suite == "real" and not DATA.is_dir():
        print(f"skipped: {DATA} is absent (see shared/data/README.md)")
        return 0
    out = args.out or (Path("accuracy-quick") if args.quick else ROOT / "docs")
    per_class = args.per_class or (20 if args.quick else 0)
    results_path = out / "accuracy.json"
    results = read_json(results_path) if results_path.is_file() else {"runs": []}
    labs = prepare_labs(args.suite, args.scratch / "data", per_class)
    for variant in args.variants.split(","):
        for seed in (int(s) for s in args.seeds.split(",")):
            if args.features_of:
                entry = rescore_variant(args.suite, variant, args.features_of, seed, list(labs), args.scratch,
                                        args.quick, per_class)
            else:
                entry = run_variant(args.suite, variant, seed, labs, args.scratch, args.quick, per_class)
            results["runs"] = [r for r in results["runs"] if (r["suite"], r["variant"], r["seed"], r["quick"]) !=
                               (args.suite, entry["variant"], seed, args.quick)] + [entry]
            write_json(results_path, results)
            write_text(out / "accuracy.md", markdown(results))
            print(summary_line(entry), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------------
# Labs


def prepare_labs(suite: str, folder: Path, per_class: int) -> dict[str, dict]:
    """Dataset entries for the config (name -> settings), with lists written under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if suite == "synthetic":
        labs = {}
        for domain in ("lab_a", "lab_b", "lab_c"):
            target = folder / domain
            if not target.is_dir():
                run([*aecfe(), "synth", "--out", str(target), "--domain", domain, "--per-class", str(per_class or 60)])
            labs[domain] = {"layout": "folder", "root": str(target)}
        return labs
    pbc_root = DATA / "pbc" / "PBC_dataset_normal_DIB"
    pbc = [(str(p), c.name) for c in sorted(pbc_root.iterdir()) if c.is_dir() for p in sorted(c.glob("*.jpg"))]
    with open(DATA / "zheng_tecom" / "labels.csv", newline="") as handle:
        names = {"1": "neutrophil", "2": "lymphocyte", "3": "monocyte", "4": "eosinophil", "5": "basophil"}
        zheng = [(str(DATA / "zheng_tecom" / "images_and_masks" / f"{int(r['image ID']):03d}.bmp"),
                  names[r["class label"]]) for r in csv.DictReader(handle)]
    bccd = bccd_cells(folder / "bccd_cells")
    labs = {}
    for name, rows in (("pbc", pbc), ("zheng", zheng), ("bccd", bccd)):
        rows = _at_most_per_class(rows, per_class)
        list_path = folder / f"{name}_{per_class or 'all'}.csv"
        with open(list_path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["path", "label"])
            writer.writerows(rows)
        labs[name] = {"layout": "csv", "root": str(list_path)}
    # PBC's subtypes come from its file names; the csv layout keeps its folder names (coarse classes).
    return labs


def _at_most_per_class(rows, per_class: int):
    if not per_class:
        return rows
    kept, seen = [], {}
    for index in np.random.default_rng(0).permutation(len(rows)):
        path, label = rows[index]
        if seen.get(label, 0) < per_class:
            seen[label] = seen.get(label, 0) + 1
            kept.append((path, label))
    return sorted(kept)


def bccd_cells(folder: Path) -> list[tuple[str, str]]:
    """BCCD fields with one WBC type, cut to a square twice the WBC box (largest WBC box of the field)."""
    voc = DATA / "bccd" / "voc"
    rows = []
    folder.mkdir(parents=True, exist_ok=True)
    with open(DATA / "bccd" / "wbc_type_per_image.csv", newline="") as handle:
        for record in csv.DictReader(handle):
            types = {t.strip().lower() for t in (record["Category"] or "").split(",") if t.strip()}
            xml_path = voc / "Annotations" / f"BloodImage_{int(record['Image']):05d}.xml"
            if len(types) != 1 or not xml_path.is_file():
                continue
            boxes = [[float(o.find("bndbox").findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")]
                     for o in ElementTree.parse(xml_path).getroot().iter("object") if o.findtext("name") == "WBC"]
            boxes = [b for b in boxes if b[2] - b[0] > 8 and b[3] - b[1] > 8]
            if not boxes:
                continue
            x0, y0, x1, y1 = max(boxes, key=lambda b: (b[2] - b[0]) * (b[3] - b[1]))
            target = folder / f"{xml_path.stem}.png"
            if not target.is_file():
                image = Image.open(voc / "JPEGImages" / f"{xml_path.stem}.jpg").convert("RGB")
                side = 2 * max(x1 - x0, y1 - y0)
                cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
                box = (max(0, round(cx - side / 2)), max(0, round(cy - side / 2)),
                       min(image.width, round(cx + side / 2)), min(image.height, round(cy + side / 2)))
                image.crop(box).save(target)
            rows.append((str(target), types.pop()))
    return rows


# ---------------------------------------------------------------------------------------------------
# Runs


def aecfe() -> list[str]:
    return [sys.executable, "-m", "aecfe_cli", "--quiet"]


def run(command: list[str]) -> str:
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}): {' '.join(command)}\n{done.stderr[-3000:]}")
    return done.stdout


def config_text(labs: dict, variant: dict, quick: bool) -> str:
    sections: dict[str, dict] = {"datasets": labs}
    for extra in (QUICK if quick else {}, variant):
        for section, values in extra.items():
            sections.setdefault(section, {}).update(values)
    return json.dumps(sections, indent=1)  # JSON is YAML


def run_variant(suite: str, variant: str, seed: int, labs: dict, scratch: Path, quick: bool, per_class: int) -> dict:
    settings = VARIANTS[variant]
    workdir = scratch / f"{suite}-{'quick-' if quick else ''}{per_class}-{variant}-seed{seed}"
    config = workdir / "aecfe.yaml"
    text = config_text(labs, settings, quick)
    # An interrupted run of the same settings resumes (aecfe keeps finished stages); anything else restarts.
    resumed = config.is_file() and config.read_text() == text
    if not resumed:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True)
        config.write_text(text)
        _reuse_earlier_stages(scratch, workdir, text, seed)
    base = [*aecfe(), "--workdir", str(workdir / "work"), "--config", str(config), "--seed", str(seed)]
    names = list(labs)
    started = time.perf_counter()
    run([*base, "train", *(a for n in names for a in ("--data", n))])
    run([*base, "extract"])
    reports = {}
    for source in names:
        targets = [a for n in names if n != source for a in ("--target", n)]
        reports[source] = json.loads(run([*base, "evaluate", "--source", source, *targets, "--json"]))
    wall = time.perf_counter() - started
    work = workdir / "work"
    return {
        "suite": suite, "variant": variant, "seed": seed, "quick": quick, "per_class": per_class,
        "settings": settings, "wall_seconds": round(wall, 1), "resumed": resumed,
        "stage_seconds": stage_seconds(work, names),
        "cells": {n: read_json(work / "detect" / n / "manifest.json")["counts"] for n in names},
        # Whether the autoencoder's feature term beats every cell's mean feature (issue 12's first cause).
        "feature_r2": read_json(work / "train" / "manifest.json").get("feature_r2"),
        "reports": {source: compact(report) for source, report in reports.items()},
        "cross_validation": {n: cross_validated(work, n, seed) for n in names},
        "classifier_spread": classifier_spread(work, names, seed, settings.get("evaluate", {})),
        "machine": machine_description(),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }


def _detector_key(config: str, seed: int) -> str:
    """What decides the detector alone (detect.DETECTOR_KEYS): runs that differ only in how detection
    runs with it (detect.views, say) share it."""
    settings = json.loads(config)
    detector = {k: v for k, v in settings.get("detect", {}).items() if k in DETECTOR_KEYS}
    return json.dumps([settings["datasets"], detector, seed], sort_keys=True)


def _seed_of(workdir: Path) -> int:
    return int(workdir.name.rsplit("-seed", 1)[1])  # run_variant names every workdir ...-seed<N>


def _reuse_earlier_stages(scratch: Path, workdir: Path, config: str, seed: int) -> None:
    """Copy the finished stages of an earlier run whose settings up to them, data and seed were identical:
    detector and detections, and the trained model and features too when the train section also agrees;
    else the detector alone when what builds and trains it agrees. aecfe itself then judges them up to
    date (or not) from their fingerprints, as in any workdir."""
    settings = json.loads(config)
    detect_key = json.dumps([settings["datasets"], settings.get("detect", {}), seed], sort_keys=True)
    train_key = json.dumps([detect_key, settings.get("train", {})], sort_keys=True)
    keys = {"detect": detect_key, "train": train_key}
    same_detector = [p.parent for p in sorted(scratch.glob("*/aecfe.yaml"))
                     if p.parent != workdir and _detector_key(p.read_text(), _seed_of(p.parent)) == _detector_key(config, seed)]
    for stage, marker, parts in (("train", "train", ("detector", "detect", "train", "extract", "datasets.json")),
                                 ("detect", "detector", ("detector", "detect", "datasets.json")),
                                 ("detector", "detector", ("detector", "datasets.json"))):
        earlier = same_detector if stage == "detector" else [
            p.parent for p in sorted(scratch.glob(f"*/{stage}_key.txt")) if p.read_text() == keys[stage]]
        earlier = [folder for folder in earlier if (folder / "work" / marker / "manifest.json").is_file()]
        if earlier:
            (workdir / "work").mkdir()
            for part in parts:
                source = earlier[0] / "work" / part
                if source.is_dir():
                    shutil.copytree(source, workdir / "work" / part)
                elif source.is_file():
                    shutil.copy2(source, workdir / "work" / part)
            break
    for stage, key in keys.items():
        (workdir / f"{stage}_key.txt").write_text(key)


def machine_description() -> str:
    """CPU model, vector extensions, clock and cores: runs on different machines differ in speed."""
    info = machine_info()
    return f"{info['cpu_model']} ({', '.join(info['flags'])}; {info.get('mhz', '?')} MHz), {os.cpu_count()} cores"


def compact(report: dict) -> dict:
    """Per method and scored set: balanced accuracy, accuracy, macro-F1 and n, and the balanced accuracy over
    the classes of 10 cells or more (``classify.score``; Zheng's one basophil is a fifth of the full one)."""
    def metrics(m: dict) -> dict:
        return {k: m.get(k) for k in ("n", "balanced_accuracy", "accuracy", "macro_f1", "balanced_accuracy_common")}

    methods = {"aecfe": {"in_domain": metrics(report["in_domain"]),
                         **{t: metrics(m) for t, m in report["targets"].items()}}}
    for name, baseline in (report.get("parts", {}) | report.get("baselines", {})).items():
        methods[name] = {"in_domain": metrics(baseline["in_domain"]),
                         **{t: metrics(m) for t, m in baseline.get("targets", {}).items()}}
    return {"labels": report.get("labels"), "classes": report.get("classes"), "methods": methods}


def classifier_spread(work: Path, names: list[str], seed: int, evaluate: dict, repeats: int = SPREAD_REPEATS,
                      first: dict | None = None) -> dict:
    """Balanced accuracy of every method and direction when only the classifier's split and seed change
    (``repeats`` draws, the run's own first), mean and standard deviation: how much of a difference
    between runs the random forest and the 20 % split alone can make, on the same features. ``evaluate``:
    the variant's evaluate settings (feature normalisation, classifier, label level) beyond the defaults.
    ``first``: the reports of draw 0 (:func:`evaluate_in_process`), where the caller has computed them.
    ``common_mean``: the mean of the balanced accuracy over the classes of 10 cells or more, where it differs
    from the full one (a class of fewer cells is scored)."""
    values: dict[str, dict[str, list[dict]]] = {}
    for draw in range(repeats):
        reports = first if draw == 0 and first is not None else evaluate_in_process(work, names, seed, evaluate, draw)
        for source, report in reports.items():
            for method, scored in report["methods"].items():
                for target, metrics in scored.items():
                    values.setdefault(method, {}).setdefault(f"{source}->{target}", []).append(metrics)

    def summary(draws: list[dict]) -> dict:
        full = [m["balanced_accuracy"] for m in draws]
        entry = {"mean": round(float(np.mean(full)), 4), "std": round(float(np.std(full)), 4)}
        common = [m.get("balanced_accuracy_common") for m in draws]
        if all(c is not None for c in common) and common != full:
            entry["common_mean"] = round(float(np.mean(common)), 4)
        return entry

    return {method: {d: summary(draws) for d, draws in directions.items()} for method, directions in values.items()}


def evaluate_in_process(work: Path, names: list[str], seed: int, evaluate: dict, draw: int = 0) -> dict[str, dict]:
    """Every source against the other labs, on the features in ``work``, with the evaluate settings of the
    defaults updated by ``evaluate``: the compact reports. Draw 0 is what ``aecfe evaluate`` computes with
    these settings and ``seed``; draw k moves the classifier's seed and the split's seed by k."""
    import dataclasses
    import tempfile

    from aecfe_cli.config import EvaluateConfig
    from aecfe_cli.evaluate import evaluation_settings, run_evaluation
    from aecfe_cli.feature_sets import load_feature_set

    cfg = dataclasses.replace(EvaluateConfig(), **evaluate)
    sets = {n: load_feature_set(work, n) for n in names}
    reports = {}
    for source in names:
        with tempfile.TemporaryDirectory() as out:
            settings = {**evaluation_settings(cfg), "split_seed": cfg.split_seed + draw}
            reports[source] = compact(run_evaluation(
                sets[source], [sets[n] for n in names if n != source], Path(out), seed=seed + draw, **settings))
    return reports


def rescore_variant(suite: str, variant: str, features_of: str, seed: int, names: list[str], scratch: Path,
                    quick: bool, per_class: int) -> dict:
    """``variant``, a lever of the evaluate section alone, scored on the features of the earlier run
    ``features_of`` with the same seed (its workdir in ``scratch``): the same detections and model, so the
    lever is all that differs, and only the evaluation runs. The entry is named ``features_of`` plus the
    lever. ``default`` scores those features under today's evaluate defaults, as a fresh run of
    ``features_of`` would after a change of an evaluate default (its detections and features would be the
    same): the entry is named ``features_of`` and replaces that run's."""
    settings = VARIANTS[variant]
    if not set(settings) <= {"evaluate"}:
        raise SystemExit(f"--features-of scores levers of the evaluate section only; {variant} changes "
                         f"{', '.join(sorted(set(settings) - {'evaluate'}))}")
    earlier = scratch / f"{suite}-{'quick-' if quick else ''}{per_class}-{features_of}-seed{seed}"
    work = earlier / "work"
    if not all((work / "extract" / n / "manifest.json").is_file() for n in names):
        raise SystemExit(f"no finished run of {features_of} seed {seed} in {earlier}")
    merged = {section: dict(values) for section, values in VARIANTS[features_of].items()}
    merged.setdefault("evaluate", {}).update(settings.get("evaluate", {}))
    started = time.perf_counter()
    reports = evaluate_in_process(work, names, seed, merged["evaluate"])
    seconds = round(time.perf_counter() - started, 1)
    return {
        "suite": suite, "seed": seed,
        "variant": features_of if variant == "default" else f"{features_of}+{variant.removeprefix('default+')}",
        "quick": quick, "per_class": per_class, "settings": merged, "wall_seconds": seconds, "resumed": False,
        "stage_seconds": {**stage_seconds(work, names), "evaluate": {"every source, in-process": seconds}},
        "cells": {n: read_json(work / "detect" / n / "manifest.json")["counts"] for n in names},
        "reports": reports,
        "cross_validation": {n: cross_validated(work, n, seed) for n in names},
        "classifier_spread": classifier_spread(work, names, seed, merged["evaluate"], first=reports),
        "machine": machine_description(),
        "finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "note": f"on the detections, model and features of {earlier.name}; only the evaluation ran ({seconds} s)",
    }


def cross_validated(work: Path, name: str, seed: int) -> dict:
    """In-domain balanced accuracy of the random forest by repeated stratified k-fold on all cells: of the
    whole feature vector, and of its latent and morphology columns alone when it holds both."""
    from sklearn.ensemble import RandomForestClassifier
    from sklearn.model_selection import RepeatedStratifiedKFold, cross_val_score

    features = np.load(work / "extract" / name / "features.npy")
    with open(work / "extract" / name / "features.csv", newline="") as handle:
        reader = csv.DictReader(handle)
        labels = np.array([row["label"] for row in reader])
    morphology = morphology_columns([c for c in reader.fieldnames if c not in ID_COLUMNS])
    keep = np.isin(labels, [c for c in np.unique(labels) if (labels == c).sum() >= CV_FOLDS])
    folds = RepeatedStratifiedKFold(n_splits=CV_FOLDS, n_repeats=CV_REPEATS, random_state=seed)
    forest = RandomForestClassifier(n_estimators=100, max_depth=16, random_state=0, n_jobs=-1)
    columns = {"all": np.ones_like(morphology)}
    if morphology.any() and not morphology.all():
        columns |= {"latent": ~morphology, "morphology": morphology}
    result = {}
    for part, selected in columns.items():
        scores = cross_val_score(forest, features[keep][:, selected], labels[keep], cv=folds, scoring="balanced_accuracy")
        summary = {"mean": round(float(scores.mean()), 4), "std": round(float(scores.std()), 4), "folds": len(scores)}
        result.update(summary if part == "all" else {part: summary})
    return result


# ---------------------------------------------------------------------------------------------------
# Report


def summary_line(entry: dict) -> str:
    parts = [f"{entry['suite']} {entry['variant']} seed {entry['seed']}:"]
    for source, report in entry["reports"].items():
        for target, m in report["methods"]["aecfe"].items():
            parts.append(f"{source}->{target} {m['balanced_accuracy']}")
    return " ".join(parts) + f" ({entry['wall_seconds']} s)"


def markdown(results: dict) -> str:
    lines = ["# Cross-lab accuracy", "",
             "Written by `benchmarks/accuracy.py` (see its docstring for the suites and the protocol). "
             "Balanced accuracy (accuracy / macro-F1 in the JSON beside this file). `in` is the 20 % "
             "in-domain split of evaluate; `cv` is 5-fold stratified cross-validation, repeated twice, "
             "on all cells of the lab. Baselines come from the same run.", ""]
    runs = sorted(results["runs"], key=lambda r: (r["suite"], r["quick"], r["variant"], r["seed"]))
    if NOTES.is_file():  # the hand-written reading of these rows: what was tried, what it shows
        lines += [NOTES.read_text().strip(), ""]
    for suite in sorted({r["suite"] for r in runs}):
        lines += [f"## Suite `{suite}`", ""]
        lines += _mean_table([r for r in runs if r["suite"] == suite])
        lines += ["", "### Every run", ""]
        for entry in (r for r in runs if r["suite"] == suite):
            lines += _run_table(entry)
    return "\n".join(lines) + "\n"


def _directions(entry: dict) -> list[tuple[str, str]]:
    return [(s, t) for s, report in entry["reports"].items() for t in report["methods"]["aecfe"]]


def _value(entry: dict, source: str, target: str, method: str = "aecfe"):
    scored = entry["reports"][source]["methods"].get(method, {}).get(target)
    return None if scored is None else scored["balanced_accuracy"]


def _mean_table(runs: list[dict]) -> list[str]:
    groups: dict[tuple, list[dict]] = {}
    for entry in runs:
        groups.setdefault((entry["variant"], entry["quick"], entry["per_class"]), []).append(entry)
    directions = _directions(runs[0])
    header = ["variant", "seeds", *(f"{s}→{'in' if t == 'in_domain' else t}" for s, t in directions),
              "best baseline→cross (mean)", *(f"{part} only→cross (mean)" for part in PARTS)]
    lines = ["Learned features, mean ± standard deviation over seeds:", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (variant, quick, per_class), entries in sorted(groups.items()):
        cells = []
        for source, target in directions:
            values = [v for v in (_value(e, source, target) for e in entries) if v is not None]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "-")
        cross = [(s, t) for s, t in directions if t != "in_domain"]
        best = [max((v for m in e["reports"][s]["methods"] if m != "aecfe" and m not in PARTS
                     for v in [_value(e, s, t, m)] if v is not None), default=np.nan)
                for e in entries for s, t in cross]
        parts = []
        for part in PARTS:
            values = [v for e in entries for s, t in cross for v in [_value(e, s, t, part)] if v is not None]
            parts.append(f"{np.mean(values):.3f}" if values else "-")
        label = variant + (" (quick)" if quick else "") + (f", {per_class}/class" if per_class else "")
        lines.append("| " + " | ".join([label, str(len(entries)), *cells, f"{np.nanmean(best):.3f}", *parts]) + " |")
    return lines


def _run_table(entry: dict) -> list[str]:
    methods = list(next(iter(entry["reports"].values()))["methods"])
    lines = [f"**{entry['variant']}**, seed {entry['seed']}{' (quick)' if entry['quick'] else ''}: "
             f"settings `{json.dumps(entry['settings'])}`, cells {json.dumps({n: c['cells'] for n, c in entry['cells'].items()})}, "
             f"wall {entry['wall_seconds']} s (stages: `{json.dumps(entry['stage_seconds'])}`), "
             + (f"feature R^2 {entry['feature_r2']:.3f}, " if entry.get("feature_r2") is not None else "")
             + f"{entry['machine']}, "
             f"{entry['finished']}{'; ' + entry['note'] if entry.get('note') else ''}", "",
             "| direction | " + " | ".join(methods) + " |", "|" + "---|" * (len(methods) + 1)]
    for source, target in _directions(entry):
        cells = []
        for method in methods:
            scored = entry["reports"][source]["methods"].get(method, {}).get(target)
            cells.append("-" if scored is None else
                         f"{scored['balanced_accuracy']:.3f} / {scored['accuracy']:.3f} / {scored['macro_f1']:.3f}")
        lines.append(f"| {source}→{'in' if target == 'in_domain' else target} | " + " | ".join(cells) + " |")
    cv = ", ".join(f"{n} {c['mean']:.3f} ± {c['std']:.3f}" + "".join(
        f" ({part} only {c[part]['mean']:.3f})" for part in PARTS if part in c) for n, c in entry["cross_validation"].items())
    lines += ["", f"In-domain cross-validated balanced accuracy (learned features): {cv}. "
              "Cells: balanced accuracy / accuracy / macro-F1.", ""]
    spread = entry.get("classifier_spread")
    if spread:
        directions = list(next(iter(spread.values())))
        lines += [f"The same features under {SPREAD_REPEATS} classifier seeds and 80/20 splits (balanced accuracy, "
                  "mean ± std; `in_domain` is the held-out 20 %):", "",
                  "| direction | " + " | ".join(spread) + " |", "|" + "---|" * (len(spread) + 1)]
        for direction in directions:
            lines.append(f"| {direction} | " + " | ".join(
                f"{m[direction]['mean']:.3f} ± {m[direction]['std']:.3f}" if direction in m else "-"
                for m in spread.values()) + " |")
        rare = [(direction, {method: m[direction]["common_mean"] for method, m in spread.items()
                             if "common_mean" in m.get(direction, {})}) for direction in directions]
        if any(common for _, common in rare):
            lines += ["", f"Where a scored class has fewer than {RARE_CLASS_CELLS} cells (one such class's recall moves "
                      "the balanced accuracy by a whole share), the mean over the other classes: " + "; ".join(
                          f"{direction} " + ", ".join(f"{method} {value:.3f}" for method, value in common.items())
                          for direction, common in rare if common) + "."]
        lines.append("")
    return lines


if __name__ == "__main__":
    sys.exit(main())
