"""Detector quality on real data: what the stage-1 network achieves when trained here, from scratch.

(a) annotated: trained on BCCD train+val (VOC boxes + whole-cell masks), scored on BCCD test: WBC box
    AP50 (targets >= 0.95) and whole-cell mask IoU against bccd/wbc_masks (target >= 0.80).
(b) label-free, cross-lab: trained on pseudo-masks (``pseudo_instances``) of the PBC/Acevedo images only,
    scored on Zheng et al.'s Tecom images (another lab, stain and camera) against their expert masks:
    detection rate (target >= 99 %) and whole-cell mask IoU (target >= 0.85). The pseudo-masks' own IoU on
    Zheng (no network) is reported as a sanity number.

Reads ``../shared/data`` beside the project; exits 0 with a message when it is absent. Writes
``docs/detect_quality.json`` (parts run separately are merged) and prints a table.

    python benchmarks/detect_quality.py [--part a|b|all] [--quick] [--epochs N] [--train-size PX] ...
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin: on a shared 2-core machine spinning threads that wait for a
# descheduled partner made every training step ~10x slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import random  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aecfe_cli import detector as net  # noqa: E402
from aecfe_cli import annotations, precision, pseudo_labels  # noqa: E402
from aecfe_cli.config import PRECISIONS, DetectConfig  # noqa: E402
from aecfe_cli import detector_training as training  # noqa: E402
from aecfe_cli.masks import box_iou, mask_box, mask_iou  # noqa: E402
from aecfe_cli.images import load_rgb  # noqa: E402
from aecfe_cli.io import write_json  # noqa: E402

DATA = ROOT / ".." / "shared" / "data"
RESULTS = ROOT / "docs" / "detect_quality.json"
AP_SCORE_FLOOR = 0.05  # detections down to this score rank into the precision-recall curve
TARGETS = {"bccd_box_ap50": 0.95, "bccd_mask_iou": 0.80, "zheng_detection_rate": 0.99, "zheng_mask_iou": 0.85}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("a", "b", "all"), default="all")
    parser.add_argument("--quick", action="store_true", help="a few steps only: checks the script, not quality")
    parser.add_argument("--backbone", default="resnet18_fpn", choices=net.BACKBONES)
    parser.add_argument("--size", type=int, default=256, help="detector input size (min = max)")
    parser.add_argument("--train-size", type=int, default=192, help="training view side in pixels")
    parser.add_argument("--epochs-a", type=float, default=6.0, help="epochs over BCCD train+val")
    parser.add_argument("--epochs-b", type=float, default=1.0, help="epochs over the PBC pseudo-labelled images")
    parser.add_argument("--pbc-images", type=int, default=1200, help="PBC images to pseudo-label (of 1200)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-precision", default=DetectConfig.train_precision, choices=PRECISIONS,
                        help="detector training, as detect.train_precision (auto: bfloat16 where native)")
    parser.add_argument("--precision", default=DetectConfig.precision, choices=PRECISIONS,
                        help="detection, as detect.precision")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--save-models", type=Path, default=None, help="folder to keep the trained detectors in")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results JSON, parts already there are kept (default {RESULTS.relative_to(ROOT)}; "
                             "--quick writes nothing unless given)")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: real data folder {DATA.resolve()} is absent")
        return 0
    torch.set_num_threads(args.threads)
    args.train_autocast_dtype = precision.autocast_dtype(args.train_precision, "cpu")
    args.autocast_dtype = precision.autocast_dtype(args.precision, "cpu")
    if args.out is None and not args.quick:
        args.out = RESULTS
    results = json.loads(args.out.read_text()) if args.out and args.out.is_file() else {}
    results["targets"] = TARGETS
    results["machine"] = {"cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch": torch.__version__,
                          "python": platform.python_version(), "device": "cpu"}
    if args.part in ("a", "all"):
        results["a_bccd_annotated"] = part_a(args)
        if args.out:
            write_json(args.out, results)
    if args.part in ("b", "all"):
        results["b_pbc_pseudo_to_zheng"] = part_b(args)
        if args.out:
            write_json(args.out, results)
    print_table(results)
    print(f"written {args.out}" if args.out else "quick run: nothing written")
    return 0


# ---------------------------------------------------------------------------------------------------
# (a) BCCD, annotated


def part_a(args) -> dict:
    voc = DATA / "bccd" / "voc"
    mask_dir = DATA / "bccd" / "wbc_masks"
    train = annotations.read_voc(voc, ["train", "val"], mask_dir=mask_dir)
    test = annotations.read_voc(voc, ["test"], mask_dir=None)
    model, training = train_model(args, train, args.epochs_a, "a")
    images = [load_rgb(s.image_path) for s in test]
    started = time.perf_counter()
    found = net.detect(model, images, "cpu", score_threshold=AP_SCORE_FLOOR, autocast_dtype=args.autocast_dtype)
    detect_seconds = time.perf_counter() - started
    ap50 = average_precision([s.boxes for s in test], found, iou_threshold=0.5)
    instance_ious, image_ious = [], []
    for sample, detections, image in zip(test, found, images):
        semantic = _bccd_mask(mask_dir, sample.image_path.stem, image.shape[:2])
        if semantic is None or not semantic.any():
            continue
        confident = [d for d in detections if d.score >= 0.5]
        union = np.any([d.mask for d in confident], axis=0) if confident else np.zeros_like(semantic)
        image_ious.append(mask_iou(union, semantic))
        for box in sample.boxes:
            truth = semantic & _box_region(box, semantic.shape, grow=4)
            if truth.sum() < 0.2 * (box[2] - box[0]) * (box[3] - box[1]):
                continue  # this box has no mask in the mask file (BCCD 00113): nothing to score
            matches = [d for d in confident if box_iou(d.box, box) >= 0.5]
            best = max(matches, key=lambda d: box_iou(d.box, box)) if matches else None
            instance_ious.append(mask_iou(best.mask, truth) if best is not None else 0.0)
    return {
        "what": "trained on BCCD train+val with VOC boxes and whole-cell masks, scored on BCCD test",
        "train_images": len(train),
        "test_images": len(test),
        "test_wbc_boxes": int(sum(len(s.boxes) for s in test)),
        "box_ap50": round(ap50, 4),
        "mask_iou_per_wbc": round(float(np.mean(instance_ious)), 4) if instance_ious else None,
        "mask_iou_per_wbc_count": len(instance_ious),
        "mask_iou_per_image_union": round(float(np.mean(image_ious)), 4) if image_ious else None,
        "detect_images_per_second": round(len(images) / detect_seconds, 2),
        "training": training,
        "meets_targets": {"box_ap50": ap50 >= TARGETS["bccd_box_ap50"],
                          "mask_iou": bool(instance_ious) and float(np.mean(instance_ious)) >= TARGETS["bccd_mask_iou"]},
    }


def _bccd_mask(mask_dir: Path, stem: str, shape) -> np.ndarray | None:
    prefix, _, number = stem.rpartition("_")
    path = mask_dir / f"{prefix}_Mask_{number}.png"
    if not path.is_file():
        return None
    mask = np.asarray(Image.open(path).convert("L")) > 64
    return mask if mask.shape == tuple(shape) else None


def _box_region(box, shape, grow: int) -> np.ndarray:
    region = np.zeros(shape, bool)
    x0, y0 = max(0, int(box[0]) - grow), max(0, int(box[1]) - grow)
    x1, y1 = min(shape[1], int(np.ceil(box[2])) + grow), min(shape[0], int(np.ceil(box[3])) + grow)
    region[y0:y1, x0:x1] = True
    return region


# ---------------------------------------------------------------------------------------------------
# (b) PBC pseudo-masks -> Zheng


def part_b(args) -> dict:
    pbc = sorted((DATA / "pbc" / "PBC_dataset_normal_DIB").glob("*/*.jpg"))
    random.Random(args.seed).shuffle(pbc)
    chosen = pbc[: (24 if args.quick else args.pbc_images)]
    started = time.perf_counter()
    samples = pseudo_labels.pseudo_samples(chosen)
    pseudo_seconds = time.perf_counter() - started
    zheng_dir = DATA / "zheng_tecom" / "images_and_masks"
    zheng_images = sorted(zheng_dir.glob("*.bmp"))
    truths = [np.asarray(Image.open(p.with_suffix(".png"))) > 0 for p in zheng_images]
    images = [load_rgb(p) for p in zheng_images]
    pseudo_ious = []
    for image, truth in zip(images, truths):
        boxes, masks = pseudo_labels.pseudo_instances(image)
        central = _central_index(boxes, image.shape)
        pseudo_ious.append(mask_iou(masks[central], truth) if central is not None else 0.0)

    model, training = train_model(args, samples, args.epochs_b, "b")
    started = time.perf_counter()
    found = net.detect(model, images, "cpu", score_threshold=0.5, autocast_dtype=args.autocast_dtype)
    detect_seconds = time.perf_counter() - started
    ious, box_ious, any_found = [], [], 0
    for image, truth, detections in zip(images, truths, found):
        central = net.select_central(detections, image.shape)
        any_found += bool(detections)
        if central is None:
            ious.append(0.0)
            box_ious.append(0.0)
            continue
        ious.append(mask_iou(central.mask, truth))
        box_ious.append(box_iou(central.box, mask_box(truth)))
    ious, box_ious = np.array(ious), np.array(box_ious)
    detected = box_ious >= 0.5
    return {
        "what": "trained on pseudo-masks of PBC (Acevedo, MGG) images only, no labels; scored on Zheng "
                "(Jiangxi Tecom, rapid stain) expert masks, whole cell = mask > 0",
        "pbc_images_offered": len(chosen),
        "pbc_images_kept_by_pseudo_masks": len(samples),
        "pseudo_mask_seconds": round(pseudo_seconds, 1),
        "zheng_images": len(images),
        "pseudo_instances_on_zheng": {
            "mean_mask_iou_central": round(float(np.mean(pseudo_ious)), 4),
            "images_with_a_plausible_cell": int(np.sum(np.array(pseudo_ious) > 0)),
        },
        "detection_rate_central_box_iou_0.5": round(float(detected.mean()), 4),
        "images_with_any_detection": any_found,
        "mean_mask_iou_all_images": round(float(ious.mean()), 4),
        "mean_mask_iou_detected_images": round(float(ious[detected].mean()), 4) if detected.any() else None,
        "detect_images_per_second": round(len(images) / detect_seconds, 2),
        "training": training,
        "meets_targets": {"detection_rate": float(detected.mean()) >= TARGETS["zheng_detection_rate"],
                          "mask_iou": float(ious.mean()) >= TARGETS["zheng_mask_iou"]},
    }


def _central_index(boxes: np.ndarray, shape) -> int | None:
    if len(boxes) == 0:
        return None
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    return int(np.argmin(np.hypot(centres[:, 0] - shape[1] / 2, centres[:, 1] - shape[0] / 2)))


# ---------------------------------------------------------------------------------------------------
# Shared


def train_model(args, samples, epochs: float, part: str):
    """Train a fresh detector; fractional epochs train on a seeded subset of that size each epoch."""
    model = net.build_detector(args.backbone, min_size=args.size, max_size=args.size)
    whole_epochs = max(1, int(round(epochs)))
    subset = samples
    if epochs < whole_epochs:
        subset = random.Random(args.seed).sample(list(samples), max(1, int(len(samples) * epochs / whole_epochs)))
    if args.quick:
        subset, whole_epochs = list(samples)[:8], 1
    total = whole_epochs * -(-len(subset) // args.batch_size)
    started = time.perf_counter()
    load_start = os.getloadavg()[0]

    def report(step: int, steps: int, terms: dict) -> None:
        if step == 1 or step % 10 == 0 or step == steps:
            elapsed = time.perf_counter() - started
            print(f"[{part}] step {step}/{steps} loss {sum(terms.values()):.3f} "
                  + " ".join(f"{k.removeprefix('loss_')}={v:.3f}" for k, v in terms.items())
                  + f"  {elapsed:.0f}s", flush=True)

    losses = training.train_detector(model, subset, epochs=whole_epochs, batch_size=args.batch_size, lr=args.lr,
                                device="cpu", seed=args.seed, train_size=args.train_size, on_step=report,
                                autocast_dtype=args.train_autocast_dtype)
    seconds = time.perf_counter() - started
    if args.save_models:
        net.save_detector(args.save_models / f"detector_{part}.pt", model)
    return model, {
        "model_args": net.detector_args(model),
        "train_size": args.train_size,
        "epochs": whole_epochs,
        "images_per_epoch": len(subset),
        "batch_size": args.batch_size,
        "steps": total,
        "lr": args.lr,
        "optimizer": "AdamW wd 1e-4, warm-up + cosine, grad-norm clip 10",
        "scale_jitter": list(training.SCALE_JITTER),
        "seed": args.seed,
        "precision": precision.name(args.train_autocast_dtype),
        "detection_precision": precision.name(args.autocast_dtype),
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, len(losses)), 2),
        "first_loss": round(losses[0], 4),
        "last_10_loss_mean": round(float(np.mean(losses[-10:])), 4),
        "load_average_start_end": [round(load_start, 2), round(os.getloadavg()[0], 2)],
        "quick": args.quick,
    }


def average_precision(truth_boxes, detections, iou_threshold: float) -> float:
    """VOC all-point interpolated AP of one class over a set of images."""
    records = [(d.score, i, d.box) for i, found in enumerate(detections) for d in found]
    records.sort(key=lambda r: -r[0])
    total = sum(len(b) for b in truth_boxes)
    if total == 0:
        return float("nan")
    used = [np.zeros(len(b), bool) for b in truth_boxes]
    hits = []
    for _, image, box in records:
        overlaps = [box_iou(box, t) for t in truth_boxes[image]]
        best = int(np.argmax(overlaps)) if overlaps else -1
        if best >= 0 and overlaps[best] >= iou_threshold and not used[image][best]:
            used[image][best] = True
            hits.append(1)
        else:
            hits.append(0)
    hits = np.array(hits, float)
    recall = np.cumsum(hits) / total
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    recall = np.concatenate([[0.0], recall, [1.0]])
    precision = np.concatenate([[0.0], precision, [0.0]])
    precision = np.maximum.accumulate(precision[::-1])[::-1]
    steps = np.flatnonzero(recall[1:] != recall[:-1])
    return float(np.sum((recall[steps + 1] - recall[steps]) * precision[steps + 1]))


def print_table(results: dict) -> None:
    rows = []
    a = results.get("a_bccd_annotated")
    if a:
        rows += [("BCCD box AP50 (annotated)", a["box_ap50"], TARGETS["bccd_box_ap50"]),
                 ("BCCD whole-cell mask IoU per WBC", a["mask_iou_per_wbc"], TARGETS["bccd_mask_iou"])]
    b = results.get("b_pbc_pseudo_to_zheng")
    if b:
        rows += [("Zheng detection rate (PBC pseudo)", b["detection_rate_central_box_iou_0.5"],
                  TARGETS["zheng_detection_rate"]),
                 ("Zheng whole-cell mask IoU (PBC pseudo)", b["mean_mask_iou_all_images"], TARGETS["zheng_mask_iou"]),
                 ("Zheng IoU of pseudo_instances alone", b["pseudo_instances_on_zheng"]["mean_mask_iou_central"], None)]
    print(f"{'metric':44s} {'value':>8s} {'target':>8s}")
    for name, value, target in rows:
        shown = "-" if value is None else f"{value:.3f}"
        print(f"{name:44s} {shown:>8s} {'' if target is None else f'>= {target:.2f}':>8s}")
    for key in ("a_bccd_annotated", "b_pbc_pseudo_to_zheng"):
        if key in results:
            t = results[key]["training"]
            print(f"{key}: {t['steps']} steps x {t['batch_size']} views of {t['train_size']} px, "
                  f"{t['seconds']:.0f} s training ({t['seconds_per_step']} s/step)")


if __name__ == "__main__":
    sys.exit(main())
