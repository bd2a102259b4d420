"""Label-free training data for the detector: a classical stain segmentation of white cells.

``pseudo_instances`` and ``pseudo_samples`` turn unlabelled single-cell images into training masks;
``central_instance`` stands in for a detection the detector missed; ``mask_from_box`` gives a whole-cell
mask to a box-only annotation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from .annotations import TrainSample
from .colour import optical_density
from .images import UnreadableImage, load_rgb
from .masks import box_iou, box_pixels, mask_box, resize_mask

# Working resolution of the segmentation: every radius below is relative to it or to the nucleus.
SEGMENT_SIDE = 256
# Nucleus stain score floor, in optical density units (log10): below it no stain is a nucleus.
NUCLEUS_SCORE_FLOOR = 0.08
MIN_NUCLEUS_FRACTION = 0.006  # of the image area: smaller dark blobs are platelets or debris
MIN_SOLIDITY = 0.90  # whole cells are convex-ish; a cell glued to red cells is not
MAX_CELL_TO_NUCLEUS = 8.0  # a "cell" many times its nucleus has leaked into the neighbours
FLOOD_LEVELS = 48
OPENING_SHARES = (0.4, 0.5, 0.6, 0.7, 0.8)  # of the largest disc a cell mask holds, tried by solid_part in turn


@dataclass
class _Candidate:
    mask: np.ndarray  # whole cell, at the working resolution
    nucleus: np.ndarray  # its nucleus (all lobes), same resolution
    plausible: bool


def pseudo_instances(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Find white cells without labels; return ``(boxes (K, 4) float32, masks (K, H, W) bool)``.

    1. Background colour = median of the brightest 10 % of pixels; optical density (OD) per channel is
       measured against it, so the lamp colour (yellow, pink, white) cancels.
    2. Nuclear stain score = min(OD_red, 2 OD_red - OD_blue): nuclei absorb red light in every
       Romanowsky variant (MGG, Wright, rapid stains), while red cells, eosin-stained cytoplasm and a
       yellow background absorb blue more than red. Otsu threshold (with a floor), small blobs dropped,
       nuclear lobes within 1.2 nuclear radii grouped into one cell.
    3. Whole cell = non-background pixels (Otsu on total OD) flooded from the nuclei on the distance
       transform, with every red cell as a competing seed, so touching red cells are cut off at the neck.
    4. Only plausible cells are returned: solid (convex hull filled >= 90 %) and not many times larger
       than their nucleus.
    """
    height, width = image.shape[:2]
    candidates = segment_cells(image)
    masks = [resize_mask(c.mask, (height, width)) for c in candidates if c.plausible]
    masks = [m for m in masks if m.any()]
    if not masks:
        return np.zeros((0, 4), np.float32), np.zeros((0, height, width), bool)
    stacked = np.stack(masks)
    return np.stack([mask_box(m) for m in stacked]).astype(np.float32), stacked


def pseudo_samples(image_paths: Sequence[Path], cut: bool = False) -> list[TrainSample]:
    """Pseudo-instances of each image as training samples. An image is dropped when no cell is found,
    when any candidate is implausible (an unlabelled real cell would teach "background"), or when it
    cannot be read. ``cut``: an implausible candidate is first cut to its solid part (:func:`solid_part`),
    and the image kept when that part is a plausible cell (``detect.pseudo_mask_cut``)."""
    samples = []
    for path in image_paths:
        try:
            image = load_rgb(Path(path))
        except UnreadableImage:
            continue
        candidates = [solid_candidate(c) if cut else c for c in segment_cells(image)]
        if not candidates or not all(c.plausible for c in candidates):
            continue
        masks = np.stack([resize_mask(c.mask, image.shape[:2]) for c in candidates])
        if not all(m.any() for m in masks):
            continue
        boxes = np.stack([mask_box(m) for m in masks]).astype(np.float32)
        samples.append(TrainSample(Path(path), boxes, masks))
    return samples


def solid_candidate(candidate: _Candidate) -> _Candidate:
    """``candidate`` with an implausible mask cut to its solid part (:func:`solid_part`), judged again."""
    if candidate.plausible:
        return candidate
    cell = solid_part(candidate.mask, candidate.nucleus)
    return _Candidate(cell, candidate.nucleus & cell, plausible_cell(cell, candidate.nucleus))


def central_candidate(candidates: Sequence[_Candidate]) -> Optional[_Candidate]:
    """The candidate whose mask's centroid lies nearest the centre of the (working-resolution) image; None
    when there is none. Single-cell datasets hold one white cell, centred by the acquisition system."""
    def distance_to_centre(candidate: _Candidate) -> float:
        rows, cols = np.nonzero(candidate.mask)
        height, width = candidate.mask.shape
        return math.hypot(cols.mean() - width / 2, rows.mean() - height / 2) if len(rows) else math.inf

    return min(candidates, key=distance_to_centre, default=None)


def central_instance(image: np.ndarray) -> Optional[tuple[np.ndarray, np.ndarray]]:
    """``(box (4,) float32, mask (H, W) bool)`` at the image's size of the segmented cell nearest its
    centre, cut to its solid part where it flooded into red cells (:func:`solid_candidate`); None when that
    cell is not plausible. What ``detect.segment_missed`` gives an image the detector found no cell in."""
    chosen = central_candidate(segment_cells(image))
    if chosen is None:
        return None
    chosen = solid_candidate(chosen)
    mask = resize_mask(chosen.mask, image.shape[:2])
    if not chosen.plausible or not mask.any():
        return None
    return mask_box(mask).astype(np.float32), mask


def segment_cells(image: np.ndarray) -> list[_Candidate]:
    """Cell candidates, with masks at the working resolution (long side <= SEGMENT_SIDE)."""
    small = _downscale(image, SEGMENT_SIDE)
    height, width = small.shape[:2]
    density = optical_density(small)
    nucleus_score = np.minimum(density[..., 0], 2 * density[..., 0] - density[..., 2])
    nuclei = ndimage.binary_opening(nucleus_score > _nucleus_threshold(nucleus_score), _disk(1))
    total = density.sum(axis=2)
    foreground = (total > _otsu(total[~nuclei])) | nuclei if (~nuclei).any() else nuclei
    foreground = ndimage.binary_opening(foreground, _disk(1))
    foreground = ndimage.binary_fill_holes(ndimage.binary_closing(foreground, _disk(2)))

    labels, count = ndimage.label(nuclei)
    if count == 0:
        return []
    areas = ndimage.sum(nuclei, labels, range(1, count + 1))
    keep = np.concatenate([[False], areas >= MIN_NUCLEUS_FRACTION * height * width])
    nuclei = keep[labels]
    if not nuclei.any():
        return []
    nucleus_radius = math.sqrt(areas.max() / math.pi)
    distance_to_nuclei = ndimage.distance_transform_edt(~nuclei)
    # Lobes of one segmented nucleus lie within about a nuclear radius of each other.
    groups, group_count = ndimage.label(distance_to_nuclei <= 0.6 * nucleus_radius)
    groups = groups * nuclei

    depth = ndimage.distance_transform_edt(foreground)
    peaks = (depth == ndimage.maximum_filter(depth, size=max(3, int(nucleus_radius)))) & (depth > 1)
    # A peak whose inscribed disc reaches the nucleus is the cell's own centre, not a red cell.
    peaks &= distance_to_nuclei > depth + 2
    peak_labels, _ = ndimage.label(peaks)
    seeds = np.where(peak_labels > 0, peak_labels + group_count, 0).astype(np.int32)
    seeds[groups > 0] = groups[groups > 0]
    levels = np.round((1 - depth / max(depth.max(), 1e-6)) * (FLOOD_LEVELS - 1)).astype(np.int32)
    regions = _flood(levels, seeds, foreground)

    candidates = []
    for group in range(1, group_count + 1):
        nucleus = groups == group
        if not nucleus.any():
            continue
        reach = 2.2 * math.sqrt(nucleus.sum() / math.pi)  # cytoplasm never extends further (Zheng masks)
        cell = (regions == group) & foreground & (ndimage.distance_transform_edt(~nucleus) <= reach)
        cell = ndimage.binary_fill_holes(ndimage.binary_opening(cell, _disk(2)) | nucleus)
        cell_labels, pieces = ndimage.label(cell)
        if pieces > 1:
            sizes = ndimage.sum(cell, cell_labels, range(1, pieces + 1))
            cell = cell_labels == int(np.argmax(sizes)) + 1
        candidates.append(_Candidate(cell, nucleus & cell, plausible_cell(cell, nucleus)))
    return candidates


def _downscale(image: np.ndarray, side: int) -> np.ndarray:
    height, width = image.shape[:2]
    scale = min(1.0, side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    return image


def _nucleus_threshold(score: np.ndarray) -> float:
    threshold = _otsu(score)
    if threshold < NUCLEUS_SCORE_FLOOR:
        # Otsu split the background from red cells (faint nuclei or none): split what is above the floor.
        above = score[score > NUCLEUS_SCORE_FLOOR]
        threshold = max(NUCLEUS_SCORE_FLOOR, _otsu(above)) if above.size > 20 else NUCLEUS_SCORE_FLOOR
    return threshold


def _otsu(values: np.ndarray, bins: int = 256) -> float:
    values = values.ravel()
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return high
    hist, edges = np.histogram(values, bins=bins, range=(low, high))
    hist = hist.astype(np.float64)
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    sum_low = np.cumsum(hist * centres)
    mean_low = sum_low / np.maximum(weight_low, 1e-12)
    mean_high = (sum_low[-1] - sum_low) / np.maximum(weight_high, 1e-12)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centres[int(np.argmax(between[:-1]))])


def _disk(radius: float) -> np.ndarray:
    r = max(int(round(radius)), 1)
    y, x = np.ogrid[-r:r + 1, -r:r + 1]
    return x * x + y * y <= r * r


def _flood(levels: np.ndarray, seeds: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Seeded watershed by level flooding: at each level, labels grow one pixel per pass into unlabelled
    mask pixels of that level or lower, all labels at once, so ties split evenly."""
    labels = seeds.copy()
    neighbours = np.zeros_like(labels)
    for level in range(int(levels.max()) + 1):
        open_pixels = mask & (levels <= level)
        while True:
            todo = open_pixels & (labels == 0)
            if not todo.any():
                break
            neighbours[:] = 0
            np.maximum(neighbours[1:], labels[:-1], out=neighbours[1:])
            np.maximum(neighbours[:-1], labels[1:], out=neighbours[:-1])
            np.maximum(neighbours[:, 1:], labels[:, :-1], out=neighbours[:, 1:])
            np.maximum(neighbours[:, :-1], labels[:, 1:], out=neighbours[:, :-1])
            grow = todo & (neighbours > 0)
            if not grow.any():
                break
            labels[grow] = neighbours[grow]
    return labels


def solid_part(cell: np.ndarray, nucleus: np.ndarray) -> np.ndarray:
    """The part of an implausible ``cell`` mask that is the white cell itself. Where the flooding leaked into
    touching red cells, they hang on the cell as round lobes; a red cell is about half a white cell across
    (7-8 against 10-15 micrometres), so opening by a disc a little under the largest one the mask holds (the
    white cell's body) removes them and keeps the body. Discs of growing radius are tried, the piece that
    holds the nucleus kept: the first that is solid is returned, else the most solid, the mask as given
    included (a solid mask is returned as it is)."""
    best, best_solidity = cell, solidity(cell)
    if best_solidity >= MIN_SOLIDITY:
        return cell
    radius = float(ndimage.distance_transform_edt(cell).max())
    for share in OPENING_SHARES:
        opened = ndimage.binary_opening(cell, _disk(share * radius)) | nucleus
        pieces, _ = ndimage.label(opened)
        part = ndimage.binary_fill_holes(np.isin(pieces, np.unique(pieces[nucleus & (pieces > 0)])))
        part_solidity = solidity(part)
        if part_solidity >= MIN_SOLIDITY:
            return part
        if part_solidity > best_solidity:
            best, best_solidity = part, part_solidity
    return best


def plausible_cell(cell: np.ndarray, nucleus: np.ndarray) -> bool:
    """A whole white cell, as far as its mask can tell: solid, and not many times larger than its nucleus."""
    return solidity(cell) >= MIN_SOLIDITY and cell.sum() <= MAX_CELL_TO_NUCLEUS * nucleus.sum()


def solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area (pixel-centre hull widened by half a pixel all round)."""
    from scipy.spatial import ConvexHull, QhullError

    rows, cols = np.nonzero(mask & ~ndimage.binary_erosion(mask))
    if rows.size < 5:
        return 0.0
    try:
        hull = ConvexHull(np.stack([cols, rows], axis=1).astype(np.float64))
    except QhullError:  # all boundary pixels on a line
        return 0.0
    return float(mask.sum() / (hull.volume + hull.area / 2 + 1))


def mask_from_box(image: np.ndarray, box: np.ndarray) -> np.ndarray:
    """A whole-cell mask for a box-only annotation: the stain segmentation of the box's surroundings
    when it finds a cell that fills the box, else the ellipse inscribed in the box."""
    height, width = image.shape[:2]
    x0, y0, x1, y1 = box_pixels(box, (height, width))
    mask = np.zeros((height, width), bool)
    if x1 - x0 < 2 or y1 - y0 < 2:
        return mask
    pad_x, pad_y = (x1 - x0) // 4 + 1, (y1 - y0) // 4 + 1
    cx0, cy0 = max(0, x0 - pad_x), max(0, y0 - pad_y)
    cx1, cy1 = min(width, x1 + pad_x), min(height, y1 + pad_y)
    crop = image[cy0:cy1, cx0:cx1]
    candidates = segment_cells(crop)
    box_in_crop = np.array([x0 - cx0, y0 - cy0, x1 - cx0, y1 - cy0], np.float32)
    for candidate in candidates:
        cell = resize_mask(candidate.mask, crop.shape[:2])
        if cell.any() and candidate.plausible and box_iou(mask_box(cell), box_in_crop) >= 0.7:
            mask[cy0:cy1, cx0:cx1] = cell
            mask[:, :x0] = mask[:, x1:] = False
            mask[:y0] = mask[y1:] = False
            return mask
    rows, cols = np.ogrid[y0:y1, x0:x1]
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2
    mask[y0:y1, x0:x1] = ((cols + 0.5 - cx) / rx) ** 2 + ((rows + 0.5 - cy) / ry) ** 2 <= 1
    return mask
