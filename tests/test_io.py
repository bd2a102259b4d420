"""Streaming .npy files: what detect and extract write block by block is what numpy reads back."""

import csv
import shutil

import numpy as np
import pytest
import torch

from aecfe_cli import autoencoder as ae
from aecfe_cli.config import ExtractConfig
from aecfe_cli.errors import UserError
from aecfe_cli.extract import run_extraction
from aecfe_cli.io import iter_npy_blocks, npy_writer, write_npy
from aecfe_cli.morphology import DESCRIPTORS, SIZES
from aecfe_cli.reporting import Reporter
from conftest import drawn_cell


def test_blocks_written_and_read_back_match_numpy(tmp_path):
    array = np.random.default_rng(0).standard_normal((23, 4, 3)).astype(np.float16)
    path = tmp_path / "a.npy"
    with npy_writer(path, array.shape, array.dtype) as append:
        for start in range(0, 23, 5):
            append(array[start:start + 5])
    assert np.array_equal(np.load(path), array)
    blocks = list(iter_npy_blocks(path, 5))
    assert [len(b) for b in blocks] == [5, 5, 5, 5, 3]
    assert np.array_equal(np.concatenate(blocks), array)
    write_npy(tmp_path / "saved.npy", array)  # numpy's own writer: the same rows come back
    assert np.array_equal(np.concatenate(list(iter_npy_blocks(tmp_path / "saved.npy", 7))), array)


def test_incomplete_or_misshapen_writes_leave_no_file(tmp_path):
    path = tmp_path / "a.npy"
    with pytest.raises(ValueError, match="3 of 4 rows"):
        with npy_writer(path, (4, 2), np.float32) as append:
            append(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="does not fit"):
        with npy_writer(path, (4, 2), np.float32) as append:
            append(np.zeros((4, 3)))
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_object_arrays_are_refused(tmp_path):
    path = tmp_path / "a.npy"
    np.save(path, np.arange(40, dtype=np.int64).reshape(10, 4))
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(ValueError, match="truncated"):
        list(iter_npy_blocks(path, 4))
    np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="no object arrays"):
        list(iter_npy_blocks(path, 4))


def _detections(folder, cells, rows, crops=None):
    folder.mkdir()
    roi = np.random.default_rng(1).standard_normal((cells, 256, 14, 14)).astype(np.float16)
    write_npy(folder / "roi_features.npy", roi)
    crops = cells if crops is None else crops
    write_npy(folder / "crops.npy", np.stack([drawn_cell(nucleus_radius=8 + i % 4) for i in range(crops)]))
    with open(folder / "instances.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["instance_id", "image", "dataset", "label", "x0", "y0", "x1", "y1", "score", "mask_area"])
        # cell i: a box of 40 + i by 40 pixels holding a mask of 1000 * (i + 1) pixels
        writer.writerows([[f"c{i}", f"img{i}.png", "lab", "NEU", 10, 20, 50 + i, 60, 0.9, 1000 * (i + 1)]
                          for i in range(rows)])
    return roi


def _extract(tmp_path, batch_size, morphology=False):
    torch.manual_seed(0)
    model = ae.AECFE(width=0.25, image_size=32)
    return run_extraction("lab", tmp_path / "detect", {"outputs": {}}, model.eval(), {"outputs": {}},
                          ExtractConfig(batch_size=batch_size, morphology=morphology), tmp_path / "extract",
                          torch.device("cpu"), Reporter(quiet=True)), model


def test_extract_streams_every_cell_beside_its_ids(tmp_path):
    roi = _detections(tmp_path / "detect", 7, 7)
    manifest, model = _extract(tmp_path, batch_size=3)
    features = np.load(tmp_path / "extract" / "features.npy")
    with torch.inference_mode():
        expected = model.encode(ae.scale_features(torch.from_numpy(roi).float())).numpy()
    assert features.shape == (7, 50) and np.allclose(features, expected, atol=1e-5)
    with open(tmp_path / "extract" / "features.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["instance_id"] for row in table] == [f"c{i}" for i in range(7)]
    assert np.array_equal(np.array([[row[f"f{i}"] for i in range(50)] for row in table], dtype=np.float32), features)
    assert manifest["counts"] == {"cells": 7, "dimensions": 50, "latent_dimensions": 50, "morphology_dimensions": 0}


def test_extract_puts_morphology_after_the_latent_of_the_same_cell(tmp_path):
    _detections(tmp_path / "detect", 7, 7)
    shutil.copytree(tmp_path / "detect", tmp_path / "without" / "detect")
    latent_only, _ = _extract(tmp_path / "without", batch_size=3)
    manifest, _ = _extract(tmp_path, batch_size=3, morphology=True)
    features = np.load(tmp_path / "extract" / "features.npy")
    latent = np.load(tmp_path / "without" / "extract" / "features.npy")
    descriptors = (*DESCRIPTORS, *SIZES)
    assert features.shape == (7, 50 + len(descriptors)) and np.array_equal(features[:, :50], latent)
    with open(tmp_path / "extract" / "features.csv", newline="") as handle:
        header = next(csv.reader(handle))
    assert header[4 + 50:] == [f"m_{name}" for name in descriptors]
    # Cells drawn with growing nuclei (radius 8..11 in the same 40-px cell): the ratio follows them.
    fraction = features[:4, 50 + DESCRIPTORS.index("nucleus_fraction")]
    assert np.all(np.diff(fraction) > 0)
    # The sizes come from each cell's own detection row, in the image's pixels (log of the square root).
    cell = np.arange(7)
    assert np.allclose(features[:, -2], 0.5 * np.log(1000 * (cell + 1)), atol=1e-5)
    assert np.allclose(features[:, -1], 0.5 * np.log((40 + cell) * 40), atol=1e-5)
    assert manifest["counts"]["dimensions"] == 50 + len(descriptors)
    assert latent_only["fingerprint"] != manifest["fingerprint"]


def test_extract_refuses_crops_that_disagree_with_the_cells(tmp_path):
    _detections(tmp_path / "detect", 7, 7, crops=6)
    with pytest.raises(UserError, match="crops.npy does not hold one crop per cell"):
        _extract(tmp_path, batch_size=3, morphology=True)


def test_extract_refuses_detections_without_the_columns_sizes_come_from(tmp_path):
    _detections(tmp_path / "detect", 7, 7)
    instances = tmp_path / "detect" / "instances.csv"
    table = list(csv.reader(instances.open(newline="")))
    with open(instances, "w", newline="") as handle:
        csv.writer(handle).writerows([row[:9] for row in table])  # mask_area dropped
    with pytest.raises(UserError, match=r"instances.csv lacks the columns \['mask_area'\].*aecfe detect --data lab --force"):
        _extract(tmp_path, batch_size=3, morphology=True)
    assert not (tmp_path / "extract" / "features.npy").exists()


@pytest.mark.parametrize("rows", [6, 8])
def test_extract_refuses_detect_files_that_disagree(tmp_path, rows):
    _detections(tmp_path / "detect", 7, rows)
    with pytest.raises(UserError, match="instances.csv does not list one row per cell"):
        _extract(tmp_path, batch_size=3)
    assert not any(p.suffix in (".npy", ".csv") for p in (tmp_path / "extract").iterdir())
