"""Morphology descriptors of each detected cell: what a haematologist reads, in units no lab can shift.

White cells are told apart by the shape of the nucleus (lobes, indentation, how much of the cell it
fills), by the cytoplasm (granules, their colour) and by chromatin texture. None of these depends on the
scanner's magnification or lamp if it is measured as a ratio, a shape index or a colour after the lab's
own stain normalisation, which is why they carry across labs where the autoencoder's latent and colour
histograms do not (docs/accuracy.md). The descriptors are label-free and need no training:

* the cell and its nucleus come from the classical stain segmentation that also makes the detector's
  pseudo-masks (``pseudo_labels.segment_cells``: nuclear stain in optical density against the crop's own
  background, the cell flooded out from it); the candidate nearest the crop's centre is the cell (with
  ``extract.cut_red_cells``, cut to its solid part where it flooded into touching red cells);
* shape: nucleus-to-cell area ratio; for the nucleus its elongation, circularity, solidity, number of
  lobes and mean thickness; for the cell its elongation, circularity and solidity;
* nuclear structure (version 3): the lobes of a nucleus are seldom separate pieces in a real smear but
  pieces joined by thin strands, so the nucleus is also eroded by 15, 25 and 35 % of its equivalent
  radius and its pieces counted at each depth; along its medial ridge (the local maxima of the distance
  to its edge), the spread of its thickness and its narrowest neck against its thickest part; its
  thickest point; and how far off the cell's centre it sits. A segmented neutrophil, a bilobed
  eosinophil, a kidney-shaped monocyte and a round lymphocyte nucleus differ in these at any scale;
* colour, separately for nucleus and cytoplasm: CIELAB mean and spread after Reinhard normalisation with
  the dataset's statistics (``colour.lab_statistics`` of its crops), total optical density and each
  channel's share of it (the stain's composition, independent of its strength);
* contrast, cytoplasm against nucleus of the same cell: the ratio of their optical densities, the
  difference of their stain compositions and of their CIELAB colours after white balance on the crop's
  own background. The nucleus is the cell's own stain reference, so the contrast holds under any lamp,
  stain strength or class mix of a dataset (which moves per-dataset normalisation): an eosinophil's
  cytoplasm is nearly as dense as its nucleus, a neutrophil's is pale, in every lab.

* size (version 4, ``SIZES``): from the detection, not the crop, since crops are all resized alike:
  the cell's area in the original image, compared across labs as a ratio to its own dataset's median.

Texture (granularity as high-pass lightness, at one or two scales, raw or contrast-normalised) is left
out on measurement: it follows each lab's focus and camera resolution more than the granules, and adding
it lowered every cross-lab direction from PBC (docs/accuracy_notes.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
from scipy import ndimage

from . import colour
from .masks import resize_mask
from .pseudo_labels import central_candidate, segment_cells, solid_candidate, solidity

_SHAPE = ("elongation", "circularity", "solidity", "lobes", "thickness")
_COLOUR = ("L", "a", "b", "L_spread", "a_spread", "b_spread", "density", "density_red", "density_green",
           "density_blue")
_CONTRAST = ("density", "density_red", "density_green", "density_blue", "L", "a", "b")
EROSION_DEPTHS = (0.15, 0.25, 0.35)  # of the nucleus's equivalent radius: thin strands part, lobes stay
STRUCTURE = (*(f"lobes_eroded{round(100 * depth)}" for depth in EROSION_DEPTHS), "ridge_spread", "narrowest_neck",
              "max_thickness", "offset")
GEOMETRY = (*(f"nucleus_{name}" for name in _SHAPE), *(f"cell_{name}" for name in _SHAPE[:3]))
DESCRIPTORS: tuple[str, ...] = (
    "nucleus_fraction",
    *GEOMETRY,
    *(f"nucleus_{name}" for name in _COLOUR),
    *(f"cytoplasm_{name}" for name in _COLOUR),
    *(f"contrast_{name}" for name in _CONTRAST),
    *(f"nucleus_{name}" for name in STRUCTURE),
)
# The descriptors no stain can move: the nucleus's share of the cell, shape indices and nuclear structure.
SHAPE_DESCRIPTORS = ("nucleus_fraction", *GEOMETRY, *(f"nucleus_{name}" for name in STRUCTURE))
# The cell's size in the original image's pixels, from its detection (version 4): log of the square root of
# the detector's mask area and of its box's area. Every crop is resized to one size, so the descriptors above
# know a cell's shape but not its size, which a haematologist reads first (a lymphocyte is smaller than a
# monocyte in any lab). A lab's magnification multiplies every size alike, so these columns are compared
# across labs only as differences from their own dataset's median (``classify.normalise_features``): the log
# makes that difference a ratio to the lab's typical cell, which no magnification moves.
SIZES = ("cell_size", "box_size")
SIZE_FIELDS = ("mask_area", "x0", "y0", "x1", "y1")  # the columns of detect's instances.csv they are read from
VERSION = 4  # raised whenever a descriptor is added, dropped or measured differently: features re-extract
MIN_REGION_PIXELS = 5  # a nucleus or cytoplasm smaller than this is measured over the whole cell instead
LOBE_SHARE = 0.1  # a separate piece of nucleus is a lobe when it holds at least this share of its area


def cell_sizes(rows: Sequence[dict]) -> np.ndarray:
    """(n, len(SIZES)) float32: the ``SIZES`` of the cells of detect's ``instances.csv`` rows."""
    areas = [[float(row["mask_area"]), (float(row["x1"]) - float(row["x0"])) * (float(row["y1"]) - float(row["y0"]))]
             for row in rows]
    return (0.5 * np.log(np.maximum(np.asarray(areas, np.float64).reshape(-1, len(SIZES)), 1.0))).astype(np.float32)


def describe_crops(crops: Iterable[np.ndarray], statistics: np.ndarray,
                   cut_red_cells: bool = False) -> Iterator[np.ndarray]:
    """For each block of (n, 3, S, S) uint8 crops, its (n, len(DESCRIPTORS)) float32 descriptors.

    ``statistics``: the dataset's (2, 3) CIELAB mean and spread of stained pixels (``colour.lab_statistics``).
    ``cut_red_cells``: see :func:`central_cell`.
    """
    for block in crops:
        yield np.stack([describe_cell(np.moveaxis(crop, 0, -1), statistics, cut_red_cells)
                        for crop in block]).astype(np.float32)


def describe_cell(crop: np.ndarray, statistics: np.ndarray, cut_red_cells: bool = False) -> np.ndarray:
    """Descriptors of the cell at the centre of one (S, S, 3) uint8 crop, in ``DESCRIPTORS`` order."""
    cell, nucleus = central_cell(crop, cut_red_cells)
    cytoplasm = cell & ~nucleus
    values = [nucleus.sum() / max(cell.sum(), 1), *shape_indices(nucleus), *shape_indices(cell)[:3]]
    lab = colour.rgb_to_lab(colour.normalise_stain(crop, statistics))
    balanced_lab = colour.rgb_to_lab(colour.white_balance_pixels(crop / 255.0))
    density = colour.optical_density(crop)
    regions = [region if region.sum() >= MIN_REGION_PIXELS else cell for region in (nucleus, cytoplasm)]
    measured = []  # (density, stain composition, white-balanced colour) of the nucleus, then the cytoplasm
    for region in regions:
        total = density[region].sum(axis=1)
        share = density[region] / np.maximum(total, 1e-6)[:, None]
        values += [*lab[region].mean(axis=0), *lab[region].std(axis=0), total.mean(), *share.mean(axis=0)]
        measured.append((total.mean(), share.mean(axis=0), balanced_lab[region].mean(axis=0)))
    (nucleus_density, nucleus_share, nucleus_colour), (cytoplasm_density, cytoplasm_share, cytoplasm_colour) = measured
    values += [cytoplasm_density / max(nucleus_density, 1e-6), *(cytoplasm_share - nucleus_share),
               *(cytoplasm_colour - nucleus_colour), *nuclear_structure(nucleus, cell)]
    return np.asarray(values, np.float64)


def central_cell(crop: np.ndarray, cut_red_cells: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(cell, nucleus) boolean masks of the crop's size: the segmented cell nearest the centre, or the
    whole crop (with no nucleus) when the segmentation finds none. With ``cut_red_cells`` a cell that is not
    plausible (mostly flooded into touching red cells) is cut to its solid part (``pseudo_labels.solid_part``)."""
    height, width = crop.shape[:2]
    chosen = central_candidate(segment_cells(crop))
    if chosen is None:
        return np.ones((height, width), bool), np.zeros((height, width), bool)
    if cut_red_cells:
        chosen = solid_candidate(chosen)
    cell, nucleus = chosen.mask, chosen.nucleus  # a candidate's nucleus lies within its cell
    if cell.shape != (height, width):  # segmented at a reduced working size
        return resize_mask(cell, (height, width)), resize_mask(nucleus, (height, width))
    return cell, nucleus


def shape_indices(mask: np.ndarray) -> list[float]:
    """Elongation (minor over major axis), circularity (4 pi area / perimeter^2; 1 for a disc), solidity, number of
    lobes and mean thickness (distance to the edge over the equivalent radius) of a region; all
    independent of the image's scale. Zeros for an (almost) empty region."""
    area = int(mask.sum())
    if area < MIN_REGION_PIXELS:
        return [0.0] * len(_SHAPE)
    rows, cols = np.nonzero(mask)
    minor, major = np.linalg.eigvalsh(np.cov(np.stack([cols, rows]).astype(np.float64)))
    elongation = math.sqrt(max(minor, 0.0) / max(major, 1e-9))
    # Pixel-edge crossings overstate a slanted boundary by 4 / pi on average over directions (Crofton).
    padded = np.pad(mask, 1)
    crossings = np.count_nonzero(padded[1:] != padded[:-1]) + np.count_nonzero(padded[:, 1:] != padded[:, :-1])
    circularity = 4 * math.pi * area / (crossings * math.pi / 4) ** 2
    labels, pieces = ndimage.label(mask)
    lobes = int((np.bincount(labels.ravel())[1:] >= LOBE_SHARE * area).sum())
    thickness = float(ndimage.distance_transform_edt(mask)[mask].mean()) / math.sqrt(area / math.pi)
    return [elongation, circularity, solidity(mask), float(lobes), thickness]


def nuclear_structure(nucleus: np.ndarray, cell: np.ndarray) -> list[float]:
    """Pieces left after eroding the nucleus by each of ``EROSION_DEPTHS`` of its equivalent radius (each
    piece holding at least ``LOBE_SHARE`` of what is left), the spread (coefficient of variation) of its
    thickness along its medial ridge, its narrowest neck (10th percentile of the ridge's thickness over its
    maximum), its greatest thickness over the equivalent radius, and the distance from the cell's centroid
    to the nucleus's over the cell's equivalent radius. All scale-free; zeros for an (almost) empty nucleus."""
    area = int(nucleus.sum())
    if area < MIN_REGION_PIXELS:
        return [0.0] * len(STRUCTURE)
    radius = math.sqrt(area / math.pi)
    depth = ndimage.distance_transform_edt(nucleus)
    lobes = []
    for share in EROSION_DEPTHS:
        labels, pieces = ndimage.label(depth > share * radius)
        sizes = np.bincount(labels.ravel())[1:]
        lobes.append(float((sizes >= LOBE_SHARE * sizes.sum()).sum()) if pieces else 0.0)
    ridge = depth[nucleus & (depth >= ndimage.maximum_filter(depth, size=3))]
    rows, cols = np.nonzero(nucleus)
    cell_rows, cell_cols = np.nonzero(cell)
    offset = math.hypot(rows.mean() - cell_rows.mean(), cols.mean() - cell_cols.mean()) / math.sqrt(cell.sum() / math.pi)
    return [*lobes, float(ridge.std() / ridge.mean()), float(np.percentile(ridge, 10) / ridge.max()),
            float(depth.max() / radius), offset]
