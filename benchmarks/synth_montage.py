"""Draw the synthetic-data montages used in the docs, to check by eye that they look like blood cells.

Writes ``docs/synth_montage.png`` (rows: domains, columns: classes, two examples each) and
``docs/synth_field.png`` (one smear field with its white-cell mask outlines and class names).
Run from the project root: ``python benchmarks/synth_montage.py``.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from aecfe_cli import synth  # noqa: E402  (needs the project root on the path when run as a script)
from aecfe_cli.io import atomic_path, read_json  # noqa: E402

TILE = 128
EXAMPLES_PER_CLASS = 2
LABEL_HEIGHT = 16
LABEL_WIDTH = 48
GAP = 2


def cell_montage(seed: int = 0) -> Image.Image:
    domains = list(synth.DOMAINS)
    columns = len(synth.CLASSES) * EXAMPLES_PER_CLASS
    width = LABEL_WIDTH + columns * (TILE + GAP)
    height = LABEL_HEIGHT + len(domains) * (TILE + GAP)
    montage = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(montage)
    for class_index, cls in enumerate(synth.CLASSES):
        draw.text((LABEL_WIDTH + class_index * EXAMPLES_PER_CLASS * (TILE + GAP) + 4, 2), cls, fill="black")
    for row, domain in enumerate(domains):
        top = LABEL_HEIGHT + row * (TILE + GAP)
        draw.text((4, top + TILE // 2), domain, fill="black")
        style = synth.DOMAINS[domain]
        for class_index, cls in enumerate(synth.CLASSES):
            for example in range(EXAMPLES_PER_CLASS):
                rng = np.random.default_rng([seed, row, class_index, example])
                tile = synth.render_cell_image(cls, style, rng, TILE)
                left = LABEL_WIDTH + (class_index * EXAMPLES_PER_CLASS + example) * (TILE + GAP)
                montage.paste(Image.fromarray(tile), (left, top))
    return montage


def field_with_outlines(seed: int = 0, domain: str = "lab_a") -> Image.Image:
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        synth.write_field_dataset(out, domain, n_fields=1, seed=seed, cells_per_field=(3, 3))
        coco = read_json(out / "annotations.json")
        with Image.open(out / "images" / "field_0000.png") as image:
            field = np.asarray(image.convert("RGB")).copy()
        with Image.open(out / "masks" / "field_0000.png") as image:
            mask = np.asarray(image)
    # Outline = mask pixels whose right or lower neighbour belongs to another instance.
    edge = np.zeros(mask.shape, bool)
    edge[:, :-1] |= mask[:, :-1] != mask[:, 1:]
    edge[:-1, :] |= mask[:-1, :] != mask[1:, :]
    field[edge] = (0, 200, 0)
    picture = Image.fromarray(field).resize((field.shape[1] * 2, field.shape[0] * 2), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    for annotation in coco["annotations"]:
        x, y, w, h = annotation["bbox"]
        draw.rectangle((2 * x, 2 * y, 2 * (x + w) - 1, 2 * (y + h) - 1), outline=(255, 255, 0))
        draw.text((2 * x + 3, 2 * y + 3), annotation["labels"]["aecfe_class"], fill="black")
    return picture


def save(picture: Image.Image, path: Path) -> None:
    with atomic_path(path) as tmp:
        picture.save(tmp, format="PNG")


def main() -> None:
    save(cell_montage(), ROOT / "docs" / "synth_montage.png")
    save(field_with_outlines(), ROOT / "docs" / "synth_field.png")
    print(f"wrote {ROOT / 'docs' / 'synth_montage.png'} and {ROOT / 'docs' / 'synth_field.png'}")


if __name__ == "__main__":
    main()
