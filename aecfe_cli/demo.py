"""The embedded default: the whole pipeline on synthetic labs, so every command runs on a fresh machine.

Two synthetic labs (different stain, background, light, blur, scale) stand in for two hospitals; the
demo trains one autoencoder on both and scores a classifier trained on each lab on the other.
"""

from __future__ import annotations

from pathlib import Path

from . import synth
from .pipeline import Session, ensure_model, ensure_report

DEMO_DOMAINS = ("lab_a", "lab_b")
DEMO_IMAGE_SIZE = 128
# Small enough to finish within 10 minutes on a 2-core CPU (README); the paper's settings are one config away.
DEMO_SETTINGS = {
    "detect": {"min_size": 128, "max_size": 128, "crop_size": 64, "train_images": 96, "train_epochs": 3, "train_steps": 0},
    "train": {"image_size": 32, "width": 0.5, "epochs": 10, "batch_size": 64},
}


def demo_data(root: Path, per_class: int, seed: int) -> list[Path]:
    """Write each synthetic lab once; an existing lab folder with the same settings is reused."""
    folders = []
    for domain in DEMO_DOMAINS:
        folder = root / "data" / f"n{per_class}-seed{seed}" / domain
        if not (folder / ".complete").is_file():
            synth.write_cell_dataset(folder, domain, per_class, seed, size=DEMO_IMAGE_SIZE)
            (folder / ".complete").write_text("")
        folders.append(folder)
    return folders


def run_demo(session: Session, per_class: int) -> list[dict]:
    session.reporter.info(f"demo: synthetic labs {', '.join(DEMO_DOMAINS)} in {session.workdir.root / 'data'}")
    folders = demo_data(session.workdir.root, per_class, session.seed)
    datasets = [session.dataset(str(folder)) for folder in folders]
    ensure_model(session, datasets)
    return [ensure_report(session, [source], [target]) for source in datasets for target in datasets if target is not source]
