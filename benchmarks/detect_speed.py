"""Detection speed on this machine: the CPU default detector against the paper-sized configuration.

Measures images/s of ``detector.detect`` (white balance, Mask R-CNN, mask-branch feature capture) on
360x363 images, the Acevedo/PBC size, for

* the CPU default: ``build_detector()`` (ResNet-18 FPN at 256 px), and
* torchvision ``maskrcnn_resnet50_fpn`` at 900 px (the paper used ResNet-101 FPN at 900-1024 px),

in the same run, and prints the ratio and each one's forward FLOPs per image. Untrained weights are
used; each image carries exactly one detection through the mask branch (as a single-cell image does), so
the work is that of real use. Target: the CPU default detects >= 4 images/s on a 2-core CPU.

The measurement is benchmarks/run.py's detect part (interleaved rounds, the same sizes); this script
runs it alone, on PBC images when ../shared/data holds them, else on run.py's synthetic cells.

    python benchmarks/detect_speed.py [--quick] [--threads N] [--json PATH]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import run  # sets OMP_WAIT_POLICY before importing torch, and puts the project on sys.path
import torch

from aecfe_cli.images import load_rgb
from aecfe_cli.io import write_json

PBC = run.ROOT / ".." / "shared" / "data" / "pbc" / "PBC_dataset_normal_DIB"
TARGET_IMAGES_PER_SECOND = 4.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds (noisier numbers)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    settings = run.SETTINGS["quick" if args.quick else "full"]
    images = pbc_images(max(settings["detect_default"], settings["detect_paper"]))
    result = run.bench_detect(settings, images or None)
    ratio = result["default"]["rate"] / result["paper"]["rate"]
    print(f"images: {'PBC sample' if images else 'synthetic cells'} {run.IMAGE_HW[1]}x{run.IMAGE_HW[0]}; torch threads "
          f"{torch.get_num_threads()}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}, load average "
          f"{os.getloadavg()[0]:.2f}")
    verdict = "meets" if result["default"]["rate"] >= TARGET_IMAGES_PER_SECOND else "misses"
    print(f"speed-up of the CPU default: {ratio:.1f}x; it {verdict} the {TARGET_IMAGES_PER_SECOND} images/s target")
    if args.json:
        write_json(args.json, {**result, "ratio": round(ratio, 2), "threads": torch.get_num_threads(),
                               "images_source": "pbc" if images else "synthetic",
                               "load_average": round(os.getloadavg()[0], 2), "quick": args.quick})
    return 0


def pbc_images(count: int) -> list:
    """``count`` PBC images of the usual 360x363 size spread over the classes; [] without the shared data."""
    paths = sorted(PBC.glob("*/*.jpg")) if PBC.is_dir() else []
    # Twice as many candidates as needed, spread over the class folders: a few PBC images are 360x360.
    candidates = (load_rgb(p) for p in paths[:: max(1, len(paths) // (2 * count))])
    images = [image for image in candidates if image.shape[:2] == run.IMAGE_HW][:count]
    return images if len(images) == count else []


if __name__ == "__main__":
    sys.exit(main())
