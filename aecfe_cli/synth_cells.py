"""What the synthetic smears hold: plasma, red cells, platelets and the white cell of each class.

Each class has its own morphology (nuclear shape, chromatin texture, granules, cytoplasm amount and tint),
with sizes in microns relative to a 7.5 um red blood cell. Everything is painted as concentrations of
three stains on a ``synth_shapes.Canvas``; ``synth`` develops them into the image a lab would save.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from aecfe_cli.synth_shapes import (
    Canvas,
    Outline,
    SdfFunction,
    coverage,
    ellipse_sdf,
    granule_map,
    points_inside,
    segment_sdf,
    smooth_union,
    texture,
    wave_field,
)

CLASSES: tuple[str, ...] = (
    "neutrophil_segmented",
    "lymphocyte_typical",
    "monocyte",
    "eosinophil",
    "basophil",
    "myeloblast",
)

Rgb = tuple[float, float, float]

_NUCLEAR, _CYTOPLASM, _EOSIN = 0, 1, 2
_RBC_RADIUS_UM = 3.75
# Cell diameters in microns (hematology atlases); the red cell is 7.5 um.
_DIAMETER_UM: dict[str, tuple[float, float]] = {
    "neutrophil_segmented": (12.0, 14.5),
    "lymphocyte_typical": (8.0, 10.0),
    "monocyte": (15.0, 19.0),
    "eosinophil": (12.5, 16.0),
    "basophil": (10.5, 13.5),
    "myeloblast": (13.0, 17.0),
}


# ---------------------------------------------------------------------------------------------------
# Background, red cells and platelets


def draw_plasma(canvas: Canvas, rng: np.random.Generator) -> None:
    """A faint, uneven pink-lilac film of plasma proteins between the cells."""
    shape = (canvas.height, canvas.width)
    unevenness = texture(rng, shape, 8 * canvas.px_per_um)
    canvas.stains[_EOSIN] += 0.035 * (1 + 0.35 * unevenness)
    canvas.stains[_NUCLEAR] += 0.012


def _draw_red_cell(canvas: Canvas, rng: np.random.Generator, centre_um: tuple[float, float], radius_um: float) -> None:
    """A biconcave disc: eosin-stained haemoglobin, thicker at the rim, pale in the centre."""
    centre_px = (centre_um[0] * canvas.px_per_um, centre_um[1] * canvas.px_per_um)
    found = canvas.patch(centre_px, radius_um * 1.15)
    if found is None:
        return
    region, x, y = found
    aspect = rng.uniform(1.0, 1.08)
    sdf = ellipse_sdf(x, y, 0, 0, radius_um * aspect, radius_um / aspect, rng.uniform(0, math.pi))
    sdf = sdf + wave_field(rng, 4 * radius_um, 0.08, n_waves=3)(x, y)
    cover = canvas.coverage(sdf, softness_px=1.2)
    depth = np.clip(sdf / radius_um, 0, 1)  # 0 at the rim, 1 at the centre
    pallor_size = rng.uniform(0.4, 0.6)
    # Fourth power: the pale centre has a defined but soft edge, like the dimple of a biconcave disc.
    pallor = rng.uniform(0.5, 0.75) * np.exp(-(((1 - depth) / pallor_size) ** 4))
    thickness = rng.uniform(0.5, 0.65) * (1 - pallor) * (1 + 0.15 * np.exp(-((depth / 0.12) ** 2)))
    canvas.stains[_EOSIN][region] += cover * thickness
    canvas.stains[_NUCLEAR][region] += cover * 0.03


def _draw_platelet(canvas: Canvas, rng: np.random.Generator, centre_um: tuple[float, float]) -> None:
    """A small irregular purple fragment with granular centre (granulomere) and paler edge."""
    centre_px = (centre_um[0] * canvas.px_per_um, centre_um[1] * canvas.px_per_um)
    radius = rng.uniform(0.8, 1.5)
    found = canvas.patch(centre_px, radius * 1.5)
    if found is None:
        return
    region, x, y = found
    outline = Outline(rng, radius, irregularity=0.25, aspect=rng.uniform(1.0, 1.4))
    sdf = outline.sdf(x, y)
    cover = canvas.coverage(sdf)
    grains = np.clip(0.55 + 0.35 * texture(rng, cover.shape, 0.5 * canvas.px_per_um), 0.1, None)
    centre_weight = np.clip(sdf / radius + 0.3, 0, 1)  # the pale hyalomere rim holds no granules
    canvas.stains[_NUCLEAR][region] += cover * grains * centre_weight
    canvas.stains[_CYTOPLASM][region] += cover * 0.2


def draw_red_cells_and_platelets(
    canvas: Canvas,
    rng: np.random.Generator,
    rbc_density: float,
    obstacles: list[tuple[float, float, float]],
    platelet_rate: float,
) -> None:
    """Scatter red cells (some cut by the border) around the white cells, nearly touching but not piled.

    ``obstacles`` are white cells as (x, y, radius) in microns; red cells keep clear of them.
    """
    width_um, height_um = canvas.width / canvas.px_per_um, canvas.height / canvas.px_per_um
    density = rbc_density * rng.uniform(0.8, 1.15)
    area = (width_um + 2 * _RBC_RADIUS_UM) * (height_um + 2 * _RBC_RADIUS_UM)
    target = int(density * area / (math.pi * _RBC_RADIUS_UM**2))
    candidates = target * 4 + 10
    xs = rng.uniform(-_RBC_RADIUS_UM, width_um + _RBC_RADIUS_UM, candidates)
    ys = rng.uniform(-_RBC_RADIUS_UM, height_um + _RBC_RADIUS_UM, candidates)
    radii = rng.normal(_RBC_RADIUS_UM, 0.22, candidates)
    # 0.92: neighbouring red cells may touch and overlap slightly, as in a real monolayer.
    clash = np.hypot(xs[:, None] - xs[None, :], ys[:, None] - ys[None, :]) < 0.92 * (radii[:, None] + radii[None, :])
    blocked = np.zeros(candidates, bool)
    for ox, oy, radius in obstacles:
        blocked |= np.hypot(xs - ox, ys - oy) < radius + 0.4 + 0.92 * radii
    placed = 0
    for index in range(candidates):  # greedy dart throwing: first come, first placed
        if placed >= target:
            break
        if not blocked[index]:
            blocked |= clash[index]
            placed += 1
            _draw_red_cell(canvas, rng, (float(xs[index]), float(ys[index])), float(radii[index]))
    n_platelets = rng.poisson(platelet_rate * width_um * height_um / 676.0)
    for x, y in zip(rng.uniform(0, width_um, n_platelets), rng.uniform(0, height_um, n_platelets)):
        if all(math.hypot(x - ox, y - oy) > r + 1.5 for ox, oy, r in obstacles):
            _draw_platelet(canvas, rng, (x, y))


# ---------------------------------------------------------------------------------------------------
# White cells


@dataclass(frozen=True)
class WbcPlan:
    """A white cell chosen but not yet drawn."""

    cls: str
    outline: Outline


def plan_wbc(cls: str, rng: np.random.Generator) -> WbcPlan:
    """Choose the outline first, so red cells can be placed around it before the cell is drawn."""
    low, high = _DIAMETER_UM[cls]
    irregularity = {"monocyte": 0.10, "myeloblast": 0.05, "lymphocyte_typical": 0.04}.get(cls, 0.06)
    return WbcPlan(cls, Outline(rng, rng.uniform(low, high) / 2, irregularity, aspect=rng.uniform(1.0, 1.1)))


def draw_wbc(
    canvas: Canvas, plan: WbcPlan, centre_px: tuple[float, float], rng: np.random.Generator
) -> tuple[tuple[slice, slice], np.ndarray]:
    """Draw a white cell; return its canvas region and boolean outline mask (coverage >= 0.5)."""
    region, x, y = canvas.patch(centre_px, plan.outline.max_radius + 0.5)
    cell_sdf = plan.outline.sdf(x, y)
    cell = canvas.coverage(cell_sdf, softness_px=1.3)
    context = _CellContext(
        rng=rng,
        x=x,
        y=y,
        cell=cell,
        cell_sdf=plan.outline.sdf,
        radius=plan.outline.radius,
        max_radius=plan.outline.max_radius,
        px_per_um=canvas.px_per_um,
        origin=(float(x[0, 0]) - 0.5 / canvas.px_per_um, float(y[0, 0]) - 0.5 / canvas.px_per_um),
    )
    stains = _CELL_PAINTERS[plan.cls](context)
    for index in range(3):
        canvas.stains[index][region] += stains[index]
    return region, cell >= 0.5


@dataclass(frozen=True)
class _CellContext:
    """What every class painter needs: coordinates of the patch and the cell body drawn so far."""

    rng: np.random.Generator
    x: np.ndarray  # (1, w) microns from the cell centre
    y: np.ndarray  # (h, 1)
    cell: np.ndarray  # (h, w) coverage of the cell body
    cell_sdf: SdfFunction
    radius: float
    max_radius: float
    px_per_um: float
    origin: tuple[float, float]  # micron position of the patch's top-left pixel corner

    @property
    def shape(self) -> tuple[int, int]:
        return self.cell.shape

    def coverage(self, sdf: np.ndarray, softness_px: float = 1.0) -> np.ndarray:
        return coverage(sdf, self.px_per_um, softness_px)

    def texture(self, feature_um: float) -> np.ndarray:
        return texture(self.rng, self.shape, feature_um * self.px_per_um)

    def granules(self, points: np.ndarray, sigma_um: float, peak: float, spread: float = 0.3) -> np.ndarray:
        peaks = peak * self.rng.uniform(1 - spread, 1 + spread, len(points)).astype(np.float32)
        return granule_map(self.shape, points, self.origin, self.px_per_um, sigma_um, peaks)

    def ellipse(self, cx: float, cy: float, a: float, b: float, angle: float) -> np.ndarray:
        return ellipse_sdf(self.x, self.y, cx, cy, a, b, angle)

    def wobble(self, wavelength_um: float, amplitude_um: float) -> np.ndarray:
        """A smooth random offset for a signed distance, so that outlines look organic, not geometric."""
        return wave_field(self.rng, wavelength_um, amplitude_um)(self.x, self.y)

    def sample(self, grid: np.ndarray, points: np.ndarray) -> np.ndarray:
        """Values of a patch-sized array at micron points (nearest pixel)."""
        cols = np.clip(((points[:, 0] - self.origin[0]) * self.px_per_um).astype(int), 0, self.shape[1] - 1)
        rows = np.clip(((points[:, 1] - self.origin[1]) * self.px_per_um).astype(int), 0, self.shape[0] - 1)
        return grid[rows, cols]


def _chromatin(
    ctx: _CellContext, nucleus: np.ndarray, nucleus_sdf: np.ndarray, density: float, clump_um: float, contrast: float
) -> np.ndarray:
    """Nuclear stain: clumped chromatin (dark blocks, pale parachromatin) condensed under the membrane."""
    clumps = ctx.texture(clump_um)
    fine = ctx.texture(clump_um * 0.45)
    pattern = np.clip(1 + contrast * np.tanh(1.2 * clumps + 0.5 * fine), 0.15, None)
    membrane = 1 + 0.25 * np.exp(-((np.maximum(nucleus_sdf, 0) / 0.35) ** 2))
    return nucleus * density * pattern * membrane


def _cytoplasm(ctx: _CellContext, nucleus: np.ndarray, tint: Rgb, texture_um: float, unevenness: float) -> np.ndarray:
    """Stains (nuclear, cytoplasm, eosin) of the cytoplasm: the cell body where there is no nucleus."""
    amount = ctx.cell * (1 - nucleus) * (1 + unevenness * ctx.texture(texture_um))
    return np.stack([amount * tint[0], amount * tint[1], amount * tint[2]])


def _round_nucleus(
    ctx: _CellContext, size: float, max_shift: float, wobble_um: float
) -> tuple[np.ndarray, float, float]:
    """Signed distance of a slightly eccentric, slightly oval nucleus ``size`` times the cell radius.

    Returns the distance grid and the nucleus centre; the nucleus is kept just inside the cell membrane.
    """
    rng = ctx.rng
    radius = ctx.radius * size
    angle, shift = rng.uniform(0, 2 * math.pi), ctx.radius * rng.uniform(0.03, max_shift)
    cx, cy = shift * math.cos(angle), shift * math.sin(angle)
    aspect = rng.uniform(1.0, 1.14)
    sdf = ctx.ellipse(cx, cy, radius * aspect, radius / aspect, rng.uniform(0, math.pi))
    sdf = sdf + ctx.wobble(2.5 * radius, wobble_um)
    return np.minimum(sdf, ctx.cell_sdf(ctx.x, ctx.y) - 0.3), cx, cy


def _paint_lymphocyte(ctx: _CellContext) -> np.ndarray:
    """Small cell; large, round, dense nucleus; a thin rim of pale sky-blue cytoplasm."""
    rng = ctx.rng
    nucleus_sdf, _, _ = _round_nucleus(ctx, rng.uniform(0.76, 0.86), max_shift=0.12, wobble_um=0.15)
    nucleus = ctx.coverage(nucleus_sdf)
    stains = _cytoplasm(ctx, nucleus, (0.04, rng.uniform(0.65, 0.9), 0.03), 1.0, 0.12)
    stains[_NUCLEAR] += _chromatin(ctx, nucleus, nucleus_sdf, rng.uniform(2.1, 2.5), 0.9, 0.38)
    if rng.uniform() < 0.3:  # some lymphocytes carry a few azurophilic granules
        points = points_inside(rng, int(rng.integers(2, 6)), ctx.cell_sdf, ctx.max_radius, 0.3)
        stains[_NUCLEAR] += ctx.granules(points, 0.16, 0.7) * (1 - nucleus)
    return stains


def _paint_neutrophil(ctx: _CellContext) -> np.ndarray:
    """Three to five nuclear lobes along a C-shaped path, joined by thin filaments; pale lilac cytoplasm."""
    rng = ctx.rng
    n_lobes = int(rng.choice([3, 4, 5], p=[0.4, 0.4, 0.2]))
    arc_radius = ctx.radius * rng.uniform(0.42, 0.5)
    arc_span = rng.uniform(3.6, 5.2)  # radians: the lobed nucleus curls around most of the cell
    arc_start = rng.uniform(0, 2 * math.pi)
    lobe_size = ctx.radius * rng.uniform(0.21, 0.25) * (1.12 if n_lobes == 3 else 1.0)
    centres = []
    for i in range(n_lobes):
        theta = arc_start + arc_span * i / (n_lobes - 1) + rng.normal(0, 0.12)
        radial = arc_radius * rng.uniform(0.82, 1.1)
        centres.append((radial * math.cos(theta), radial * math.sin(theta)))
    nucleus_sdf = None
    for i, (cx, cy) in enumerate(centres):
        along_arc = math.atan2(cy, cx) + math.pi / 2 + rng.normal(0, 0.4)
        long_axis, short_axis = lobe_size * rng.uniform(1.05, 1.35), lobe_size * rng.uniform(0.75, 0.95)
        lobe = ctx.ellipse(cx, cy, long_axis, short_axis, along_arc)
        nucleus_sdf = lobe if nucleus_sdf is None else smooth_union(nucleus_sdf, lobe, 0.25)
        if i > 0:
            filament = segment_sdf(ctx.x, ctx.y, centres[i - 1], (cx, cy), rng.uniform(0.22, 0.4))
            nucleus_sdf = smooth_union(nucleus_sdf, filament, 0.3)
    nucleus_sdf = nucleus_sdf + ctx.wobble(2.0, 0.12)
    nucleus = ctx.coverage(nucleus_sdf)
    stains = _cytoplasm(ctx, nucleus, (0.06, 0.05, rng.uniform(0.28, 0.36)), 0.8, 0.1)
    stains[_NUCLEAR] += _chromatin(ctx, nucleus, nucleus_sdf, rng.uniform(1.9, 2.3), 0.7, 0.35)
    # Fine neutral granules: many tiny faint lilac dots, barely resolved.
    points = points_inside(rng, int(320 * (ctx.radius / 6.5) ** 2), ctx.cell_sdf, ctx.max_radius, 0.25)
    dots = ctx.granules(points, 0.14, 0.2, spread=0.5) * ctx.cell
    stains[_NUCLEAR] += 0.6 * dots
    stains[_EOSIN] += 0.6 * dots
    return stains


def _paint_eosinophil(ctx: _CellContext) -> np.ndarray:
    """Two nuclear lobes ("spectacles"); cytoplasm packed with coarse orange granules."""
    rng = ctx.rng
    axis = rng.uniform(0, math.pi)
    half_gap = ctx.radius * rng.uniform(0.28, 0.36)
    offset = ctx.radius * rng.uniform(0.0, 0.15)
    ox, oy = -offset * math.sin(axis), offset * math.cos(axis)
    ends = [(ox + sign * half_gap * math.cos(axis), oy + sign * half_gap * math.sin(axis)) for sign in (-1, 1)]
    lobe_size = ctx.radius * rng.uniform(0.26, 0.32)
    nucleus_sdf = segment_sdf(ctx.x, ctx.y, ends[0], ends[1], 0.35)
    for cx, cy in ends:
        long_axis, short_axis = lobe_size * rng.uniform(1.0, 1.2), lobe_size * rng.uniform(0.8, 0.95)
        lobe = ctx.ellipse(cx, cy, long_axis, short_axis, axis + math.pi / 2 + rng.normal(0, 0.3))
        nucleus_sdf = smooth_union(nucleus_sdf, lobe, 0.3)
    nucleus_sdf = nucleus_sdf + ctx.wobble(2.2, 0.12)
    nucleus = ctx.coverage(nucleus_sdf)
    stains = _cytoplasm(ctx, nucleus, (0.03, 0.12, 0.25), 1.0, 0.1)
    stains[_NUCLEAR] += _chromatin(ctx, nucleus, nucleus_sdf, rng.uniform(1.8, 2.1), 0.75, 0.3)
    # Coarse, uniform granules fill the cytoplasm; only a few lie over the nucleus.
    points = points_inside(rng, int(420 * (ctx.radius / 7.0) ** 2), ctx.cell_sdf, ctx.max_radius, 0.25)
    over_nucleus = ctx.sample(nucleus_sdf, points) > 0.0
    points = points[~over_nucleus | (rng.uniform(0, 1, len(points)) < 0.12)]
    granules = ctx.granules(points, 0.24, 1.0, spread=0.2)
    # Touching granules saturate instead of summing, so the packed cytoplasm reads as beads, not blots.
    stains[_EOSIN] += 1.5 * (1 - np.exp(-granules / 1.5)) * ctx.cell
    return stains


def _paint_basophil(ctx: _CellContext) -> np.ndarray:
    """Irregular, paler nucleus largely hidden under coarse purple-black granules."""
    rng = ctx.rng
    nucleus_sdf = None
    for _ in range(int(rng.integers(2, 4))):
        angle, shift = rng.uniform(0, 2 * math.pi), ctx.radius * rng.uniform(0.1, 0.3)
        size = ctx.radius * rng.uniform(0.35, 0.45)
        lobe_x, lobe_y = shift * math.cos(angle), shift * math.sin(angle)
        lobe = ctx.ellipse(lobe_x, lobe_y, size * 1.15, size * 0.85, rng.uniform(0, math.pi))
        nucleus_sdf = lobe if nucleus_sdf is None else smooth_union(nucleus_sdf, lobe, 0.5)
    nucleus_sdf = nucleus_sdf + ctx.wobble(2.5, 0.2)
    nucleus = ctx.coverage(nucleus_sdf, softness_px=1.5)
    stains = _cytoplasm(ctx, nucleus, (0.16, 0.12, 0.14), 1.0, 0.15)
    stains[_NUCLEAR] += _chromatin(ctx, nucleus, nucleus_sdf, rng.uniform(1.2, 1.5), 1.0, 0.2)
    # Large, unequal, very dark metachromatic granules over cytoplasm and nucleus alike.
    count = int(rng.uniform(60, 110) * (ctx.radius / 6.0) ** 2)
    points = points_inside(rng, count, ctx.cell_sdf, ctx.max_radius, 0.2)
    granules = np.minimum(ctx.granules(points, rng.uniform(0.28, 0.38), 2.2, spread=0.45), 3.2) * ctx.cell
    stains[_NUCLEAR] += granules
    stains[_EOSIN] += 0.1 * granules
    return stains


def _paint_monocyte(ctx: _CellContext) -> np.ndarray:
    """Large cell; folded kidney or horseshoe nucleus with lacy chromatin; grey-blue cytoplasm, vacuoles."""
    rng = ctx.rng
    axis = rng.uniform(0, 2 * math.pi)
    shift = ctx.radius * rng.uniform(0.1, 0.22)
    cx, cy = shift * math.cos(axis), shift * math.sin(axis)
    a, b = ctx.radius * rng.uniform(0.55, 0.66), ctx.radius * rng.uniform(0.42, 0.5)
    body = ctx.ellipse(cx, cy, a, b, axis + math.pi / 2)
    # A bite out of the side facing the cell centre: shallow gives a kidney, deep a horseshoe.
    bite_radius = b * rng.uniform(0.6, 1.0)
    bite_distance = b + bite_radius - b * rng.uniform(0.3, 0.9)
    bx, by = cx - bite_distance * math.cos(axis), cy - bite_distance * math.sin(axis)
    bite = bite_radius - np.hypot(ctx.x - bx, ctx.y - by)
    nucleus_sdf = np.minimum(body, -bite) + ctx.wobble(4.0, 0.18)
    nucleus = ctx.coverage(nucleus_sdf)
    stains = _cytoplasm(ctx, nucleus, (0.1, rng.uniform(0.42, 0.55), 0.14), 0.8, 0.1)
    # Lacy chromatin: paler and finer than a lymphocyte's.
    stains[_NUCLEAR] += _chromatin(ctx, nucleus, nucleus_sdf, rng.uniform(1.25, 1.5), 0.55, 0.4)
    n_vacuoles = int(rng.choice([0, 0, 1, 2, 3, 5]))
    if n_vacuoles:
        clear = np.zeros(ctx.shape, np.float32)
        for vx, vy in points_inside(rng, n_vacuoles, ctx.cell_sdf, ctx.max_radius, 1.0):
            clear = np.maximum(clear, ctx.coverage(rng.uniform(0.3, 0.7) - np.hypot(ctx.x - vx, ctx.y - vy)))
        stains *= 1 - 0.75 * clear * (1 - nucleus)
    # Sparse fine azurophilic dust gives the "ground glass" look.
    points = points_inside(rng, int(70 * (ctx.radius / 8.5) ** 2), ctx.cell_sdf, ctx.max_radius, 0.3)
    stains[_NUCLEAR] += ctx.granules(points, 0.13, 0.25, spread=0.5) * ctx.cell * (1 - nucleus)
    return stains


def _paint_myeloblast(ctx: _CellContext) -> np.ndarray:
    """Large round nucleus with fine chromatin and pale nucleoli; scant deep-blue cytoplasm."""
    rng = ctx.rng
    nucleus_sdf, cx, cy = _round_nucleus(ctx, rng.uniform(0.74, 0.84), max_shift=0.12, wobble_um=0.15)
    nucleus = ctx.coverage(nucleus_sdf)
    stains = _cytoplasm(ctx, nucleus, (0.05, rng.uniform(1.0, 1.3), 0.02), 0.8, 0.12)
    # Fine, even ("sieve-like") chromatin, less dense than in mature cells.
    chromatin = _chromatin(ctx, nucleus, nucleus_sdf, rng.uniform(1.35, 1.6), 0.32, 0.16)
    nucleoli = np.zeros(ctx.shape, np.float32)
    for _ in range(int(rng.integers(1, 5))):
        r, theta = rng.uniform(0, 0.45) * ctx.radius, rng.uniform(0, 2 * math.pi)
        long_axis, short_axis = rng.uniform(0.45, 0.8), rng.uniform(0.35, 0.6)
        nucleolus = ctx.ellipse(cx + r * math.cos(theta), cy + r * math.sin(theta), long_axis, short_axis, theta)
        nucleoli = np.maximum(nucleoli, ctx.coverage(nucleolus, softness_px=1.8))
    # Nucleoli hold little chromatin and much RNA: paler, and blue-grey.
    stains[_NUCLEAR] += chromatin * (1 - 0.6 * nucleoli)
    stains[_CYTOPLASM] += 0.45 * nucleoli * nucleus
    return stains


_CELL_PAINTERS: dict[str, Callable[[_CellContext], np.ndarray]] = {
    "neutrophil_segmented": _paint_neutrophil,
    "lymphocyte_typical": _paint_lymphocyte,
    "monocyte": _paint_monocyte,
    "eosinophil": _paint_eosinophil,
    "basophil": _paint_basophil,
    "myeloblast": _paint_myeloblast,
}
