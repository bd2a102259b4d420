"""The ``aecfe`` command line: parses, calls the stage modules, prints results.

Nothing here does the work. torch and the stage modules are imported inside commands so that
``aecfe --help`` stays instant. Results go to stdout; messages, progress and errors to stderr.
Exit codes: 0 success, 1 failure while working, 2 bad usage or bad input.
"""

import functools
import os
import sys
import traceback
from pathlib import Path
from typing import List, Optional

import typer

from . import __version__
from .command_settings import Options, open_session, resolve_config, workdir_config
from .errors import StageError, UserError

app = typer.Typer(
    name="aecfe",
    help="Cross-domain white-blood-cell features (AE-CFE): detect, train, extract, evaluate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

DEMO_WORKDIR = "aecfe-demo"


def _fail(message: str, code: int) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handles_errors(command):
    """Turn stage errors into one line on stderr and an exit code; --debug adds the traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        debug = "--debug" in sys.argv
        try:
            return command(*args, **kwargs)
        except typer.Exit:
            raise
        except Exception as exc:  # every failure ends as one line, never a traceback (unless --debug)
            if debug:
                traceback.print_exc()
            if isinstance(exc, UserError):
                _fail(str(exc), 2)
            if isinstance(exc, StageError):
                _fail(str(exc), 1)
            if isinstance(exc, KeyboardInterrupt):
                _fail("interrupted; finished work is kept and the next run resumes", 130)
            if isinstance(exc, OSError) and exc.filename:
                _fail(f"{exc.filename}: {exc.strerror or exc}; check free space and permissions", 1)
            _fail(f"internal error: {type(exc).__name__}: {exc} (rerun with --debug for the traceback)", 1)

    return wrapper


def _version(value: bool) -> None:
    if value:
        typer.echo(f"aecfe {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    ctx: typer.Context,
    workdir: Optional[Path] = typer.Option(None, envvar="AECFE_WORKDIR", help="Working directory [default: ./aecfe-work]."),
    config: Optional[Path] = typer.Option(None, help="YAML config [default: ./aecfe.yaml when present]."),
    preset: Optional[str] = typer.Option(None, help="Start from named settings below the YAML: 'paper' is the "
                                         "exact configuration of Salehi et al. 2022."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda or cuda:N."),
    seed: Optional[int] = typer.Option(None, help="Random seed of every stage."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print results only."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
):
    ctx.obj = Options(workdir, config, device, seed, quiet, debug, preset)


def _print_table(title: str, columns: List[str], rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(f"{v:.3f}" if isinstance(v, float) else str(v) for v in row))
    # Piped into a file or script, Rich would wrap at 80 columns; keep one row per line there.
    Console(highlight=False, width=None if sys.stdout.isatty() else 200).print(table)


DataOption = typer.Option(None, "--data", help="Registered dataset name or dataset path (repeatable).")
LayoutOption = typer.Option(None, "--layout", help="matek, acevedo, int20, folder or csv [default: detected].")
ForceOption = typer.Option(False, "--force", help="Recompute even when up to date.")
TreesOption = typer.Option(None, "--trees", help="Trees of the random forest (more: a steadier vote, a slower fit) "
                                                 "[default: evaluate.trees, 500].")
ClassesOption = typer.Option(None, "--classes",
                             help="Only these source classes are learnt, comma-separated, e.g. neutrophil,lymphocyte,"
                                  "monocyte,eosinophil,basophil when the new lab holds those only; all: every "
                                  "class [default: evaluate.classes, all].")
StrictOption = typer.Option(None, "--strict/--no-strict",
                            help="Fail on an unreadable image instead of skipping it (exit 2), and when more than "
                                 "detect.max_missing_fraction of the images have no detection (exit 1).")


@app.command()
@handles_errors
def datasets(
    ctx: typer.Context,
    data: Optional[List[str]] = DataOption,
    layout: Optional[str] = LayoutOption,
):
    """List registered datasets; with --data, validate one and count its cells per class."""
    from . import datasets as ds
    from .config import env_root
    from .images import UnreadableImage, load_rgb
    from .workdir import Workdir

    options: Options = ctx.obj
    config = resolve_config(options)
    known = Workdir(options.workdir).known_datasets() if options.workdir.is_dir() else {}
    if not data:
        rows = []
        for name in sorted({*ds.BUILTIN, *config.datasets, *known}):
            entry = config.datasets.get(name)
            root = env_root(name) or (entry.root if entry else None) or known.get(name, {}).get("root")
            layout_name = entry.layout if entry else ds.BUILTIN.get(name) or known[name]["layout"]
            where = "set datasets.<name>.root or AECFE_<NAME>_ROOT" if not root else root
            status = "ok" if root and Path(root).exists() else ("no root" if not root else "missing")
            rows.append((name, layout_name, status, where))
        _print_table("datasets", ["name", "layout", "status", "root"], rows)
        return
    bad_total = 0
    for spec in data:
        dataset = ds.resolve(spec, config, layout, known)
        unreadable = list(dataset.skipped)
        for record in dataset.records:
            try:
                load_rgb(record.path)
            except UnreadableImage as exc:
                unreadable.append(str(exc))
        rows = dataset.class_rows()
        classes = len({row[0] for row in rows})
        _print_table(
            f"{dataset.name}: layout {dataset.layout}, {len(dataset.records)} images, {classes} classes ({dataset.root})",
            ["class", "subtype", "fine", "coarse", "images"],
            rows,
        )
        if unreadable:
            typer.echo(f"{len(unreadable)} unreadable or skipped file(s):")
            for line in unreadable:
                typer.echo(f"  {line}")
        bad_total += len(unreadable)
    if bad_total and config.runtime.strict:
        _fail(f"{bad_total} unreadable file(s) listed above; remove or fix them, or run without --strict", 2)


@app.command()
@handles_errors
def synth(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", help="Folder to write the dataset into."),
    domain: str = typer.Option("lab_a", "--domain", help="Synthetic lab style."),
    per_class: int = typer.Option(50, "--per-class", min=1, help="Cells per class."),
    size: int = typer.Option(128, "--size", min=32, help="Image side in pixels (single cells)."),
    fields: bool = typer.Option(False, "--fields", help="Write smear fields with masks and COCO boxes instead."),
    n_fields: int = typer.Option(20, "--n-fields", min=1, help="Number of smear fields (with --fields)."),
):
    """Write a synthetic dataset of stained white cells (or smear fields with masks)."""
    from . import synth as synthetic

    options: Options = ctx.obj
    seed = options.seed if options.seed is not None else 0
    if fields:
        count = synthetic.write_field_dataset(out, domain, n_fields, seed)
        typer.echo(f"wrote {count} smear fields ({domain}) to {out}")
        return
    counts = synthetic.write_cell_dataset(out, domain, per_class, seed, size=size)
    typer.echo(f"wrote {sum(counts.values())} cells in {len(counts)} classes ({domain}) to {out}")


@app.command()
@handles_errors
def detect(
    ctx: typer.Context,
    data: List[str] = typer.Option(..., "--data", help="Registered dataset name or dataset path (repeatable)."),
    layout: Optional[str] = LayoutOption,
    weights: Optional[Path] = typer.Option(None, "--weights", help="Mask R-CNN state dict to use."),
    init_weights: Optional[Path] = typer.Option(
        None, "--init-weights", help="Start detector training from this state dict (a torchvision COCO Mask "
        "R-CNN or an ImageNet ResNet); the class heads are replaced."),
    annotations: Optional[Path] = typer.Option(None, "--annotations", help="VOC folder or COCO JSON to train on."),
    annotation_masks: Optional[Path] = typer.Option(None, "--annotation-masks", help="VOC: folder of mask PNGs."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="resnet18_fpn, resnet34_fpn, resnet50_fpn, resnet101_fpn."),
    all_cells: Optional[bool] = typer.Option(None, "--all-cells/--central-cell", help="Keep every cell of a field."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/n: detect only this share of the images."),
    force: bool = ForceOption,
    strict: Optional[bool] = StrictOption,
):
    """Detect white cells; store boxes, masks, RoI features and crops."""
    from . import detect as detect_stage
    from . import pipeline

    for path, flag in ((weights, "--weights"), (init_weights, "--init-weights"), (annotations, "--annotations")):
        if path is not None and not path.exists():
            raise UserError(f"{path}: not found; pass an existing file to {flag}")
    overrides = {"detect": {"weights": str(weights) if weights else None,
                            "init_weights": str(init_weights) if init_weights else None,
                            "annotations": str(annotations) if annotations else None,
                            "annotation_masks": str(annotation_masks) if annotation_masks else None,
                            "backbone": backbone, "all_cells": all_cells}}
    session = open_session(ctx.obj, overrides, force, ("detector", "detect"), strict)
    shard_range = detect_stage.parse_shard(shard)
    if shard_range != (0, 1) and len(data) > 1:
        raise UserError("--shard splits one dataset: pass a single --data")
    with session.workdir.lock(shared=shard_range != (0, 1)):
        resolved = [session.dataset(d, layout) for d in data]
        session.save_config()
        rows = []
        for dataset in resolved:
            manifest = pipeline.ensure_detections(session, dataset, shard_range, detector_datasets=resolved)
            if manifest:
                c = manifest["counts"]
                rows.append((dataset.name, c["images"], c["cells"], c.get("segmented", 0), c["no_detection"],
                             c["unreadable"], manifest["timings"].get("images_per_second") or "-"))
    if rows:
        _print_table("detect", ["dataset", "images", "cells", "of them segmented", "no detection", "unreadable",
                                "images/s"], rows)


@app.command()
@handles_errors
def train(
    ctx: typer.Context,
    data: List[str] = typer.Option(..., "--data", help="Dataset(s); several = one autoencoder for all (first = anchor of the alignment term, if on)."),
    layout: Optional[str] = LayoutOption,
    epochs: Optional[int] = typer.Option(None, "--epochs", min=1),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=2),
    lr: Optional[float] = typer.Option(None, "--lr"),
    image_size: Optional[int] = typer.Option(None, "--image-size", help="32, 64 or 128 (the paper)."),
    width: Optional[float] = typer.Option(None, "--width", help="Channel multiplier (1.0 = the paper)."),
    align_weight: Optional[float] = typer.Option(None, "--align-weight", help="Lambda of the alignment term (0: off, the default; the paper: 5)."),
    resume: bool = typer.Option(False, "--resume", help="Require continuing from the checkpoint in the workdir."),
    force: bool = ForceOption,
):
    """Train the autoencoder (detects the datasets first when needed)."""
    from . import pipeline

    overrides = {"train": {"epochs": epochs, "batch_size": batch_size, "lr": lr, "image_size": image_size,
                           "width": width, "align_weight": align_weight}}
    session = open_session(ctx.obj, overrides, force, ("train",))
    distributed_rank = int(os.environ.get("RANK", "0"))
    if distributed_rank != 0:
        session.reporter.quiet = True  # under torchrun, rank 0 speaks for all
    lock = session.workdir.lock() if distributed_rank == 0 else _no_lock()
    with lock:
        resolved = [session.dataset(d, layout) for d in data]
        if distributed_rank == 0:
            session.save_config()
        result = pipeline.ensure_model(session, resolved, require_resume=resume)
    if result is None:
        return
    manifest = result[1]
    from .autoencoder import LOSS_TERMS

    final = manifest.get("final_loss") or {}
    r2 = manifest.get("feature_r2")  # None: an older workdir's model, or fewer than two distinct cells
    # feature R^2: 1 is an exact feature reconstruction, 0 no better than every cell's mean feature.
    _print_table("train", ["datasets", "cells", "epochs", *LOSS_TERMS, "feature R^2", "samples/s"],
                 [(", ".join(manifest["datasets"]), manifest["counts"]["cells"], manifest["counts"]["epochs"],
                   *(float(final.get(k, float("nan"))) for k in LOSS_TERMS), "-" if r2 is None else float(r2),
                   manifest["timings"].get("samples_per_second") or "-")])


class _no_lock:
    """Ranks other than 0 under torchrun: rank 0 holds the workdir lock for the whole job."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


@app.command()
@handles_errors
def extract(
    ctx: typer.Context,
    data: Optional[List[str]] = DataOption,
    layout: Optional[str] = LayoutOption,
    force: bool = ForceOption,
):
    """Encode detected cells into feature files (default: every dataset detected in the workdir)."""
    from . import pipeline

    session = open_session(ctx.obj, force=force, stages=("extract",))
    with session.workdir.lock():
        names = data or session.workdir.detected()
        if not names:
            raise UserError(f"{session.workdir.root}: no detected dataset; pass --data NAME|PATH")
        resolved = [session.dataset(d, layout) for d in names]
        session.save_config()
        model = pipeline.current_model(session, resolved)
        rows = []
        for dataset in resolved:
            manifest = pipeline.ensure_features(session, dataset, model)
            rows.append((dataset.name, manifest["counts"]["cells"], manifest["counts"]["dimensions"],
                         str(session.workdir.extract(dataset.name) / "features.csv")))
    _print_table("extract", ["dataset", "cells", "dimensions", "features"], rows)


@app.command()
@handles_errors
def evaluate(
    ctx: typer.Context,
    source: List[str] = typer.Option(..., "--source", help="Labelled dataset(s) the classifier is trained on "
                                     "(repeatable: several are pooled into one source)."),
    target: List[str] = typer.Option(..., "--target", help="Dataset(s) it is scored on (repeatable)."),
    labels: Optional[str] = typer.Option(None, "--labels", help="fine, coarse or auto."),
    classifier: Optional[str] = typer.Option(None, "--classifier",
                                             help="random_forest, logistic_regression, knn or linear_svm."),
    class_weight: Optional[str] = typer.Option(None, "--class-weight",
                                               help="balanced (each source class weighs alike) or none."),
    trees: Optional[int] = TreesOption,
    classes: Optional[str] = ClassesOption,
    baselines: Optional[bool] = typer.Option(None, "--baselines/--no-baselines", help="Score the baselines too."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json only."),
    force: bool = ForceOption,
):
    """Train a classifier on the source's features and score it on every target."""
    if labels is not None and labels not in ("fine", "coarse", "auto"):
        raise UserError(f"--labels {labels}: expected fine, coarse or auto")
    overrides = {"evaluate": {"labels": labels, "classifier": classifier, "class_weight": class_weight,
                              "trees": trees, "baselines": baselines, "classes": _class_list(classes)}}
    session = open_session(ctx.obj, overrides, force, ("evaluate",))
    if as_json:
        session.reporter.quiet = True
    report = _evaluate_pairs(session, source, target)
    _print_report(report, session.workdir.evaluate(report["source"]), as_json)


def _class_list(classes: Optional[str]) -> Optional[list]:
    """``--classes a,b,c`` as a list of names; ``all`` as the empty list, every class (a workdir's saved
    config.yaml keeps an earlier command's classes: this sets them back); None when the flag is not given."""
    if classes is None:
        return None
    return [] if classes.strip() == "all" else [name.strip() for name in classes.split(",") if name.strip()]


def _evaluate_pairs(session, sources: List[str], targets: List[str]) -> dict:
    from . import pipeline

    with session.workdir.lock():
        source_sets, target_sets = [session.dataset(s) for s in sources], [session.dataset(t) for t in targets]
        pipeline.check_classes(session, source_sets, target_sets)
        session.save_config()
        return pipeline.ensure_report(session, source_sets, target_sets)


def _print_report(report: dict, folder: Path, as_json: bool) -> None:
    import json

    from .evaluate_report import render_summary_rows

    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    _print_table(f"{report['source']} -> {', '.join(report['targets'])} ({report['labels']} labels)",
                 ["method", "split", "n", "accuracy", "balanced acc.", "macro-F1"], render_summary_rows(report))
    typer.echo(f"report: {folder / 'report.md'}")


@app.command()
@handles_errors
def predict(
    ctx: typer.Context,
    source: List[str] = typer.Option(..., "--source", help="Labelled dataset(s) the classifier is trained on "
                                     "(repeatable: several are pooled into one source)."),
    data: List[str] = typer.Option(..., "--data", help="Dataset(s) to label, labelled or not (repeatable)."),
    layout: Optional[str] = LayoutOption,
    all_cells: Optional[bool] = typer.Option(None, "--all-cells/--central-cell",
                                             help="Label every cell of a smear field in the --data datasets."),
    output_format: Optional[str] = typer.Option(None, "--format", help="csv, or geojson: also one GeoJSON per image."),
    reject_target: Optional[float] = typer.Option(None, "--reject-target",
                                                  help="Held-out accuracy (or coverage) the reject threshold aims at."),
    trees: Optional[int] = TreesOption,
    classes: Optional[str] = ClassesOption,
    as_json: bool = typer.Option(False, "--json", help="Print the summaries only, as JSON keyed by dataset."),
    force: bool = ForceOption,
):
    """Label a new lab's cells: class, confidence, reject option, differential counts, shift warning."""
    import json

    from . import pipeline
    from .predict_report import reject_line, render_count_rows, shift_line

    overrides = {"predict": {"all_cells": all_cells, "format": output_format, "reject_target": reject_target},
                 "evaluate": {"trees": trees, "classes": _class_list(classes)}}
    session = open_session(ctx.obj, overrides, force, ("predict",))
    if as_json:
        session.reporter.quiet = True
    with session.workdir.lock():
        source_sets, data_sets = [session.dataset(s) for s in source], [session.dataset(d, layout) for d in data]
        pipeline.check_predictions(session, source_sets, data_sets)
        session.save_config()
        summaries = pipeline.ensure_predictions(session, source_sets, data_sets)
    for summary in summaries:
        if summary["shift"]["warning"]:
            typer.echo(f"warning: {shift_line(summary)}", err=True)
    if as_json:
        typer.echo(json.dumps({summary["dataset"]: summary for summary in summaries}, indent=2))
        return
    for summary in summaries:
        _print_table(f"{summary['source']} -> {summary['dataset']}: differential count ({summary['labels']} labels)",
                     ["class", "cells", "% of accepted"], render_count_rows(summary))
        typer.echo(reject_line(summary))
        if not summary["shift"]["warning"]:
            typer.echo(shift_line(summary))
        typer.echo(f"predictions: {session.workdir.predict(summary['source'], summary['dataset']) / 'predictions.csv'}")


@app.command()
@handles_errors
def run(
    ctx: typer.Context,
    data: List[str] = typer.Option(..., "--data", help="Datasets to train on (first = anchor)."),
    source: Optional[List[str]] = typer.Option(None, "--source", help="[default: the first --data] (repeatable)"),
    target: Optional[List[str]] = typer.Option(None, "--target", help="[default: the other --data]"),
    layout: Optional[str] = LayoutOption,
    classes: Optional[str] = ClassesOption,
    as_json: bool = typer.Option(False, "--json", help="Print report.json only."),
    force: bool = ForceOption,
):
    """Whole pipeline: detect, train, extract, evaluate."""
    from . import pipeline

    session = open_session(ctx.obj, {"evaluate": {"classes": _class_list(classes)}}, force=force, stages=pipeline.STAGES)
    if as_json:
        session.reporter.quiet = True
    with session.workdir.lock():
        resolved = [session.dataset(d, layout) for d in data]
        by_name = {d.name: d for d in resolved}

        def named(name: str):  # a dataset of --data is not listed again: it may hold many images
            return by_name.get(name) or session.dataset(name)

        source_sets = [named(s) for s in source] if source else resolved[:1]
        sources = {s.name for s in source_sets}
        targets = [named(t) for t in target] if target else [d for d in resolved if d.name not in sources]
        if not targets:
            raise UserError("no target: pass a --data that is not a --source, or a --target")
        pipeline.check_classes(session, source_sets, targets)
        session.save_config()
        pipeline.ensure_model(session, resolved)
        report = pipeline.ensure_report(session, source_sets, targets)
    _print_report(report, session.workdir.evaluate(report["source"]), as_json)


@app.command()
@handles_errors
def demo(
    ctx: typer.Context,
    per_class: int = typer.Option(60, "--per-class", min=4, help="Synthetic cells per class and domain."),
    force: bool = ForceOption,
):
    """Run the whole pipeline on synthetic labs (./aecfe-demo unless --workdir is given)."""
    from . import demo as demo_stage
    from . import pipeline
    from .evaluate_report import render_summary_rows

    options: Options = ctx.obj
    if not options.workdir_given:
        options.workdir = Path(DEMO_WORKDIR)
    session = open_session(options, demo_stage.DEMO_SETTINGS, force, pipeline.STAGES)
    with session.workdir.lock():
        session.save_config()
        reports = demo_stage.run_demo(session, per_class)
    rows = []
    for report in reports:
        for method, split, n, accuracy, balanced, f1 in render_summary_rows(report):
            rows.append((report["source"], split, method, n, accuracy, balanced, f1))
    _print_table("demo: cross-domain white-cell classification (synthetic labs)",
                 ["source", "scored on", "features", "n", "accuracy", "balanced acc.", "macro-F1"], rows)
    typer.echo(f"reports and pictures: {session.workdir.root / 'evaluate'}")


@app.command()
@handles_errors
def status(ctx: typer.Context, as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """What is done, stale or missing in the workdir, per dataset and stage; writes nothing.

    Stages are judged by the settings the next command would use: --config FILE, else ./aecfe.yaml;
    when neither exists, by the workdir's own config.yaml (the settings of the command that last wrote
    there, e.g. `aecfe demo`), not by the built-in defaults. A stale stage names what changed, e.g.
    `train.epochs 15 -> 30`, an input, or an upstream stage that is not up to date.
    """
    import json

    import torch

    from . import pipeline
    from .reporting import Reporter
    from .workdir import Workdir

    options: Options = ctx.obj
    if not (options.workdir / "datasets.json").is_file():
        raise UserError(f"{options.workdir}: no aecfe work here yet; run a command first or pass --workdir")
    reporter = Reporter(quiet=options.quiet)
    config, judged_by = workdir_config(options, reporter)
    # A Session only to share the stages' fingerprint code: status never prepares, locks or registers.
    session = pipeline.Session(Workdir(options.workdir), config, torch.device("cpu"), reporter)
    rows = pipeline.status_rows(session)
    if as_json:
        keys = ("stage", "dataset", "state", "changed", "detail")
        typer.echo(json.dumps([dict(zip(keys, row)) for row in rows], indent=2))
        return
    table = [(stage, dataset, state, "; ".join([*changed, detail] if detail else changed))
             for stage, dataset, state, changed, detail in rows]
    _print_table(f"status of {options.workdir} (settings: {judged_by})", ["stage", "dataset", "state", "detail"], table)


def main() -> None:
    # torch's OpenMP threads otherwise spin-wait for each other, which halves CPU speed whenever another
    # process holds a core (measured 1.5-2x on the 2-core machines). Must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    app()


if __name__ == "__main__":
    main()
