"""Is the detector's RoI feature of a turned cell the stored feature turned the same way?

``train.dihedral`` turns the stored 256x14x14 RoI maps; ``detect.view_turns`` turns the image before the
detector. They are the same augmentation only if the detector's channels are equivariant to quarter turns.
This measures it on a finished workdir: for every K-th detected cell of a dataset it takes the RoI feature of
the image turned a quarter anticlockwise (box turned with it) and correlates it (per cell, over all 50,176
values) with the stored feature turned alike, with the stored feature unturned, and with the next cell's
turned feature (what an unrelated cell gives); then the same for the 256 channel means, which a turn of the
map cannot change.

    python benchmarks/turned_roi_features.py WORKDIR [--dataset pbc] [--every 45] [--cells 40]

WORKDIR is an aecfe workdir (``aecfe-work``, or a benchmark's ``.../work``) with a trained detector and the
dataset's detections. Exits 0 with one line when either is missing.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def correlation(a, b):
    """Pearson correlation of row i of ``a`` with row i of ``b`` (each flattened), one value per row."""
    a = a.reshape(len(a), -1) - a.reshape(len(a), -1).mean(1, keepdims=True)
    b = b.reshape(len(b), -1) - b.reshape(len(b), -1).mean(1, keepdims=True)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--dataset", default="pbc")
    parser.add_argument("--every", type=int, default=45, help="take every K-th detected cell")
    parser.add_argument("--cells", type=int, default=40, help="at most this many cells")
    args = parser.parse_args(argv)
    detector, instances = args.workdir / "detector" / "model.pt", args.workdir / "detect" / args.dataset / "instances.csv"
    if not detector.is_file() or not instances.is_file():
        print(f"skipped: {detector} or {instances} is absent (run `aecfe detect` first)")
        return 0

    import torch
    from PIL import Image

    from aecfe_cli.autoencoder import dihedral
    from aecfe_cli.detect import turn_image
    from aecfe_cli.detector import load_detector, roi_features_at

    model = load_detector(detector, "cpu")
    with open(instances, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))[:: args.every][: args.cells]
    images = [np.asarray(Image.open(row["image"]).convert("RGB")) for row in rows]
    boxes = [np.array([[float(row[k]) for k in ("x0", "y0", "x1", "y1")]], np.float32) for row in rows]
    turned = [turn_image(image, box, 1) for image, box in zip(images, boxes)]
    stored = roi_features_at(model, images, boxes, "cpu")
    of_turned = roi_features_at(model, [t[0] for t in turned], [t[1] for t in turned], "cpu")
    stored_turned = dihedral(torch.from_numpy(stored), 1).numpy()
    means, turned_means = stored.mean((2, 3)), of_turned.mean((2, 3))
    print(f"{len(rows)} cells of {args.dataset} (every {args.every}th), mean correlation per cell:")
    print(f"  feature of the turned cell vs the stored feature turned:   {correlation(of_turned, stored_turned).mean():.3f}")
    print(f"  feature of the turned cell vs the stored feature unturned: {correlation(of_turned, stored).mean():.3f}")
    print(f"  feature of the turned cell vs the next cell's, turned:     "
          f"{correlation(of_turned, np.roll(stored_turned, 1, axis=0)).mean():.3f}")
    print(f"  channel means, the turned cell vs the cell:                {correlation(turned_means, means).mean():.3f}")
    print(f"  channel means, the turned cell vs the next cell:           "
          f"{correlation(turned_means, np.roll(means, 1, axis=0)).mean():.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
