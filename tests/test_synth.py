"""The synthetic smear generator: determinism, dataset layout, COCO annotations and domain shift."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from aecfe_cli import synth
from aecfe_cli.errors import UserError

CELL_PX = 48
FIELD_SIZE = (160, 120)


def file_bytes(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def decode_rle(rle: dict) -> np.ndarray:
    """COCO uncompressed RLE -> boolean mask, written independently of the generator's encoder."""
    height, width = rle["size"]
    flat = np.zeros(height * width, bool)
    position, value = 0, False
    for run in rle["counts"]:
        flat[position : position + run] = value
        position += run
        value = not value
    assert position == height * width, "run lengths must cover the image exactly"
    return flat.reshape(width, height).T  # runs go down the columns


def load(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image)


def test_same_seed_gives_byte_identical_datasets_and_another_seed_does_not(tmp_path):
    for name, seed in (("first", 3), ("again", 3), ("other", 4)):
        synth.write_cell_dataset(tmp_path / name / "cells", "lab_a", per_class=1, seed=seed, size=CELL_PX)
        synth.write_field_dataset(tmp_path / name / "fields", "lab_b", n_fields=1, seed=seed, size=FIELD_SIZE)
    first, again, other = (file_bytes(tmp_path / name) for name in ("first", "again", "other"))
    assert first == again
    assert first.keys() == other.keys()
    assert all(first[key] != other[key] for key in first if key.endswith(".png") and "/masks/" not in key)


def test_every_class_folder_holds_the_requested_images(tmp_path):
    counts = synth.write_cell_dataset(tmp_path, "lab_c", per_class=2, seed=0, size=CELL_PX)
    assert counts == {cls: 2 for cls in synth.CLASSES}
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(synth.CLASSES)
    for cls in synth.CLASSES:
        names = sorted(path.name for path in (tmp_path / cls).iterdir())
        assert names == [f"lab_c_{cls}_0000.png", f"lab_c_{cls}_0001.png"]
        image = load(tmp_path / cls / names[0])
        assert image.shape == (CELL_PX, CELL_PX, 3) and image.dtype == np.uint8


def test_more_images_per_class_keep_the_earlier_ones(tmp_path):
    synth.write_cell_dataset(tmp_path / "one", "lab_a", per_class=1, seed=7, size=32)
    synth.write_cell_dataset(tmp_path / "two", "lab_a", per_class=2, seed=7, size=32)
    name = "lab_a_monocyte_0000.png"
    assert (tmp_path / "one" / "monocyte" / name).read_bytes() == (tmp_path / "two" / "monocyte" / name).read_bytes()


def test_field_masks_agree_with_coco_boxes_and_rle(tmp_path):
    n_fields = synth.write_field_dataset(tmp_path, "lab_a", n_fields=3, seed=1, size=FIELD_SIZE, cells_per_field=(2, 3))
    assert n_fields == 3
    coco = json.loads((tmp_path / "annotations.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "wbc"}]
    assert [image["file_name"] for image in coco["images"]] == [f"images/field_{i:04d}.png" for i in range(3)]
    assert len({annotation["id"] for annotation in coco["annotations"]}) == len(coco["annotations"])
    for image in coco["images"]:
        assert (image["width"], image["height"]) == FIELD_SIZE
        assert load(tmp_path / image["file_name"]).shape == (FIELD_SIZE[1], FIELD_SIZE[0], 3)
        mask = load(tmp_path / image["file_name"].replace("images/", "masks/"))
        annotations = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
        assert annotations, "every field holds at least one white cell"
        assert set(np.unique(mask)) == set(range(len(annotations) + 1))
        for instance, annotation in enumerate(annotations, start=1):
            cell = mask == instance
            rows, cols = np.nonzero(cell)
            x, y = int(cols.min()), int(rows.min())
            assert annotation["bbox"] == [x, y, int(cols.max()) - x + 1, int(rows.max()) - y + 1]
            assert annotation["area"] == int(cell.sum())
            assert annotation["segmentation"]["size"] == [FIELD_SIZE[1], FIELD_SIZE[0]]
            assert np.array_equal(decode_rle(annotation["segmentation"]), cell)
            assert (annotation["category_id"], annotation["iscrowd"]) == (1, 0)
            assert annotation["labels"]["aecfe_class"] in synth.CLASSES


def test_rle_starts_with_a_background_run_even_when_the_corner_is_foreground():
    mask = np.zeros((3, 4), bool)
    mask[0, 0] = mask[1, 0] = mask[2, 3] = True
    rle = synth._encode_rle(mask)
    assert rle == {"counts": [0, 2, 9, 1], "size": [3, 4]}
    assert np.array_equal(decode_rle(rle), mask)


def test_the_white_cell_is_in_the_centre():
    for cls in synth.CLASSES:
        image = synth.render_cell_image(cls, synth.DOMAINS["lab_a"], np.random.default_rng(0), 64)
        luminance = image.astype(float).mean(axis=2)
        border = np.concatenate([luminance[:8].ravel(), luminance[-8:].ravel()])
        # The nucleus (or basophil granules) is the darkest thing in the crop and sits in the middle.
        assert np.percentile(luminance[16:48, 16:48], 2) < np.percentile(border, 2) - 40, cls


def test_domains_shift_colour():
    def mean_colour(domain: str) -> np.ndarray:
        images = [
            synth.render_cell_image(cls, synth.DOMAINS[domain], np.random.default_rng(index), CELL_PX)
            for index, cls in enumerate(synth.CLASSES)
        ]
        return np.mean(images, axis=(0, 1, 2))

    colours = {domain: mean_colour(domain) for domain in synth.DOMAINS}
    assert len(colours) >= 3
    names = list(colours)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            assert np.abs(colours[first] - colours[second]).max() > 8, (first, second)


def test_unknown_domain_raises_user_error(tmp_path):
    with pytest.raises(UserError, match="unknown synthetic domain 'lab_z': choose one of lab_a"):
        synth.write_cell_dataset(tmp_path, "lab_z", per_class=1, seed=0, size=CELL_PX)
    with pytest.raises(UserError, match="unknown synthetic domain 'lab_z'"):
        synth.write_field_dataset(tmp_path, "lab_z", n_fields=1, seed=0)
    assert not any(tmp_path.iterdir())
