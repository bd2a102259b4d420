"""Which stage needs what, and whether it is up to date: the orchestration every command shares.

Each ``ensure_*`` returns a current artefact, computing it (and, first, whatever it needs) only when it
is missing, stale (its inputs, config or code version changed) or forced, and says which it was.
A stage never reads an upstream artefact older than its inputs: stale upstream work is recomputed first.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import datasets as ds_mod
from . import detect, extract, train
from .config import Config
from .datasets import Dataset
from .errors import StageError, UserError
from .feature_sets import FeatureSet, load_feature_set, pool, pooled_name
from .io import read_json
from .reporting import Reporter
from .workdir import Workdir, fingerprint, invalidate, output_digest, read_manifest, state, what_changed, write_manifest

STAGES = ("detector", "detect", "train", "extract", "evaluate")


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"--device {spec}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@dataclass
class Session:
    workdir: Workdir
    config: Config
    device: torch.device
    reporter: Reporter
    force: frozenset = frozenset()  # stages to recompute even when up to date
    strict: bool = False
    _detector: Optional[tuple] = field(default=None, repr=False)
    _model: Optional[tuple] = field(default=None, repr=False)
    _coverage_checked: set = field(default_factory=set, repr=False)  # datasets already warned about

    @property
    def seed(self) -> int:
        return self.config.runtime.seed

    def dataset(self, spec: str, layout: Optional[str] = None) -> Dataset:
        dataset = ds_mod.resolve(spec, self.config, layout, self.workdir.known_datasets())
        self.workdir.register(dataset.spec())
        return dataset

    def save_config(self) -> None:
        """Write the resolved config into the workdir, where the next command without a config of its own
        takes its settings from. Commands call it once their inputs passed every check made before work, so
        a refused setting (a class the source lacks) is not handed on to the next command."""
        import yaml

        from .io import write_text

        write_text(self.workdir.root / "config.yaml", yaml.safe_dump(self.config.to_dict(), sort_keys=False))

    def _say(self, what: str, status: str, action: str) -> None:
        reason = {"missing": "not computed yet", "stale": "out of date"}.get(status, "forced")
        self.reporter.info(f"{what}: {reason}, {action}")


def ensure_detector(session: Session, datasets: Sequence[Dataset]):
    if session._detector is None:
        cfg = session.config.detect
        folder = session.workdir.detector
        status = state(folder, detect.detector_fingerprint(cfg, session.seed))
        forced = "detector" in session.force
        if status == "done" and not forced:
            session.reporter.info("detector: up to date, reusing")
        else:
            session._say("detector", "forced" if forced else status, "obtaining one")
        session._detector = detect.obtain_detector(folder, cfg, datasets, session.device, session.seed,
                                                   session.reporter, force=forced)
    return session._detector


def ensure_detections(session: Session, dataset: Dataset, shard=(0, 1), detector_datasets=None) -> Optional[dict]:
    folder = session.workdir.detect(dataset.name)
    detector_manifest = read_manifest(session.workdir.detector)
    detector_status = state(session.workdir.detector, detect.detector_fingerprint(session.config.detect, session.seed))
    if detector_status == "done" and "detector" not in session.force and "detect" not in session.force:
        status = state(folder, detect.detections_fingerprint(dataset, detector_manifest, session.config.detect))
        if status == "done":
            session.reporter.info(f"detect {dataset.name}: up to date, reusing")
            return _check_coverage(session, dataset, read_manifest(folder))
    else:
        status = "stale" if read_manifest(folder) else "missing"
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError(f"detect {dataset.name}: {status}; under torchrun only training is distributed, "
                        f"run `aecfe detect --data {dataset.name}` first")
    session._say(f"detect {dataset.name}", "forced" if "detect" in session.force else status, "detecting")
    sharded = shard != (0, 1)
    if sharded:
        session.workdir.begin_setup()
    model, detector_manifest = ensure_detector(session, detector_datasets or [dataset])
    on_ready = session.workdir.end_setup if sharded else None
    manifest = detect.run_detection(dataset, model, detector_manifest, session.config.detect, folder,
                                    session.device, session.reporter, shard=shard, strict=session.strict,
                                    on_ready=on_ready)
    return _check_coverage(session, dataset, manifest) if manifest else None


def _check_coverage(session: Session, dataset: Dataset, manifest: dict) -> dict:
    """Too many images without a detection: a warning once per command that uses the detections (reused
    ones too, so it is not said once and then forgotten), an error under --strict."""
    if dataset.name not in session._coverage_checked:
        session._coverage_checked.add(dataset.name)
        warning = detect.coverage_warning(dataset.name, manifest["counts"], session.config.detect.max_missing_fraction,
                                          session.workdir.detect(dataset.name))
        if warning and session.strict:
            raise StageError(f"{warning}; failing because of --strict")
        if warning:
            session.reporter.warn(warning)
    return manifest


def ensure_model(session: Session, datasets: Sequence[Dataset], require_resume: bool = False):
    """The trained autoencoder; trains on ``datasets`` (first = anchor) when none is current."""
    if session._model is not None:
        return session._model
    folder = session.workdir.train
    manifests = [ensure_detections(session, d, detector_datasets=datasets) for d in datasets]
    expected = train.training_fingerprint(manifests, session.config.train, session.seed)
    status = state(folder, expected)
    if status == "done" and "train" not in session.force:
        session.reporter.info(f"train ({', '.join(d.name for d in datasets)}): up to date, reusing")
        manifest = read_manifest(folder)
    else:
        session._say(f"train ({', '.join(d.name for d in datasets)})", "forced" if "train" in session.force else status,
                     "training")
        _require_cells(datasets, manifests)
        manifest = train.run_training([d.name for d in datasets], [session.workdir.detect(d.name) for d in datasets],
                                      manifests, session.config.train, folder, session.device, session.seed,
                                      session.reporter, require_resume=require_resume)
        if manifest is None:  # a non-zero rank under torchrun
            return None
    session._model = (train.load_trained_model(folder, session.device), manifest)
    return session._model


def _require_cells(datasets: Sequence[Dataset], manifests: Sequence[dict]) -> None:
    for dataset, manifest in zip(datasets, manifests):
        if manifest["counts"]["cells"] == 0:
            raise UserError(f"dataset '{dataset.name}': no cell was detected in {dataset.root}; check the images or the detector")


def current_model(session: Session, fallback: Sequence[Dataset]):
    """The model in the workdir (retrained first if stale), else one trained on ``fallback``."""
    manifest = read_manifest(session.workdir.train)
    names = manifest.get("datasets") if manifest else None
    datasets = [session.dataset(n) for n in names] if names else list(fallback)
    return ensure_model(session, datasets)


def ensure_features(session: Session, dataset: Dataset, model_and_manifest=None) -> dict:
    detect_manifest = ensure_detections(session, dataset)
    model, train_manifest = model_and_manifest or current_model(session, [dataset])
    folder = session.workdir.extract(dataset.name)
    expected = extract.extraction_fingerprint(detect_manifest, train_manifest, session.config.extract)
    status = state(folder, expected)
    if status == "done" and "extract" not in session.force:
        session.reporter.info(f"extract {dataset.name}: up to date, reusing")
        return read_manifest(folder)
    session._say(f"extract {dataset.name}", "forced" if "extract" in session.force else status, "extracting")
    return extract.run_extraction(dataset.name, session.workdir.detect(dataset.name), detect_manifest, model,
                                  train_manifest, session.config.extract, folder, session.device, session.reporter)


def _evaluation_inputs(wd: Workdir, names: Sequence[str]) -> dict[str, str]:
    """Features of every dataset, and its detections too: the baselines read the crops."""
    inputs = {}
    for name in names:
        inputs[name] = output_digest(read_manifest(wd.extract(name)))
        inputs[f"crops:{name}"] = output_digest(read_manifest(wd.detect(name)))
    return inputs


def evaluation_fingerprint(session: Session, targets: Sequence[str], inputs: dict) -> str:
    return fingerprint("evaluate", {**dataclasses.asdict(session.config.evaluate), "targets": list(targets)},
                       session.seed, inputs)


def check_sources(sources: Sequence[Dataset], others: Sequence[Dataset], flag: str) -> None:
    """Fail when a dataset is named twice as a source, or is both a source and one of ``others`` (the
    datasets given with ``flag``): a source's held-out cells are scored in-domain already."""
    names = [source.name for source in sources]
    _check_unique(names, "--source")
    for other in others:
        if other.name in names:
            raise UserError(f"{flag} {other.name} is the source: its held-out 20 % is scored in-domain already; "
                            "name other datasets")


def _check_unique(names: Sequence[str], flag: str) -> None:
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"{flag} {', '.join(repeated)} given more than once")


def check_classes(session: Session, sources: Sequence[Dataset], targets: Sequence[Dataset]) -> None:
    """Fail before any detection or training when the images' labels already rule out the evaluation:
    a source with a single class, a target sharing none with it, or a target that is a source."""
    from . import evaluate

    check_sources(sources, targets, "--target")
    evaluate.compare_classes(pooled_name(sources), [r.label for s in sources for r in s.records],
                             {t.name: [r.label for r in t.records] for t in targets}, session.config.evaluate.labels,
                             session.config.evaluate.classes)


def load_source(session: Session, sources: Sequence[Dataset]) -> FeatureSet:
    """The extracted cells of the source datasets, pooled into one source when there are several."""
    return pool([load_feature_set(session.workdir.root, source.name) for source in sources])


def ensure_report(session: Session, sources: Sequence[Dataset], targets: Sequence[Dataset]) -> dict:
    """Score the classifier trained on ``sources`` (several: pooled into one source) on every target."""
    from . import evaluate

    check_classes(session, sources, targets)
    model = current_model(session, [*sources, *targets])
    manifests = {d.name: ensure_features(session, d, model) for d in [*sources, *targets]}
    inputs = _evaluation_inputs(session.workdir, list(manifests))
    name = pooled_name(sources)
    folder = session.workdir.evaluate(name)
    expected = evaluation_fingerprint(session, [t.name for t in targets], inputs)
    if state(folder, expected) == "done" and "evaluate" not in session.force:
        session.reporter.info(f"evaluate {name}: up to date, reusing")
        return read_json(folder / "report.json")
    cfg = session.config.evaluate
    started = time.perf_counter()
    report = evaluate.run_evaluation(
        load_source(session, sources),
        [load_feature_set(session.workdir.root, t.name) for t in targets],
        folder,
        seed=session.seed,
        **evaluate.evaluation_settings(cfg),
    )
    files = report["files"]
    outputs = ["report.json", files["report"], files["split"], files["embedding"], *files["confusion"].values()]
    write_manifest(folder, "evaluate", fingerprint_value=expected, config=dataclasses.asdict(cfg), seed=session.seed,
                   device="cpu", inputs=inputs, outputs=outputs,
                   counts={"source": sum(manifests[s.name]["counts"]["cells"] for s in sources),
                           "targets": {t.name: manifests[t.name]["counts"]["cells"] for t in targets}},
                   timings={"seconds": round(time.perf_counter() - started, 2)},
                   extra={"sources": [s.name for s in sources]})
    return report


def status_rows(session: Session) -> list[tuple[str, str, str, list[str], str]]:
    """(stage, dataset, state, what changed, detail) for every artefact the workdir holds or a later stage
    needs. Reads only: datasets are resolved without registering them. A stale stage says what changed:
    its own settings (``train.epochs 15 -> 30``), the seed, the code version or an input, and which
    upstream stage is not up to date (it is redone after that one). Own settings are compared with the
    upstream artefacts as they are on disk, so they show even while an upstream stage is stale."""
    rows = []
    wd = session.workdir
    cfg = session.config
    known = wd.known_datasets()
    done: set[str] = set()  # labels of the stages found up to date: "detector", "detect lab_a", "train", ...

    def add(stage: str, name: str, folder: Path, expected: Optional[str], upstream: Sequence[str], detail: str) -> None:
        current, changed = _judge(folder, expected, [label for label in upstream if label not in done])
        if current == "done":
            done.add(stage if stage in ("detector", "train") else f"{stage} {name}")
        rows.append((stage, name, current, changed, detail))

    detector_manifest = read_manifest(wd.detector)
    add("detector", "-", wd.detector, detect.detector_fingerprint(cfg.detect, session.seed), (), _how(detector_manifest))
    detect_manifests = {name: read_manifest(wd.detect(name)) for name in known}
    for name in sorted(known):
        manifest = detect_manifests[name]
        try:
            dataset = ds_mod.resolve(name, cfg, None, known)
        except UserError as exc:
            rows.append(("detect", name, "unavailable", [], str(exc)))
            continue
        expected = detect.detections_fingerprint(dataset, detector_manifest, cfg.detect) if detector_manifest else None
        add("detect", name, wd.detect(name), expected, ["detector"],
            f"{manifest['counts']['cells']} cells of {manifest['counts']['images']} images" if manifest else "")
    train_manifest = read_manifest(wd.train)
    if train_manifest:
        names = train_manifest["datasets"]
        upstream = [detect_manifests.get(n) for n in names]
        expected = train.training_fingerprint(upstream, cfg.train, session.seed) if all(upstream) else None
        add("train", ", ".join(names), wd.train, expected, [f"detect {n}" for n in names],
            f"{train_manifest['counts']['cells']} cells, {train_manifest['counts']['epochs']} epochs")
    else:
        rows.append(("train", "-", "missing", [], ""))
    for name in sorted(known):
        folder = wd.extract(name)
        manifest = read_manifest(folder)
        expected = (extract.extraction_fingerprint(detect_manifests[name], train_manifest, cfg.extract)
                    if detect_manifests[name] and train_manifest else None)
        add("extract", name, folder, expected, [f"detect {name}", "train"],
            f"{manifest['counts']['cells']} cells" if manifest else "")
    evaluate_root = wd.root / "evaluate"
    for folder in sorted(evaluate_root.iterdir()) if evaluate_root.is_dir() else []:
        manifest = read_manifest(folder)
        if manifest is None:
            continue
        targets = list(manifest["counts"]["targets"])
        names = [*manifest.get("sources", [folder.name]), *targets]
        on_disk = all(read_manifest(wd.extract(n)) and read_manifest(wd.detect(n)) for n in names)
        expected = evaluation_fingerprint(session, targets, _evaluation_inputs(wd, names)) if on_disk else None
        add("evaluate", folder.name, folder, expected, [f"extract {n}" for n in names], "targets: " + ", ".join(targets))
    return rows


def _judge(folder: Path, expected: Optional[str], waiting: Sequence[str]) -> tuple[str, list[str]]:
    """A stage's state and what changed; ``waiting``: upstream stages that are not up to date."""
    if read_manifest(folder) is None:
        return "missing", []
    changed = what_changed(folder, expected)
    if waiting:
        return "stale", changed + [f"{label} is not up to date" for label in waiting]
    current = state(folder, expected)
    return current, changed if current == "stale" else []


def _how(manifest: Optional[dict]) -> str:
    if not manifest:
        return ""
    obtained = manifest.get("obtained", {})
    return ", ".join(f"{k}={v}" for k, v in obtained.items())


def prediction_fingerprint(session: Session, training: Sequence[str], inputs: dict) -> str:
    """predict depends on evaluate's classifier settings (it refits that classifier) and its own section."""
    cfg = session.config
    keys = ("classifier", "labels", "split_seed", "feature_norm", "max_shift", "self_training",
            "self_training_agreement", "self_training_sizes", "class_weight", "trees", "classes")
    settings = {"evaluate": {key: getattr(cfg.evaluate, key) for key in keys},
                "predict": dataclasses.asdict(cfg.predict), "training_datasets": list(training)}
    return fingerprint("predict", settings, session.seed, inputs)


def check_predictions(session: Session, sources: Sequence[Dataset], datasets: Sequence[Dataset]) -> None:
    """Fail before any detection or training when the settings or the sources' labels rule predict out."""
    from . import predict

    check_sources(sources, datasets, "--data")
    _check_unique([d.name for d in datasets], "--data")
    predict.check_settings(session.config.predict, session.config.evaluate)
    predict.chosen_source_cells(pooled_name(sources),
                                [r.label for s in sources for r in s.records], session.config.evaluate)


def ensure_predictions(session: Session, sources: Sequence[Dataset], datasets: Sequence[Dataset]) -> list[dict]:
    """Label every dataset's cells with the classifier trained on the sources (several: pooled into one
    source); one summary per dataset.

    The datasets are detected and encoded with the detector and autoencoder in the workdir (trained first,
    on the sources and the datasets, when there is none); a dataset the autoencoder was not trained on is
    said so, and its shift figures tell how far it lies from the sources.
    """
    from . import predict

    check_predictions(session, sources, datasets)
    names = [d.name for d in datasets]
    cfg = session.config
    model = current_model(session, [*sources, *datasets])
    training = list(model[1]["datasets"])
    source_digest = "+".join(output_digest(ensure_features(session, source, model)) for source in sources)
    source_name = pooled_name(sources)
    detecting = _detecting_all_cells(session, training, names) if cfg.predict.all_cells else session
    features_manifests = {dataset.name: ensure_features(detecting, dataset, model) for dataset in datasets}
    for dataset in datasets:  # every dataset is checked before any is labelled
        if features_manifests[dataset.name]["counts"]["cells"] == 0:
            images = read_manifest(session.workdir.detect(dataset.name))["counts"]["images"]
            raise UserError(f"dataset '{dataset.name}': no cell was detected in any of its {images} images "
                            f"({dataset.root}); check that they are blood-cell images, or lower detect.score_threshold")
    source_cells = source_errors = classes_left_out = None
    # Datasets that keep the same columns share one fitted classifier and its calibration, unless it adapts to
    # each dataset's own cells (evaluate.self_training); then they share the plain fit it adapts from.
    fits, plain_fits = {}, {}
    summaries = []
    for dataset in datasets:
        features_manifest = features_manifests[dataset.name]
        detect_manifest = read_manifest(session.workdir.detect(dataset.name))
        if dataset.name not in training:
            session.reporter.info(f"{dataset.name}: not among the datasets the autoencoder was trained on "
                                  f"({', '.join(training)}); encoded with that model, see its shift figures")
        inputs = {"source": source_digest, "features": output_digest(features_manifest),
                  "detections": output_digest(detect_manifest)}
        folder = session.workdir.predict(source_name, dataset.name)
        expected = prediction_fingerprint(session, training, inputs)
        if state(folder, expected) == "done" and "predict" not in session.force:
            session.reporter.info(f"predict {source_name} -> {dataset.name}: up to date, reusing")
            summaries.append(read_json(folder / "summary.json"))
            continue
        session._say(f"predict {source_name} -> {dataset.name}", "forced" if "predict" in session.force
                     else state(folder, expected), "labelling")
        if source_cells is None:
            source_cells, source_errors, classes_left_out = predict.learnt_source(
                load_source(session, sources),
                np.concatenate([_reconstruction_errors(session, model[0], source) for source in sources]),
                cfg.evaluate)
        invalidate(folder)
        started = time.perf_counter()
        cells = load_feature_set(session.workdir.root, dataset.name)
        columns = predict.classifier_columns(source_cells, cells, cfg.evaluate)
        key = (columns.tobytes(), dataset.name if cfg.evaluate.self_training else "")
        if key not in fits:
            fits[key] = predict.fit_source(source_cells, source_errors, columns, cfg.evaluate, cfg.predict,
                                           session.seed, cells=cells, plain_fits=plain_fits,
                                           classes_left_out=classes_left_out)
        fitted = fits[key]
        summary = predict.run_prediction(fitted, cells, _reconstruction_errors(session, model[0], dataset),
                                         predict.load_boxes(session.workdir.detect(dataset.name), cells),
                                         detect_manifest.get("no_detection", []), folder, cfg.predict, training,
                                         session.seed)
        write_manifest(folder, "predict", fingerprint_value=expected,
                       config={"evaluate": dataclasses.asdict(cfg.evaluate), "predict": dataclasses.asdict(cfg.predict)},
                       seed=session.seed, device=str(session.device), inputs=inputs,
                       outputs=predict.summary_outputs(summary),
                       counts={"cells": summary["counts"]["cells"], "rejected": summary["counts"]["rejected"],
                               "images": len(summary["images"])},
                       timings={"seconds": round(time.perf_counter() - started, 2)},
                       extra={"source": source_name, "sources": [s.name for s in sources], "dataset": dataset.name})
        summaries.append(summary)
    return summaries


def _reconstruction_errors(session: Session, model, dataset: Dataset):
    return extract.reconstruction_errors(model, session.workdir.detect(dataset.name), session.config.extract.batch_size,
                                         session.device)


def _detecting_all_cells(session: Session, training: Sequence[str], names: Sequence[str]) -> Session:
    """A session detecting every cell of a field, for the --data datasets only (the source keeps its cells)."""
    if not session.config.detect.all_cells:
        trained = sorted(set(training) & set(names))
        if trained:
            raise UserError(f"--all-cells: {', '.join(trained)} trained the autoencoder with one cell per image; "
                            "detecting every cell would make the model out of date. Pass the fields as another "
                            "dataset (their folder path), or set detect.all_cells: true for every stage")
    config = copy.deepcopy(session.config)
    config.detect.all_cells = True
    return dataclasses.replace(session, config=config)
