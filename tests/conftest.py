"""Shared fixtures: tiny synthetic datasets and a way to run the CLI as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]

if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    # Parallel workers share the cores: one thread each (tests and the CLI processes they start honour
    # OMP_NUM_THREADS), since busy-waiting OpenMP threads of several processes on the same cores slow
    # every one of them down many times over.
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_collection_modifyitems(items):
    """Slow end-to-end tests first, the longest (``slow(minutes=N)``) before the others, so that parallel
    workers start on them and the fast ones fill the gaps instead of one long test running alone at the
    end. Stable: the order within each group is kept."""
    def order(item):
        slow = item.get_closest_marker("slow")
        return (slow is None, -(slow.kwargs.get("minutes", 1) if slow else 0))

    items.sort(key=order)


class CreatesMarkerWhenUnpickled:
    """Unpickling this calls open(marker, "w"): a stand-in for code hidden in a checkpoint or weights file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def drawn_cell(nucleus_radius: float = 9, lobes: int = 1, side: int = 64, scale: float = 1.0,
               gain=(1.0, 1.0, 1.0), seed: int = 0, cytoplasm=(200, 170, 205)) -> np.ndarray:
    """(3, side, side) uint8: a stained white cell (radius 20 * scale) at the centre of a pale slide, with
    a round nucleus or ``lobes`` lobes on a ring, and a little sensor noise; ``gain`` multiplies the light
    each channel lets through, as another lab's stain or lamp would; ``cytoplasm``: its RGB (pale lilac by
    default, as a neutrophil's)."""
    rows, cols = np.mgrid[:side, :side] + 0.5 - side / 2
    image = np.empty((side, side, 3))
    image[:] = (235, 228, 215)
    image[rows**2 + cols**2 <= (20 * scale) ** 2] = cytoplasm
    if lobes == 1:
        centres = [(0.0, 0.0)]
    else:
        ring = 9 * scale
        centres = [(ring * np.sin(2 * np.pi * k / lobes), ring * np.cos(2 * np.pi * k / lobes)) for k in range(lobes)]
    for y, x in centres:
        image[(rows - y) ** 2 + (cols - x) ** 2 <= (nucleus_radius * scale) ** 2] = (95, 50, 135)
    image = (image + np.random.default_rng(seed).normal(0, 3, image.shape)) * np.asarray(gain)
    return np.clip(np.round(image), 0, 255).astype(np.uint8).transpose(2, 0, 1)


def run_cli(*args: str, cwd: Path, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m aecfe_cli ARGS`` in a subprocess: real exit codes, real stdout/stderr."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop("AECFE_WORKDIR", None)
    return subprocess.run([sys.executable, "-m", "aecfe_cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def tiny_cells(tmp_path_factory) -> dict[str, Path]:
    """Two synthetic labs, 6 cells per class at 64 px: the smallest realistic input."""
    from aecfe_cli import synth

    root = tmp_path_factory.mktemp("cells")
    return {domain: _write(synth, root / domain, domain) for domain in ("lab_a", "lab_b")}


def _write(synth, folder: Path, domain: str) -> Path:
    synth.write_cell_dataset(folder, domain, per_class=6, seed=0, size=64)
    return folder


TINY_CONFIG = """\
detect:
  min_size: 64
  max_size: 64
  crop_size: 32
  score_threshold: 0.0
  train_images: 8
  train_epochs: 1
  train_steps: 0
  train_batch_size: 4
  train_lr: 0.001
  chunk_images: 8
  train_precision: fp32  # as train.precision below: the same numbers on every machine
train:
  image_size: 32
  width: 0.25
  epochs: 2
  batch_size: 16
  sample_every: 1
  # "auto" would pick bfloat16 on CPUs with AMX or AVX512-BF16 only: the tiny pipelines must give the same
  # numbers on every machine the suite runs on. The bfloat16 path has its own tests and `aecfe demo`'s.
  precision: fp32
evaluate:
  baselines: true
"""


@pytest.fixture
def tiny_project(tmp_path, tiny_cells) -> Path:
    """An empty working folder with two small synthetic labs and a tiny-model aecfe.yaml."""
    import shutil

    for domain, folder in tiny_cells.items():
        shutil.copytree(folder, tmp_path / domain)
    (tmp_path / "aecfe.yaml").write_text(TINY_CONFIG)
    return tmp_path


@pytest.fixture(scope="session")
def finished_project(tmp_path_factory, tiny_cells):
    """One full `aecfe run` over two tiny labs, shared by the tests that only read or copy it."""
    import shutil

    root = tmp_path_factory.mktemp("finished")
    for domain, folder in tiny_cells.items():
        shutil.copytree(folder, root / domain)
    (root / "aecfe.yaml").write_text(TINY_CONFIG)
    result = run_cli("run", "--data", "lab_a", "--data", "lab_b", cwd=root)
    assert result.returncode == 0, result.stderr
    return root, result


def copy_project(project: Path, tmp_path: Path) -> Path:
    """A copy of a finished project whose workdir registry points at the copy's datasets."""
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(project, target, symlinks=True)
    # The registry stores absolute dataset roots: point them at the copy.
    registry = target / "aecfe-work" / "datasets.json"
    registry.write_text(registry.read_text().replace(str(project), str(target)))
    return target
