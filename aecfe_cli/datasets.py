"""Datasets: resolve a name or path, detect its layout, list its images with their labels.

Layouts: ``matek`` (``<CODE>/<CODE>_NNNN.tiff``), ``acevedo`` (class folders, subtype from the file-name
prefix), ``int20`` (numbered class folders, class map from the config), ``folder`` (any class folders)
and ``csv`` (``path,label`` rows). Every image gets one label on the shared vocabulary (labels.py).
"""

from __future__ import annotations

import csv
import difflib
import hashlib
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import labels as vocab
from .config import Config, DatasetConfig, env_root
from .errors import UserError
from .images import is_image_file

LAYOUTS = ("matek", "acevedo", "int20", "folder", "csv")
BUILTIN = {"matek": "matek", "acevedo": "acevedo", "int20": "int20"}
UNLABELLED = "unlabelled"


@dataclass
class ImageRecord:
    path: Path  # absolute
    rel: str  # relative to the dataset root, posix separators
    original: str  # the dataset's own class name (with subtype where it has one)
    label: str  # on the shared vocabulary, or the original name when unmapped


@dataclass
class Dataset:
    name: str
    layout: str
    root: Path
    records: list[ImageRecord]
    skipped: list[str] = field(default_factory=list)  # entries that are not usable images, with why
    _fingerprint: Optional[str] = field(default=None, init=False, repr=False, compare=False)

    def counts(self) -> list[tuple[str, str, str, int]]:
        """(original name, fine class or '-', coarse class, count) per class, sorted by original name."""
        tally = Counter((r.original, r.label) for r in self.records)
        rows = []
        for (original, label), count in sorted(tally.items()):
            fine = label if vocab.is_fine(label) else "-"
            rows.append((original, fine, vocab.coarse_of(label), count))
        return rows

    def class_rows(self) -> list[tuple[str, str, str, str, int]]:
        """(class, subtype, fine, coarse, images) per subtype, as ``datasets`` prints them; a class split
        into several subtypes (PBC's ig, neutrophil) ends with a ``total`` row holding the class's count."""
        rows: list[tuple[str, str, str, str, int]] = []
        by_class: dict[str, list] = {}
        for original, fine, coarse, count in self.counts():
            name, _, subtype = original.partition("/")
            by_class.setdefault(name, []).append((name, subtype, fine, coarse, count))
        for name, subtypes in by_class.items():
            rows += subtypes
            if len(subtypes) > 1:
                coarse = {row[3] for row in subtypes}
                rows.append((name, "total", "", coarse.pop() if len(coarse) == 1 else "", sum(r[4] for r in subtypes)))
        return rows

    def fingerprint(self) -> str:
        """Digest of the image list (path, size, mtime): changes when files do. It stats every file, so
        it is computed once per command (the stages of one command ask for it several times)."""
        if self._fingerprint is None:
            digest = hashlib.sha256()
            for record in self.records:
                stat = record.path.stat()
                digest.update(f"{record.rel}\0{record.label}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            self._fingerprint = digest.hexdigest()
        return self._fingerprint

    def spec(self) -> dict:
        """What it takes to resolve this dataset again in a later command (stored in the workdir)."""
        return {"name": self.name, "layout": self.layout, "root": str(self.root)}


def resolve(spec: str, config: Config, layout: Optional[str] = None, known: Optional[dict] = None) -> Dataset:
    """Resolve ``--data`` (a registered name or a path) into a scanned Dataset.

    ``known`` holds datasets an earlier command registered in the workdir (name -> spec).
    """
    if layout is not None and layout not in LAYOUTS:
        raise UserError(f"unknown layout '{layout}'{_suggest(layout, LAYOUTS)}")
    known = known or {}
    if spec in config.datasets or spec in BUILTIN:
        entry = config.datasets.get(spec) or DatasetConfig(layout=BUILTIN[spec])
        root = env_root(spec) or entry.root
        if not root:
            raise UserError(
                f"dataset '{spec}' has no root: set datasets.{spec}.root in the config "
                f"or the environment variable AECFE_{spec.upper().replace('-', '_')}_ROOT"
            )
        return scan(spec, Path(root), layout or entry.layout, entry)
    if spec in known:
        entry = DatasetConfig(layout=known[spec]["layout"])
        return scan(spec, Path(known[spec]["root"]), layout or entry.layout, entry)
    path = Path(spec)
    if path.exists():
        path = path.resolve()
        name = path.stem if path.is_file() else path.name
        detected = layout or detect_layout(path)
        entry = DatasetConfig(layout=detected, csv=path.name if path.is_file() else None)
        return scan(name, path.parent if path.is_file() else path, detected, entry)
    if os.sep in spec or spec.startswith("."):
        raise UserError(f"{spec}: no such file or folder; pass an existing dataset folder or CSV to --data")
    names = sorted({*BUILTIN, *config.datasets, *known})
    raise UserError(
        f"unknown dataset '{spec}'{_suggest(spec, names)}; register it under datasets: in the config "
        f"or pass a folder path"
    )


def _suggest(name: str, valid) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f" (known: {', '.join(valid) or 'none'})"


def detect_layout(path: Path) -> str:
    """Guess the layout of a folder from its class-folder names and file-name prefixes."""
    if path.is_file():
        if path.suffix.lower() == ".csv":
            return "csv"
        raise UserError(f"{path}: a dataset is a folder of class folders or a .csv file of path,label rows")
    folders = [d.name for d in _subfolders(path)]
    if folders and sum(d in vocab.MATEK_CODES for d in folders) >= max(1, len(folders) // 2):
        return "matek"
    if folders and all(re.match(r"^\d+[-_]", d) for d in folders):
        return "int20"
    if folders and _looks_like_acevedo(path, folders):
        return "acevedo"
    return "folder"


def _looks_like_acevedo(path: Path, folders: list[str]) -> bool:
    for folder in folders:
        for file in _images_in(path / folder):
            prefix = file.name.split("_", 1)[0].upper()
            if "_" in file.name and prefix in vocab.ACEVEDO_PREFIXES:
                return True
            break
    return False


def _subfolders(path: Path) -> list[Path]:
    try:
        return sorted(d for d in path.iterdir() if d.is_dir() and not d.name.startswith("."))
    except PermissionError as exc:
        raise UserError(f"{path}: cannot be read (permission denied); check its permissions") from exc


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p) and not p.name.startswith("."))


def scan(name: str, root: Path, layout: str, entry: DatasetConfig) -> Dataset:
    if layout not in LAYOUTS:
        raise UserError(f"dataset '{name}': unknown layout '{layout}'{_suggest(layout, LAYOUTS)}")
    root = Path(root)
    if not root.exists():
        raise UserError(f"{root}: dataset '{name}' not found; check its root in the config or the path given")
    if layout == "csv":
        dataset = _scan_csv(name, root, entry)
    else:
        if not root.is_dir():
            raise UserError(f"{root}: layout '{layout}' needs a folder of class folders")
        dataset = _scan_folders(name, root, layout, entry)
    if not dataset.records:
        raise UserError(f"{root}: dataset '{name}' holds no images (.tif .tiff .jpg .jpeg .png .bmp); check the folder")
    return dataset


def _scan_folders(name: str, root: Path, layout: str, entry: DatasetConfig) -> Dataset:
    records: list[ImageRecord] = []
    skipped: list[str] = []
    folders = _subfolders(root)
    loose = _images_in(root)
    if not folders and loose:
        # A flat folder of images (smear fields, unlabelled cells): one unlabelled class.
        folders, loose = [root], []
    for folder in folders:
        files, bad = _walk_images(folder)
        skipped.extend(f"{p.relative_to(root).as_posix()}: {why}" for p, why in bad)
        for file in files:
            original = UNLABELLED if folder == root else folder.name
            original, label = _label_for(layout, original, file.name, entry)
            records.append(ImageRecord(file, file.relative_to(root).as_posix(), original, label))
    skipped.extend(f"{p.name}: image outside any class folder" for p in loose)
    return Dataset(name, layout, root, records, skipped)


def _walk_images(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Images below a class folder (sub-folders included), without following symlink loops."""
    files, bad = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            path = Path(dirpath) / filename
            if filename.startswith(".") or not is_image_file(path):
                continue
            try:
                path.resolve(strict=True)
            except (OSError, RuntimeError):
                bad.append((path, "broken or looping symbolic link"))
                continue
            files.append(path)
    return files, bad


def _label_for(layout: str, folder: str, filename: str, entry: DatasetConfig) -> tuple[str, str]:
    """(original name, vocabulary label) of one image."""
    if layout == "matek":
        code = folder.upper()
        return code, entry.label_map.get(code, vocab.MATEK_CODES.get(code, code))
    if layout == "acevedo":
        prefix = filename.split("_", 1)[0].upper() if "_" in filename else ""
        if prefix in vocab.ACEVEDO_PREFIXES:
            original = f"{folder}/{prefix}"
            return original, entry.label_map.get(original, vocab.ACEVEDO_PREFIXES[prefix])
        return folder, entry.label_map.get(folder, vocab.normalise(folder))
    if layout == "int20":
        return folder, vocab.normalise(str(entry.class_map.get(folder, entry.label_map.get(folder, folder))))
    return folder, vocab.normalise(str(entry.label_map.get(folder, folder)))


def _scan_csv(name: str, root: Path, entry: DatasetConfig) -> Dataset:
    if root.is_file():
        csv_path, root = root, root.parent
    elif entry.csv:
        csv_path = root / entry.csv
    else:
        candidates = sorted(root.glob("*.csv"))
        if len(candidates) != 1:
            raise UserError(f"{root}: layout csv needs datasets.{name}.csv naming the CSV file")
        csv_path = candidates[0]
    if not csv_path.is_file():
        raise UserError(f"{csv_path}: CSV file not found; fix datasets.{name}.csv")
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            rows = list(csv.DictReader(handle))
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"{csv_path}: not a readable CSV file ({exc})") from exc
    columns = set(rows[0]) if rows else set()
    for column in (entry.path_column, entry.label_column):
        if column not in columns:
            raise UserError(
                f"{csv_path}: no column '{column}' (columns: {', '.join(sorted(c for c in columns if c)) or 'none'}); "
                f"set datasets.{name}.path_column / label_column"
            )
    records, skipped, missing = [], [], []
    for line, row in enumerate(rows, start=2):
        value = (row[entry.path_column] or "").strip()
        if not value:
            skipped.append(f"{csv_path.name} line {line}: empty path")
            continue
        rel = entry.path_template.format(value)
        path = root / rel
        if not path.is_file():
            missing.append(rel)
            continue
        original = (row[entry.label_column] or "").strip()
        label = vocab.normalise(str(entry.label_map.get(original, original)))
        records.append(ImageRecord(path, Path(rel).as_posix(), original, label))
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise UserError(
            f"{csv_path}: {len(missing)} listed image(s) do not exist under {root} ({shown}); "
            f"fix the paths or datasets.{name}.path_template"
        )
    return Dataset(name, "csv", root, records, skipped)
