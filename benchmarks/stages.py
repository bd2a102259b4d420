"""Seconds each pipeline stage of a finished workdir took, as the stages' own manifests record them."""

from __future__ import annotations

from pathlib import Path

from aecfe_cli.io import read_json


def stage_seconds(work: Path, names: list[str]) -> dict:
    """Detector and autoencoder training, and per dataset detect, extract and (where run) evaluate."""

    def seconds(folder: Path, key: str = "seconds"):
        return read_json(folder / "manifest.json")["timings"].get(key)

    return {
        "detector": seconds(work / "detector"),
        "detect": {n: seconds(work / "detect" / n) for n in names},
        # Training resumes from its last epoch, so its manifest times only the run that finished it.
        "train": seconds(work / "train", "seconds_this_run"),
        "extract": {n: seconds(work / "extract" / n) for n in names},
        "evaluate": {n: seconds(work / "evaluate" / n) for n in names if (work / "evaluate" / n).is_dir()},
    }
