"""Morphology descriptors: what they measure follows the cell's shape, not the lab's scale or stain."""

import numpy as np

from aecfe_cli import colour
from aecfe_cli.morphology import DESCRIPTORS, STRUCTURE, central_cell, describe_cell, describe_crops, nuclear_structure
from aecfe_cli.pseudo_labels import MIN_SOLIDITY, solid_part, solidity
from conftest import drawn_cell


def _describe(crop):
    hwc = np.moveaxis(crop, 0, -1)
    return dict(zip(DESCRIPTORS, describe_cell(hwc, colour.lab_statistics([hwc]))))


def test_lobed_and_round_nuclei_are_told_apart():
    round_nucleus = _describe(drawn_cell(nucleus_radius=13))
    three_lobes = _describe(drawn_cell(nucleus_radius=5, lobes=3))
    assert round_nucleus["nucleus_lobes"] == 1 and three_lobes["nucleus_lobes"] == 3
    assert round_nucleus["nucleus_fraction"] > 0.35 > three_lobes["nucleus_fraction"]
    assert round_nucleus["nucleus_solidity"] > 0.9 > three_lobes["nucleus_solidity"]
    assert abs(round_nucleus["nucleus_circularity"] - 1) < 0.1 and three_lobes["nucleus_circularity"] < 0.6


def test_segmentation_finds_the_drawn_cell_and_nucleus():
    cell, nucleus = central_cell(np.moveaxis(drawn_cell(nucleus_radius=10), 0, -1))
    assert abs(cell.sum() - np.pi * 20**2) < 0.1 * np.pi * 20**2
    assert abs(nucleus.sum() - np.pi * 10**2) < 0.15 * np.pi * 10**2
    assert not (nucleus & ~cell).any()


def test_shape_does_not_depend_on_magnification():
    small, large = _describe(drawn_cell(nucleus_radius=6, lobes=2, side=64)), _describe(
        drawn_cell(nucleus_radius=6, lobes=2, side=128, scale=2.0))
    for name in ("nucleus_fraction", "nucleus_circularity", "nucleus_solidity", "cell_elongation", "cell_solidity"):
        assert abs(small[name] - large[name]) < 0.12, name
    assert small["nucleus_lobes"] == large["nucleus_lobes"] == 2


def test_colour_descriptors_follow_the_cell_not_the_lab_stain():
    """Two labs: the second's stain lets 25 % less red light through. Each normalised with its own dataset
    statistics, the same cells get nearly the same colour descriptors; normalised with the first lab's
    statistics (no per-lab normalisation) the stain change shows."""
    shapes = [dict(nucleus_radius=13), dict(nucleus_radius=6, lobes=3), dict(nucleus_radius=9)]
    crops = [np.stack([drawn_cell(**s, gain=gain, seed=i) for i, s in enumerate(shapes)])
             for gain in ((1.0, 1.0, 1.0), (0.75, 1.0, 1.0))]
    own = [colour.lab_statistics([np.moveaxis(c, 1, -1)]) for c in crops]
    first, second, unnormalised = (np.concatenate(list(describe_crops([c], s)))
                                   for c, s in ((crops[0], own[0]), (crops[1], own[1]), (crops[1], own[0])))
    # The nucleus: in these flat drawings the pale cytoplasm lies beyond the stained-pixel range and maps to white.
    columns = [DESCRIPTORS.index(f"nucleus_{channel}") for channel in "Lab"]
    assert np.abs(first[:, columns] - second[:, columns]).max() < 4.0  # CIELAB units
    assert np.abs(first[:, columns] - unnormalised[:, columns]).max() > 10.0
    assert first.shape == (3, len(DESCRIPTORS)) and first.dtype == np.float32


def test_cytoplasm_against_nucleus_contrast_holds_under_another_lamp():
    """A dense orange cytoplasm (eosinophil-like) against a pale one (neutrophil-like): the contrast
    descriptors tell them apart, and a yellow lamp that dims blue by a third leaves them where they were."""
    dense, pale = (200, 110, 90), (200, 170, 205)
    described = {(name, lamp): _describe(drawn_cell(nucleus_radius=8, lobes=2, cytoplasm=rgb, gain=gain))
                 for name, rgb in (("dense", dense), ("pale", pale))
                 for lamp, gain in (("white", (1.0, 1.0, 1.0)), ("yellow", (1.0, 0.95, 0.67)))}
    for lamp in ("white", "yellow"):
        assert described["dense", lamp]["contrast_density"] > 1.5 * described["pale", lamp]["contrast_density"]
        assert described["dense", lamp]["contrast_b"] > described["pale", lamp]["contrast_b"] + 20
    for name in ("dense", "pale"):
        white, yellow = described[name, "white"], described[name, "yellow"]
        assert abs(white["contrast_density"] - yellow["contrast_density"]) < 0.1 * white["contrast_density"]
        for channel in "Lab":
            assert abs(white[f"contrast_{channel}"] - yellow[f"contrast_{channel}"]) < 4.0  # CIELAB units


def _disc(shape, centre, radius):
    rows, cols = np.mgrid[:shape[0], :shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def test_lobes_joined_by_a_strand_are_counted_and_the_neck_is_found():
    """A real segmented nucleus is one piece: lobes joined by thin chromatin strands. Eroded, it parts into
    its lobes; its ridge has a narrow neck; a round nucleus stays one piece with an even ridge."""
    shape = (96, 96)
    cell = _disc(shape, (48, 48), 40)
    lobed = _disc(shape, (48, 28), 9) | _disc(shape, (48, 68), 9)
    lobed[47:50, 28:69] = True  # a strand 3 pixels thick
    round_ = _disc(shape, (48, 48), 13)
    lobed_values = dict(zip(STRUCTURE, nuclear_structure(lobed, cell)))
    round_values = dict(zip(STRUCTURE, nuclear_structure(round_, cell)))
    assert lobed_values["lobes_eroded25"] == 2 and round_values["lobes_eroded25"] == 1
    assert lobed_values["narrowest_neck"] < 0.3 < round_values["narrowest_neck"]
    assert lobed_values["offset"] < 0.05 and round_values["offset"] < 0.05
    off_centre = dict(zip(STRUCTURE, nuclear_structure(_disc(shape, (48, 68), 13), cell)))
    assert abs(off_centre["offset"] - 20 / 40) < 0.05  # 20 px off the centre of a cell of radius 40
    # Twice the magnification, the same shape: the same numbers.
    big = np.kron(lobed, np.ones((2, 2), bool)), np.kron(cell, np.ones((2, 2), bool))
    assert nuclear_structure(*big)[:3] == nuclear_structure(lobed, cell)[:3]


def test_red_cells_the_segmentation_flooded_into_are_cut_off():
    rows, cols = np.mgrid[:96, :96]
    white_cell = (rows - 48) ** 2 + (cols - 48) ** 2 <= 20**2
    nucleus = (rows - 48) ** 2 + (cols - 48) ** 2 <= 9**2
    red_cells = ((rows - 48) ** 2 + (cols - 77) ** 2 <= 11**2) | ((rows - 20) ** 2 + (cols - 40) ** 2 <= 10**2)
    leaked = white_cell | red_cells
    assert solidity(leaked) < MIN_SOLIDITY
    cut = solid_part(leaked, nucleus)
    assert solidity(cut) >= MIN_SOLIDITY and cut[nucleus].all()
    assert (cut & white_cell).sum() / (cut | white_cell).sum() > 0.9
    assert solid_part(white_cell, nucleus).sum() == white_cell.sum()  # a solid cell is left as it is


def test_cutting_red_cells_off_makes_earlier_features_stale_and_leaves_them_current_when_off():
    import dataclasses

    from aecfe_cli import morphology
    from aecfe_cli.config import ExtractConfig
    from aecfe_cli.extract import extraction_fingerprint
    from aecfe_cli.workdir import fingerprint, output_digest

    manifest = {"outputs": {"features.npy": {"sha256": "0" * 64}}}
    # The extract stage's fingerprint as it was before the setting existed: old workdirs stay current.
    digest = output_digest(manifest)
    before = fingerprint("extract", {"morphology": morphology.VERSION}, None, {"detections": digest, "model": digest})
    default = extraction_fingerprint(manifest, manifest, ExtractConfig())
    cut = extraction_fingerprint(manifest, manifest, ExtractConfig(cut_red_cells=True))
    assert cut != default
    assert extraction_fingerprint(manifest, manifest, dataclasses.replace(ExtractConfig(), morphology=False, cut_red_cells=True)) \
        == extraction_fingerprint(manifest, manifest, ExtractConfig(morphology=False))
    assert default == before
