"""What ``evaluate`` writes for people: the printed summary rows, report.md, the confusion and embedding plots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.preprocessing import StandardScaler

from .classify import RARE_CLASS_CELLS
from .feature_sets import FeatureSet
from .io import pyplot, write_figure
from .mixing import balanced_indices

METHOD_TITLES = {
    "aecfe": "AE-CFE",
    "latent": "AE-CFE latent only",
    "morphology": "morphology only",
    "raw_pixels": "raw pixels + PCA",
    "color_histogram": "colour histogram",
    "stain_normalized_histogram": "stain-normalised colour histogram",
}
# t-SNE costs seconds per thousand points and iterations; 1,000 points and 500 iterations show the class
# and dataset structure in a few seconds. Below TSNE_MIN_POINTS it says little beyond PCA.
MAX_EMBEDDING_POINTS = 1000
TSNE_ITERATIONS = 500
TSNE_MIN_POINTS = 500


# --------------------------------------------------------------------------------------------- rendering


def render_summary_rows(report: dict) -> list[tuple]:
    """(method, split, n, accuracy, balanced_accuracy, macro_f1) rows, methods side by side per split."""
    methods = {"AE-CFE": report} | {METHOD_TITLES.get(kind, kind): entry
                                    for kind, entry in (report.get("parts", {}) | report["baselines"]).items()}
    splits = [("in-domain", None)] + [(name, name) for name in report["targets"]]
    rows = []
    for split_title, target in splits:
        for title, entry in methods.items():
            metrics = entry["in_domain"] if target is None else entry["targets"][target]
            rows.append(
                (
                    title,
                    split_title,
                    metrics["n"],
                    metrics["accuracy"],
                    metrics["balanced_accuracy"],
                    metrics["macro_f1"],
                )
            )
    return rows


def _dropped_lines(report: dict) -> list[str]:
    if report.get("max_shift") is None:
        return []
    lines = [f"Learned-feature columns left out of the classifier for a target, as shifted between "
             f"{report['source']} and that target by more than {report['max_shift']} interquartile ranges "
             f"(`evaluate.max_shift`; the in-domain score keeps every column):", ""]
    for target, dropped in report.get("dropped_columns", {}).items():
        lines.append(f"- {target}: {', '.join(f'`{c}`' for c in dropped) if dropped else 'none'}")
    return lines + [""]


_WEIGHTING = {"none": "", "balanced": "; classes weighted alike, `evaluate.class_weight`"}


_FEATURE_NORMS = {
    "dataset": "standardised on each dataset's own mean and spread",
    "both": "both as extracted and standardised on each dataset's own mean and spread, side by side (the "
            "standardised copies named `<column>@dataset`)",
}


def _classes_left_out_lines(report: dict) -> list[str]:
    left_out = report.get("classes_left_out")
    if not left_out:
        return []
    return [f"The classifier learns only {', '.join(report['classes'])} (`evaluate.classes`), for every method "
            f"alike: {report['source']}'s cells of {', '.join(left_out)} were left out before the split.", ""]


def _feature_norm_lines(report: dict) -> list[str]:
    described = _FEATURE_NORMS.get(report.get("feature_norm", "none"))
    if described is None:
        return []
    return [f"The learned features reach the classifier {described} (`evaluate.feature_norm`); the baselines "
            "as they are.", ""]


def _self_training_lines(report: dict) -> list[str]:
    rounds = report.get("self_training", 0)
    if not rounds:
        return []
    checks = []
    if report.get("self_training_agreement", "none") != "none":
        checks.append(f"where a forest on its {report['self_training_agreement']} columns alone agreed "
                      "(`evaluate.self_training_agreement`)")
    if report.get("self_training_sizes", "none") != "none":
        checks.append("where its sizes lay within the source's range (`evaluate.self_training_sizes`)")
    checked = f" AE-CFE's self-training learnt a target cell's label only {' and '.join(checks)}." if checks else ""
    return [f"Each target's classifier, for every method alike, was adapted to that target's own cells by {rounds} "
            f"round{'s' if rounds > 1 else ''} of self-training (`evaluate.self_training`; label-free, on all its "
            f"cells); the in-domain score is the plain fit.{checked}", ""]


def render_markdown(report: dict) -> str:
    """report.md: the summary a person reads first, then classes, per-class results and domain mixing."""
    source, targets = report["source"], list(report["targets"])
    methods = {"aecfe": report} | report.get("parts", {}) | report["baselines"]
    lines = [f"# Evaluation: trained on {source}", ""]
    lines += [
        f"Classifier `{report['classifier']}` (seed {report['seed']}{_WEIGHTING[report['class_weight']]}), "
        f"{report['labels']} labels "
        f"(asked: {report['labels_requested']}), trained on {report['split']['n_train']} {source} cells; in-domain = "
        f"the held-out {report['split']['n_test']} cells, cross-domain = every target cell of a shared class.",
        "",
        *_classes_left_out_lines(report),
        *_feature_norm_lines(report),
        *_dropped_lines(report),
        *_self_training_lines(report),
        "## Summary",
        "",
        "Each cell: **balanced accuracy** / accuracy / macro-F1, in %, over the classes shared with the source.",
        "",
    ]
    header = [f"{source} in-domain (n={report['in_domain']['n']})"] + [
        f"{name} (n={report['targets'][name]['n']})" for name in targets
    ]
    lines += [_row(["method", *header]), _row(["---"] * (len(header) + 1))]
    for key, entry in methods.items():
        cells = [_triple(entry["in_domain"])] + [_triple(entry["targets"][name]) for name in targets]
        lines.append(_row([METHOD_TITLES.get(key, key), *cells]))
    lines += _best_baseline_lines(report)
    lines += _rare_class_lines(report)
    if report.get("baselines_note"):
        lines += ["", f"Baselines {report['baselines_note']}."]
    lines += ["", *_classes_section(report), "", *_per_class_section(report, methods), "", *_mixing_section(report)]
    lines += [
        "",
        "## Files",
        "",
        f"- `{report['split']['file']}`: the source split, reused while the source cells are unchanged"
        + (
            " (drawn with seed " + str(report["split"]["seed"]) + ")"
            if report["split"]["seed"] is not None
            else " (from an earlier run)"
        )
        + "; delete it to draw a new one.",
        *[
            f"- `{file}`: row-normalised confusion matrix on {name}"
            for name, file in report["files"]["confusion"].items()
        ],
        f"- `{report['files']['embedding']}`: 2-D embedding of the AE-CFE features, by class and by dataset.",
        "",
    ]
    return "\n".join(lines)


def _splits(report: dict) -> list[tuple[str, object]]:
    """(title, pick) per scored split: the in-domain split, then each target; ``pick(entry)`` is that split's
    metrics in a method's entry (the report itself for AE-CFE, or one of its parts or baselines)."""
    splits = [(f"{report['source']} in-domain", lambda entry: entry["in_domain"])]
    return splits + [(name, lambda entry, t=name: entry["targets"][t]) for name in report["targets"]]


def _best_baseline(report: dict, pick, metric: str) -> tuple[str, float]:
    """The baseline with the highest ``metric`` on the split ``pick`` selects, and that value."""
    best = max(report["baselines"], key=lambda key: pick(report["baselines"][key])[metric])
    return best, pick(report["baselines"][best])[metric]


def _best_baseline_lines(report: dict) -> list[str]:
    """Per split, AE-CFE against the best simple method there, in balanced-accuracy points."""
    if not report["baselines"]:
        return []
    lines = [""]
    for title, pick in _splits(report):
        best, best_value = _best_baseline(report, pick, "balanced_accuracy")
        ours = pick(report)["balanced_accuracy"]
        verdict = "beats" if ours > best_value else ("ties with" if ours == best_value else "trails")
        margin = "" if ours == best_value else f", by {100 * abs(ours - best_value):.1f} points"
        lines.append(
            f"- {title}: AE-CFE {_percent(ours)} % {verdict} the best simple method, "
            f"{METHOD_TITLES.get(best, best)} ({_percent(best_value)} %){margin}."
        )
    return lines


def _rare_class_lines(report: dict) -> list[str]:
    """Per split scored on a class of fewer than ``classify.RARE_CLASS_CELLS`` cells: how far that class
    alone can move the balanced accuracy, and the balanced accuracy over the other classes."""
    lines = []
    for title, pick in _splits(report):
        metrics = pick(report)
        rare = metrics.get("rare_classes") or {}
        if not rare:
            continue
        present = sum(1 for entry in metrics["per_class"].values() if entry["support"] > 0)
        common = metrics.get("balanced_accuracy_common")
        if common is None:  # every class is rare: say how coarse the score is
            fewest, most = min(rare.values()), max(rare.values())
            counts = f"{fewest} each" if fewest == most else f"{fewest} to {most}"
            lines.append(f"- {title}: every class is scored on fewer than {RARE_CLASS_CELLS} cells ({counts}): one "
                         f"cell of the smallest moves the balanced accuracy by {100 / (fewest * present):.1f} points.")
            continue
        named = ", ".join(f"{cls} ({n} cell{'s' if n > 1 else ''})" for cls, n in rare.items())
        subject = "is" if len(rare) == 1 else "are each"
        line = (f"- {title}: {named} {subject} scored on fewer than {RARE_CLASS_CELLS} cells: one class's recall "
                f"alone moves the balanced accuracy by up to {100 / present:.1f} points. Over the other "
                f"{present - len(rare)} classes AE-CFE scores {_percent(common)} %")
        if report["baselines"]:
            best, best_value = _best_baseline(report, pick, "balanced_accuracy_common")
            line += f"; the best simple method there, {METHOD_TITLES.get(best, best)}, {_percent(best_value)} %"
        line += "."
        lines.append(line)
    return ["", *lines] if lines else []


def _classes_section(report: dict) -> list[str]:
    datasets = list(report["cells_per_class"])
    all_classes = sorted(set().union(*(counts.keys() for counts in report["cells_per_class"].values())))
    lines = [f"## Classes ({report['labels']} level)", "", f"Trained on: {', '.join(report['classes'])}.", ""]
    for name, info in report["classes_per_target"].items():
        lines.append(
            f"- **{name}**: compared {', '.join(info['compared'])} ({info['n_scored']} cells); "
            f"dropped, source only: {', '.join(info['dropped_source_only']) or 'none'}; "
            f"dropped, target only: {', '.join(info['dropped_target_only']) or 'none'} "
            f"({info['n_unscored']} cells not scored)."
        )
    lines += ["", _row(["class", *datasets]), _row(["---"] * (len(datasets) + 1))]
    for cls in all_classes:
        lines.append(_row([cls, *[str(report["cells_per_class"][name].get(cls, "-")) for name in datasets]]))
    return lines


def _per_class_section(report: dict, methods: dict) -> list[str]:
    baseline_keys = [key for key in methods if key != "aecfe"]
    lines = ["## Per class", "", "AE-CFE precision, recall and F1 in %, with the baselines' recall beside them."]
    for title, pick in _splits(report):
        metrics = pick(report)
        header = [
            "class",
            "support",
            "precision",
            "recall",
            "F1",
            *[f"recall, {METHOD_TITLES.get(k, k)}" for k in baseline_keys],
        ]
        lines += ["", f"### {title}", "", _row(header), _row(["---"] * len(header))]
        for cls, values in metrics["per_class"].items():
            baseline_recalls = [_percent(pick(methods[key])["per_class"][cls]["recall"]) for key in baseline_keys]
            lines.append(
                _row(
                    [
                        cls,
                        str(values["support"]),
                        _percent(values["precision"]),
                        _percent(values["recall"]),
                        _percent(values["f1"]),
                        *baseline_recalls,
                    ]
                )
            )
        if metrics["predicted_outside_classes"]:
            outside = metrics["predicted_outside_classes"]
            lines += [
                "",
                f"{outside} {'cell was' if outside == 1 else 'cells were'} predicted as a class not scored here "
                "(counted as errors).",
            ]
    return lines


def _mixing_section(report: dict) -> list[str]:
    mixing = report["domain_mixing"]
    lines = [
        "## Domain mixing",
        "",
        f"{mixing['direction'][0].upper()}{mixing['direction'][1:]}. Cells of: {', '.join(mixing['classes'])}.",
        "",
    ]
    lines += [
        _row(["method", "points", "silhouette by dataset", "domain classifier balanced accuracy", "chance"]),
        _row(["---"] * 5),
    ]
    for key, values in mixing["methods"].items():
        lines.append(
            _row(
                [
                    METHOD_TITLES.get(key, key),
                    str(values["n_points"]),
                    _number(values["silhouette"]),
                    _number(values["domain_classifier_balanced_accuracy"]),
                    _number(values["chance"]),
                ]
            )
        )
    return lines


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _triple(metrics: dict) -> str:
    balanced, accuracy, macro_f1 = (_percent(metrics[key]) for key in ("balanced_accuracy", "accuracy", "macro_f1"))
    return f"**{balanced}** / {accuracy} / {macro_f1}"


# ----------------------------------------------------------------------------------------------- figures


def plot_confusion(path: Path, metrics: dict, source_name: str, target_name: str, level: str) -> None:
    """Rows normalised by the true-class count; an extra column holds predictions of unscored classes."""
    plt = pyplot()
    classes = metrics["classes"]
    confusion = np.array(metrics["confusion"], dtype=np.float64)
    support = np.array([metrics["per_class"][cls]["support"] for cls in classes], dtype=np.float64)
    columns = list(classes)
    if metrics["predicted_outside_classes"]:
        confusion = np.column_stack([confusion, support - confusion.sum(axis=1)])
        columns.append("(unscored class)")
    fractions = confusion / np.maximum(support, 1)[:, None]
    size = 2.5 + 0.55 * len(columns)
    figure, axes = plt.subplots(figsize=(size + 1.5, size))
    image = axes.imshow(fractions, cmap="Blues", vmin=0.0, vmax=1.0)
    for row in range(fractions.shape[0]):
        for col in range(fractions.shape[1]):
            value = fractions[row, col]
            axes.text(
                col,
                row,
                f"{100 * value:.0f}",
                ha="center",
                va="center",
                fontsize=8,
                color="white" if value > 0.6 else "black",
            )
    axes.set_xticks(range(len(columns)), columns, rotation=45, ha="right")
    axes.set_yticks(range(len(classes)), [f"{cls} ({int(n)})" for cls, n in zip(classes, support)])
    axes.set_xlabel("predicted")
    axes.set_ylabel(f"true ({level} level, cells)")
    axes.set_title(f"{source_name} -> {target_name}: balanced accuracy {_percent(metrics['balanced_accuracy'])} %")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04, label="fraction of the true class")
    write_figure(path, figure)


def plot_embedding(path: Path, datasets: Sequence[FeatureSet], class_labels: Sequence[np.ndarray], seed: int) -> None:
    """Source and targets in one 2-D map: PCA, then t-SNE when there are enough points to be worth it."""
    plt = pyplot()
    chosen = balanced_indices([len(dataset.features) for dataset in datasets], seed, MAX_EMBEDDING_POINTS)
    sample = np.concatenate([dataset.features[rows] for dataset, rows in zip(datasets, chosen)]).astype(np.float64)
    classes = np.concatenate([y[rows] for y, rows in zip(class_labels, chosen)])
    domains = np.repeat(np.arange(len(datasets)), [len(rows) for rows in chosen])
    coordinates, method = _embed(StandardScaler().fit_transform(sample), seed)
    # The gap between the panels leaves room for the first panel's legend.
    figure, (by_class, by_dataset) = plt.subplots(1, 2, figsize=(16, 6.5), gridspec_kw={"wspace": 0.5})
    class_names = np.unique(classes).tolist()
    panels = (
        (by_class, "by class", classes, class_names, class_names, "tab10" if len(class_names) <= 10 else "tab20", 0.7),
        (by_dataset, "by dataset", domains, range(len(datasets)), [d.name for d in datasets], "Set1", 0.6),
    )
    for axes, title, members, values, names, colour_map, alpha in panels:
        colours = plt.get_cmap(colour_map)
        for index, (value, name) in enumerate(zip(values, names)):
            chosen = members == value
            axes.scatter(*coordinates[chosen].T, s=6, alpha=alpha, color=colours(index % colours.N),
                         label=f"{name} ({chosen.sum()})")
        axes.set_title(f"AE-CFE features, {method}, {title}")
        axes.set_xticks([])
        axes.set_yticks([])
        axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7, markerscale=2, frameon=False)
    write_figure(path, figure)


def _embed(sample: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    n_components = min(50, *sample.shape)
    reduced = PCA(n_components=n_components, svd_solver="full", random_state=seed).fit_transform(sample)
    if len(sample) >= TSNE_MIN_POINTS:
        tsne = TSNE(n_components=2, init="pca", max_iter=TSNE_ITERATIONS, random_state=seed)
        return tsne.fit_transform(reduced), "PCA + t-SNE"
    if reduced.shape[1] < 2:  # one feature dimension: draw it against zero
        reduced = np.column_stack([reduced, np.zeros(len(reduced))])
    return reduced[:, :2], "PCA"
