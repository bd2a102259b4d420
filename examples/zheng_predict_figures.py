"""Compare `aecfe predict --source pbc --data zheng` with Zheng's true labels (README: Label your own lab's cells).

predict never reads Zheng's labels; this script reads them from labels.csv afterwards and prints, as
Markdown, the differential count against the true one, the rejection rate, accuracy on accepted and on all
cells, and the shift figures.

    python examples/zheng_predict_figures.py aecfe-work/predict/pbc/zheng ../shared/data/zheng_tecom/labels.csv
"""

from __future__ import annotations

import argparse
import csv
import json
from collections import Counter
from pathlib import Path

# labels.csv codes (shared/data/README.md); Zheng labels neutrophils and lymphocytes coarsely.
ZHENG_CLASSES = {"1": "neutrophil", "2": "lymphocyte", "3": "monocyte", "4": "eosinophil", "5": "basophil"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("predict_dir", type=Path, help="<workdir>/predict/pbc/zheng")
    parser.add_argument("labels_csv", type=Path, help="zheng_tecom/labels.csv")
    args = parser.parse_args()
    summary = json.loads((args.predict_dir / "summary.json").read_text())
    with open(args.predict_dir / "predictions.csv", newline="") as handle:
        cells = list(csv.DictReader(handle))
    with open(args.labels_csv, newline="", encoding="utf-8-sig") as handle:
        truth_by_id = {int(row["image ID"]): ZHENG_CLASSES[row["class label"]] for row in csv.DictReader(handle)}
    if summary["labels"] != "coarse":
        raise SystemExit(f"predictions are at the {summary['labels']} level; Zheng's truth is coarse")
    # images_and_masks/007.bmp -> 7; one detected cell per image (central-cell detection).
    truth = [truth_by_id[int(Path(cell["image"]).stem)] for cell in cells]
    accepted = [cell["rejected"] == "False" for cell in cells]
    true_counts = Counter(truth)
    counted = Counter(cell["predicted_class"] for cell, keep in zip(cells, accepted) if keep)
    n_accepted = sum(accepted)

    print(f"{len(cells)} cells of {len(truth_by_id)} images; classes trained on: {', '.join(summary['classes'])}\n")
    print("| class | true count (%) | predicted, accepted cells (%) |")
    print("|---|---|---|")
    for cls in summary["classes"]:
        if true_counts[cls] or counted[cls]:
            print(f"| {cls} | {true_counts[cls]} ({100 * true_counts[cls] / len(cells):.1f}) | "
                  f"{counted[cls]} ({100 * counted[cls] / max(n_accepted, 1):.1f}) |")
    rejected = len(cells) - n_accepted
    print(f"| rejected | - | {rejected} ({100 * rejected / len(cells):.1f} % of all cells) |\n")
    right = [cell["predicted_class"] == cls for cell, cls in zip(cells, truth)]
    right_accepted = [ok for ok, keep in zip(right, accepted) if keep]
    reject = summary["reject"]
    print(f"accuracy on all cells {100 * sum(right) / len(cells):.1f} %, on the accepted ones "
          f"{100 * sum(right_accepted) / max(n_accepted, 1):.1f} % (threshold {reject['threshold']}, "
          f"calibrated for {reject['target']} {reject['by']} on the held-out pbc cells)")
    shift = summary["shift"]
    distance, reconstruction = shift["distance"], shift["reconstruction"]
    print(f"shift: {100 * shift['fraction_beyond']:.0f} % of cells beyond the held-out pbc cells' "
          f"{shift['quantile']:.0%} quantile ({100 * distance['fraction_beyond']:.0f} % in distance, score "
          f"{distance['score']:.2f}; {100 * reconstruction['fraction_beyond']:.0f} % in reconstruction error, score "
          f"{reconstruction['score']:.2f}); warning: {shift['warning']}")


if __name__ == "__main__":
    main()
