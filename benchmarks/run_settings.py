"""What ``benchmarks/run.py`` measures and at which sizes: shared by the run and its report."""

from __future__ import annotations

import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PARTS = ("peak", "detect", "train", "extract", "evaluate", "memory")
SELECTABLE = ("detect", "train", "extract", "evaluate", "memory")  # peak and machine always run
DEFAULT_OUT = ROOT / "docs" / "benchmarks.md"
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "aecfe-benchmarks-cache"

IMAGE_HW = (363, 360)  # PBC (Acevedo) image size, height x width
EXTRACT_BATCH = 512
EVALUATE_CELLS = 10_000
EVALUATE_DIMENSION = 50
MEMORY_IMAGE_SIZE = 128
MEMORY_DOMAIN = "lab_a"
MEMORY_SEED = 0
FLAT_LIMIT = 1.2

# The two configurations compared in every stage.
DEFAULT_TRAIN = {"image_size": 32, "width": 0.5, "batch": 128}
PAPER_TRAIN = {"image_size": 128, "width": 1.0, "batch": 500}

SETTINGS = {
    # matmul repetitions, detect rounds and images per round (default, paper), train timed batches,
    # extract batches per configuration, evaluate repetitions, memory sizes (images)
    "quick": {"matmul_reps": 5, "detect_rounds": 1, "detect_default": 8, "detect_paper": 2,
              "train_timed": 1, "train_sandwich": False, "extract_batches": 4, "evaluate_reps": 1,
              "memory_sizes": (200, 1_000)},
    "full": {"matmul_reps": 10, "detect_rounds": 3, "detect_default": 16, "detect_paper": 3,
             "train_timed": 3, "train_sandwich": True, "extract_batches": 20, "evaluate_reps": 3,
             "memory_sizes": (1_000, 10_000)},
}

# The memory part's detector: trained once on the synthetic cells (cached), then loaded by every measured
# run. A detector trained for a few steps only scores every cell near 0, so at the default score
# threshold it finds nothing, and at threshold 0 every image sends its 50 proposals through the mask head:
# a per-image cost unlike real use that makes 10,000 images infeasible on 2 cores.
DETECTOR_TRAINING = {"per_class": 11, "train_images": 64, "train_epochs": 2, "train_steps": 0}
