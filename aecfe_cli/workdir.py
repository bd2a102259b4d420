"""The working directory: where each stage's artefacts live, their manifests, staleness and the lock.

A stage is up to date when its manifest's fingerprint (stage, code version, resolved config section,
seed and the digests of its inputs) equals the fingerprint the current inputs give, and its outputs are
still the files the manifest describes. Downstream stages take upstream *output digests* as inputs, so
retraining the detector makes detections stale, which makes the model stale, and so on.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import time
from pathlib import Path
from typing import Iterator, Optional

from . import __version__
from .errors import StageError, UserError
from .io import read_json, sha256_file, write_json

MANIFEST = "manifest.json"


class Workdir:
    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def detector(self) -> Path:
        return self.root / "detector"

    @property
    def train(self) -> Path:
        return self.root / "train"

    def detect(self, dataset: str) -> Path:
        return self.root / "detect" / dataset

    def extract(self, dataset: str) -> Path:
        return self.root / "extract" / dataset

    def evaluate(self, source: str) -> Path:
        return self.root / "evaluate" / source

    def predict(self, source: str, dataset: str) -> Path:
        return self.root / "predict" / source / dataset

    @property
    def registry_path(self) -> Path:
        return self.root / "datasets.json"

    def known_datasets(self) -> dict:
        """Datasets earlier commands resolved here (name -> spec), so later ones can name them."""
        return read_json(self.registry_path) if self.registry_path.is_file() else {}

    def register(self, spec: dict) -> None:
        known = self.known_datasets()
        if known.get(spec["name"]) != spec:
            known[spec["name"]] = spec
            write_json(self.registry_path, known)

    def detected(self) -> list[str]:
        """Datasets with finished detections, in name order."""
        base = self.root / "detect"
        if not base.is_dir():
            return []
        return sorted(d.name for d in base.iterdir() if (d / MANIFEST).is_file())

    def prepare(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise UserError(f"{self.root}: working directory is not writable ({exc.strerror}); choose another --workdir") from exc

    @contextlib.contextmanager
    def lock(self, shared: bool = False) -> Iterator[None]:
        """One command at a time per workdir: a second one refuses instead of corrupting artefacts.
        Shard workers of ``detect --shard`` hold it shared, so several can run together."""
        self.prepare()
        handle = open(self.root / ".lock", "a+")
        try:
            try:
                fcntl.flock(handle, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.seek(0)
                holder = handle.read().strip() or "another aecfe process"
                raise StageError(
                    f"{self.root}: in use by {holder}; wait for it to finish or use another --workdir"
                ) from None
            if not shared:
                handle.seek(0)
                handle.truncate()
                handle.write(f"aecfe pid {os.getpid()}")
                handle.flush()
            yield
        finally:
            handle.close()

    def begin_setup(self) -> None:
        """Shard workers set up (detector, chunk folder) one at a time; the others wait here."""
        self._setup_handle = open(self.root / ".setup.lock", "a+")
        fcntl.flock(self._setup_handle, fcntl.LOCK_EX)

    def end_setup(self) -> None:
        self._setup_handle.close()


# What each fingerprint computed in this process was made of (digest -> payload). write_manifest records
# it, so ``status`` can later name the setting or input that changed, not only say "stale". Kept here
# rather than on the returned value: fingerprints travel into checkpoints, which must stay plain data.
_MADE_WITH: dict[str, dict] = {}


def fingerprint(stage: str, config: dict, seed: Optional[int], inputs: dict[str, str],
                added_later: Optional[dict] = None) -> str:
    """Digest of what a stage's output was made from. ``added_later`` maps settings added after workdirs
    already held this stage to the value those workdirs were made with: while a setting holds that value
    it is left out, so the earlier outputs stay current; any other value names it and makes them stale."""
    config = {key: value for key, value in config.items()
              if not (added_later and key in added_later and value == added_later[key])}
    payload = json.dumps(
        {"stage": stage, "version": __version__, "config": config, "seed": seed, "inputs": inputs},
        sort_keys=True,
        default=str,
    )
    value = hashlib.sha256(payload.encode()).hexdigest()
    _MADE_WITH[value] = json.loads(payload)
    return value


def read_manifest(folder: Path) -> Optional[dict]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        return read_json(path)
    except (ValueError, OSError):
        return None


def output_digest(manifest: dict) -> str:
    """One digest standing for all outputs of a stage: what downstream stages record as their input."""
    joined = "".join(f"{name}:{item['sha256']}\n" for name, item in sorted(manifest["outputs"].items()))
    return hashlib.sha256(joined.encode()).hexdigest()


def state(folder: Path, expected_fingerprint: Optional[str]) -> str:
    """'done', 'stale' or 'missing' for a stage folder; None as fingerprint checks files only."""
    manifest = read_manifest(folder)
    if manifest is None:
        return "missing"
    if _changed_outputs(folder, manifest):
        return "stale"
    if expected_fingerprint is not None and manifest.get("fingerprint") != expected_fingerprint:
        return "stale"
    return "done"


def _changed_outputs(folder: Path, manifest: dict) -> list[str]:
    """Outputs missing, or of another size than the manifest says (a cheap check; no hashing)."""
    changed = []
    for name, item in manifest["outputs"].items():
        path = Path(folder) / name
        if not path.is_file() or path.stat().st_size != item["size"]:
            changed.append(name)
    return changed


# The config section a stage's settings come from, where its name differs.
CONFIG_SECTION = {"detector": "detect"}
_UNSET = object()  # a key the older manifest did not have


def what_changed(folder: Path, expected: Optional[str]) -> list[str]:
    """Why the stage in ``folder`` is stale: each changed setting as ``section.key old -> new``, the
    seed, the code version, each changed input, or an output file that changed on disk."""
    manifest = read_manifest(folder)
    if manifest is None:
        return []
    reasons = [f"{name} changed on disk" for name in _changed_outputs(folder, manifest)]
    if expected is None or manifest.get("fingerprint") == expected:
        return reasons
    now = _MADE_WITH.get(expected)
    then = manifest.get("made_with") or {  # a manifest written before they recorded made_with
        "version": manifest.get("versions", {}).get("aecfe"), "config": manifest.get("config", {}),
        "seed": manifest.get("seed")}
    if now is not None:
        reasons += _differences(then, now)
    return reasons or ["its inputs changed"]


def _differences(then: dict, now: dict) -> list[str]:
    section = CONFIG_SECTION.get(now["stage"], now["stage"])
    found = [f"{section}.{key} {_shown(then['config'].get(key, _UNSET))} -> {_shown(value)}"
             for key, value in now["config"].items() if then["config"].get(key, _UNSET) != value]
    if then.get("seed") != now["seed"]:
        found.append(f"runtime.seed {_shown(then.get('seed'))} -> {_shown(now['seed'])}")
    if then.get("version") != now["version"]:
        found.append(f"aecfe version {then.get('version')} -> {now['version']}")
    if "inputs" in then:
        found += [f"input {key} changed" for key in sorted({*then["inputs"], *now["inputs"]})
                  if then["inputs"].get(key) != now["inputs"].get(key)]
    return found


def _shown(value) -> str:
    if value is _UNSET:
        return "(unset)"
    return value if isinstance(value, str) else json.dumps(value)


def library_versions() -> dict:
    import numpy
    import sklearn
    import torch
    import torchvision

    return {
        "aecfe": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "scikit-learn": sklearn.__version__,
    }


def write_manifest(
    folder: Path,
    stage: str,
    *,
    fingerprint_value: str,
    config: dict,
    seed: Optional[int],
    device: str,
    inputs: dict[str, str],
    outputs: list[str],
    counts: dict,
    timings: dict,
    extra: Optional[dict] = None,
) -> dict:
    """Write ``manifest.json`` last, so a folder with a manifest is a finished stage."""
    folder = Path(folder)
    manifest = {
        "stage": stage,
        "fingerprint": fingerprint_value,
        "versions": library_versions(),
        "config": config,
        "seed": seed,
        "device": device,
        "inputs": inputs,
        "outputs": {
            name: {"sha256": sha256_file(folder / name), "size": (folder / name).stat().st_size} for name in outputs
        },
        "counts": counts,
        "timings": timings,
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if fingerprint_value in _MADE_WITH:
        manifest["made_with"] = _MADE_WITH[fingerprint_value]
    if extra:
        manifest.update(extra)
    write_json(folder / MANIFEST, manifest)
    return manifest


def invalidate(folder: Path) -> None:
    """Remove a stage's manifest first, so a half-rewritten folder never looks finished, and the
    temporary files a killed process (SIGKILL skips every clean-up) may have left behind."""
    folder = Path(folder)
    (folder / MANIFEST).unlink(missing_ok=True)
    if folder.is_dir():
        for leftover in folder.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)
