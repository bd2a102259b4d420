"""Detection speed on this machine: the CPU default detector against the paper-sized configuration.

Measures images/s of ``detector.detect`` (white balance, Mask R-CNN, mask-branch feature capture) on
360x363 images, the Acevedo/PBC size, for

* the CPU default: ``build_detector()`` (ResNet-18 FPN at 256 px), and
* torchvision ``maskrcnn_resnet50_fpn`` at 900 px (the paper used ResNet-101 FPN at 900-1024 px),

in the same run, and prints the ratio and each one's forward FLOPs per image. Untrained weights are
used; each image carries exactly one detection through the mask branch (as a single-cell image does), so
the work is that of real use. Target: the CPU default detects >= 4 images/s on a 2-core CPU.

    python benchmarks/detect_speed.py [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin: spinning threads waiting for a descheduled partner make a
# shared machine many times slower. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aecfe_cli import detector as net  # noqa: E402
from aecfe_cli.images import load_rgb  # noqa: E402
from aecfe_cli.io import write_json  # noqa: E402

PBC = ROOT / ".." / "shared" / "data" / "pbc" / "PBC_dataset_normal_DIB"
IMAGE_HW = (363, 360)
TARGET_IMAGES_PER_SECOND = 4.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images (noisier numbers)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images = sample_images(32)
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    paper = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, min_size=900, max_size=900)
    candidates = [
        ("CPU default: build_detector() resnet18_fpn @256", net.build_detector(), 8 if args.quick else 32),
        ("torchvision maskrcnn_resnet50_fpn @900", paper, 2 if args.quick else 6),
    ]
    rows = []
    for name, model, count in candidates:
        model.eval()
        model.roi_heads.detections_per_img = 1  # one cell per image, whatever the untrained scores
        flops = net.detector_flops(model, IMAGE_HW)
        net.detect(model, images[:1], "cpu", score_threshold=0.0)  # warm-up: allocator, kernels
        started = time.perf_counter()
        found = net.detect(model, images[:count], "cpu", score_threshold=0.0)
        seconds = time.perf_counter() - started
        assert all(len(f) == 1 for f in found), "each image must carry exactly one detection"
        rows.append({"model": name, "images": count, "seconds": round(seconds, 2),
                     "images_per_second": round(count / seconds, 2), "gflops_per_image": round(flops / 1e9, 1)})
    ratio = rows[0]["images_per_second"] / rows[1]["images_per_second"]
    print(f"torch threads {torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average {os.getloadavg()[0]:.2f}, images {IMAGE_HW[1]}x{IMAGE_HW[0]}")
    print(f"{'model':50s} {'images/s':>9s} {'GFLOP/img':>10s} {'images':>7s}")
    for row in rows:
        print(f"{row['model']:50s} {row['images_per_second']:9.2f} {row['gflops_per_image']:10.1f} {row['images']:7d}")
    verdict = "meets" if rows[0]["images_per_second"] >= TARGET_IMAGES_PER_SECOND else "misses"
    print(f"speed-up of the CPU default: {ratio:.1f}x; it {verdict} the {TARGET_IMAGES_PER_SECOND} images/s target")
    if args.json:
        write_json(args.json, {"rows": rows, "ratio": round(ratio, 2), "threads": torch.get_num_threads(),
                               "load_average": round(os.getloadavg()[0], 2), "quick": args.quick})
    return 0


def sample_images(count: int) -> list[np.ndarray]:
    """PBC images when the shared data is present, else seeded synthetic 360x363 smears."""
    paths = sorted(PBC.glob("*/*.jpg"))[:: max(1, len(list(PBC.glob("*/*.jpg"))) // count)] if PBC.is_dir() else []
    images = [load_rgb(p) for p in paths[:count]]
    images = [image for image in images if image.shape[:2] == IMAGE_HW]
    rng = np.random.default_rng(0)
    while len(images) < count:
        ys, xs = np.mgrid[0:IMAGE_HW[0], 0:IMAGE_HW[1]]
        image = rng.normal(225, 4, (*IMAGE_HW, 3))
        image[(xs - 180) ** 2 + (ys - 181) ** 2 < 60 ** 2] = (110, 60, 150)
        images.append(image.clip(0, 255).astype(np.uint8))
    return images


if __name__ == "__main__":
    sys.exit(main())
