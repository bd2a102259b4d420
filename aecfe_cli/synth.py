"""Deterministic synthetic blood-smear images: the embedded data every command, test and demo runs on.

Nothing is downloaded. Images are drawn the way a bright-field microscope forms them: every structure
deposits an amount of one of three stains, and light passing the slide is attenuated per colour channel
by Beer-Lambert's law, ``I = illumination * exp(-sum(concentration * optical_density))``. The stains are

* the nuclear (azure-eosinate) stain: chromatin, basophil granules, platelets, fine neutrophil granules;
* the cytoplasm (basophilic, RNA-binding) stain: the blue of lymphocyte, monocyte and blast cytoplasm;
* eosin: red blood cells, eosinophil granules and the pink of neutrophil cytoplasm.

Each cell class has its own morphology (nuclear shape, chromatin texture, granules, cytoplasm amount and
tint), with sizes in microns relative to a 7.5 um red blood cell. Each laboratory domain has its own
stain colours and strength, lamp colour, illumination fall-off, focus blur, magnification, sensor noise
and JPEG quality, so that colour alone does not transfer between domains while morphology does.

Everything random comes from the ``numpy.random.Generator`` passed in or derived from the seed, so the
same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from aecfe_cli.errors import UserError
from aecfe_cli.io import atomic_path, write_json

CLASSES: tuple[str, ...] = (
    "neutrophil_segmented",
    "lymphocyte_typical",
    "monocyte",
    "eosinophil",
    "basophil",
    "myeloblast",
)

Rgb = tuple[float, float, float]


@dataclass(frozen=True)
class DomainStyle:
    """How one laboratory's staining, microscope and camera render the same cells."""

    name: str
    description: str
    nuclear_stain_od: Rgb  # optical density per R, G, B channel at unit stain concentration
    cytoplasm_stain_od: Rgb
    eosin_stain_od: Rgb
    stain_strength: float  # staining time / dye concentration: scales every optical density
    stain_jitter: float  # slide-to-slide variation of stain strength (log-normal sigma)
    background_rgb: tuple[int, int, int]  # lamp colour and white balance seen through empty slide
    vignetting: float  # relative darkening at the image corners
    illumination_gradient: float  # relative brightness change across the image (uneven lamp)
    blur_um: float  # focus blur (Gaussian radius) in microns of specimen
    crop_width_um: float  # width of specimen a cell crop shows: sets the apparent cell size
    rbc_density: float  # fraction of free slide area covered by red cells (smear thickness)
    noise_std: float  # sensor noise, in 8-bit grey levels
    jpeg_quality: int  # quality the lab's camera software saves with

    @property
    def stain_matrix(self) -> np.ndarray:
        """Rows: nuclear, cytoplasm, eosin stain; columns: optical density in R, G, B."""
        return np.array([self.nuclear_stain_od, self.cytoplasm_stain_od, self.eosin_stain_od], np.float32)


DOMAINS: dict[str, DomainStyle] = {
    style.name: style
    for style in (
        DomainStyle(
            name="lab_a",
            description="May-Grunwald-Giemsa, purple nuclei, pinkish background, sharp, high JPEG quality",
            nuclear_stain_od=(0.50, 0.80, 0.30),
            cytoplasm_stain_od=(0.48, 0.27, 0.09),
            eosin_stain_od=(0.03, 0.46, 0.62),
            stain_strength=1.0,
            stain_jitter=0.06,
            background_rgb=(246, 236, 240),
            vignetting=0.06,
            illumination_gradient=0.03,
            blur_um=0.12,
            crop_width_um=26.0,
            rbc_density=0.55,
            noise_std=1.5,
            jpeg_quality=95,
        ),
        DomainStyle(
            name="lab_b",
            description="rapid Wright-type stain, blue-violet nuclei, grey background, stronger, noisier",
            nuclear_stain_od=(0.78, 0.70, 0.20),
            cytoplasm_stain_od=(0.62, 0.32, 0.05),
            eosin_stain_od=(0.03, 0.40, 0.36),
            stain_strength=1.12,
            stain_jitter=0.08,
            background_rgb=(222, 227, 233),
            vignetting=0.10,
            illumination_gradient=0.08,
            blur_um=0.22,
            crop_width_um=23.0,
            rbc_density=0.65,
            noise_std=3.5,
            jpeg_quality=80,
        ),
        DomainStyle(
            name="lab_c",
            description="pale Giemsa under a warm halogen lamp, magenta nuclei, yellowish, soft focus, low JPEG",
            nuclear_stain_od=(0.40, 0.84, 0.42),
            cytoplasm_stain_od=(0.40, 0.28, 0.16),
            eosin_stain_od=(0.02, 0.46, 0.70),
            stain_strength=0.82,
            stain_jitter=0.10,
            background_rgb=(248, 236, 200),
            vignetting=0.22,
            illumination_gradient=0.05,
            blur_um=0.40,
            crop_width_um=30.0,
            rbc_density=0.45,
            noise_std=2.5,
            jpeg_quality=60,
        ),
    )
}

_NUCLEAR, _CYTOPLASM, _EOSIN = 0, 1, 2
# Fields are drawn at the magnification a 128-pixel cell crop of the same domain has.
_FIELD_REFERENCE_CROP_PX = 128
_MIN_SIZE_PX = 16
_RBC_RADIUS_UM = 3.75
# Random-stream id of fields; cell crops use their class index, so the two never share a stream.
_FIELD_STREAM = 1_000_000
# Cell diameters in microns (hematology atlases); the red cell is 7.5 um.
_DIAMETER_UM: dict[str, tuple[float, float]] = {
    "neutrophil_segmented": (12.0, 14.5),
    "lymphocyte_typical": (8.0, 10.0),
    "monocyte": (15.0, 19.0),
    "eosinophil": (12.5, 16.0),
    "basophil": (10.5, 13.5),
    "myeloblast": (13.0, 17.0),
}

SdfFunction = Callable[[np.ndarray, np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------------------------------
# Public API


def render_cell_image(cls: str, style: DomainStyle, rng: np.random.Generator, size: int) -> np.ndarray:
    """One ``(size, size, 3)`` uint8 crop: a ``cls`` white cell near the centre among red cells.

    The crop always shows ``style.crop_width_um`` of specimen, so smaller sizes are lower resolution,
    not a different magnification. The domain's JPEG artefacts are already in the returned pixels.
    """
    _check_class(cls)
    if size < _MIN_SIZE_PX:
        raise UserError(f"synthetic image size {size} is too small: use at least {_MIN_SIZE_PX} pixels")
    canvas = _Canvas(size, size, px_per_um=size / style.crop_width_um)
    _draw_plasma(canvas, rng)
    jitter_px = 0.04 * size
    centre = (size / 2 + rng.uniform(-jitter_px, jitter_px), size / 2 + rng.uniform(-jitter_px, jitter_px))
    cell = _plan_wbc(cls, rng)
    obstacles = [(centre[0] / canvas.px_per_um, centre[1] / canvas.px_per_um, cell.outline.max_radius)]
    _draw_red_cells_and_platelets(canvas, rng, style, obstacles, platelet_rate=0.5)
    _draw_wbc(canvas, cell, centre, rng)
    return _develop(canvas, style, rng)


def write_cell_dataset(out: Path, domain: str, per_class: int, seed: int, size: int = 128) -> dict[str, int]:
    """Write ``out/<class>/<domain>_<class>_<NNNN>.png`` for every class; return the count per class.

    Image ``i`` of a class depends only on (seed, domain, class, i), so asking for more images per
    class keeps the earlier ones identical.
    """
    style = _domain_style(domain)
    _check_seed(seed)
    if per_class < 0:
        raise UserError(f"images per class must be 0 or more, got {per_class}")
    out = Path(out)
    counts: dict[str, int] = {}
    for class_index, cls in enumerate(CLASSES):
        for index in range(per_class):
            rng = _image_rng(seed, domain, class_index, index)
            image = render_cell_image(cls, style, rng, size)
            _save_png(out / cls / f"{domain}_{cls}_{index:04d}.png", image)
        counts[cls] = per_class
    return counts


def write_field_dataset(
    out: Path,
    domain: str,
    n_fields: int,
    seed: int,
    size: tuple[int, int] = (320, 240),
    cells_per_field: tuple[int, int] = (1, 3),
) -> int:
    """Write smear fields with white-cell instance masks and COCO annotations; return the field count.

    ``size`` is (width, height). Each field holds between ``cells_per_field[0]`` and
    ``cells_per_field[1]`` white cells (fewer when a large cell leaves no room), fully inside the field
    and not overlapping, among red cells. Mask value k marks the k-th white cell of its field.
    """
    style = _domain_style(domain)
    _check_seed(seed)
    width, height = size
    low, high = cells_per_field
    if n_fields < 0:
        raise UserError(f"number of fields must be 0 or more, got {n_fields}")
    if not 0 <= low <= high <= 255:
        raise UserError(f"cells per field must be a range 0 <= min <= max <= 255, got {cells_per_field}")
    if min(width, height) < _MIN_SIZE_PX:
        raise UserError(f"field size {size} is too small: use at least {_MIN_SIZE_PX} pixels a side")
    out = Path(out)
    images, annotations = [], []
    for field_index in range(n_fields):
        rng = _image_rng(seed, domain, _FIELD_STREAM, field_index)
        image, mask, classes = _render_field(style, rng, width, height, int(rng.integers(low, high + 1)))
        name = f"field_{field_index:04d}.png"
        _save_png(out / "images" / name, image)
        _save_png(out / "masks" / name, mask)
        image_id = field_index + 1
        images.append({"id": image_id, "file_name": f"images/{name}", "width": width, "height": height})
        for instance, cls in enumerate(classes, start=1):
            annotations.append(_coco_annotation(len(annotations) + 1, image_id, mask == instance, cls))
    write_json(
        out / "annotations.json",
        {
            "info": {"description": f"aecfe synthetic smear fields, domain {domain}, seed {seed}"},
            "images": images,
            "categories": [{"id": 1, "name": "wbc"}],
            "annotations": annotations,
        },
    )
    return n_fields


# ---------------------------------------------------------------------------------------------------
# Argument checks and seeding


def _domain_style(name: str) -> DomainStyle:
    if name not in DOMAINS:
        raise UserError(f"unknown synthetic domain '{name}': choose one of {', '.join(DOMAINS)}")
    return DOMAINS[name]


def _check_class(cls: str) -> None:
    if cls not in CLASSES:
        raise UserError(f"unknown synthetic cell class '{cls}': choose one of {', '.join(CLASSES)}")


def _check_seed(seed: int) -> None:
    if seed < 0:
        raise UserError(f"seed must be 0 or more, got {seed}")


def _image_rng(seed: int, domain: str, stream: int, index: int) -> np.random.Generator:
    # crc32 rather than hash(): Python salts str hashes per process, which would break determinism.
    return np.random.default_rng(np.random.SeedSequence([seed, zlib.crc32(domain.encode()), stream, index]))


# ---------------------------------------------------------------------------------------------------
# Canvas and shape primitives (signed distances in microns, positive inside)


# (row slice, column slice) of the canvas, x coordinates as a (1, w) row, y coordinates as an (h, 1) column.
_Patch = tuple[tuple[slice, slice], np.ndarray, np.ndarray]


class _Canvas:
    """Stain concentration maps of one image; shapes are drawn into local patches in micron coordinates."""

    def __init__(self, height: int, width: int, px_per_um: float) -> None:
        self.height, self.width, self.px_per_um = height, width, px_per_um
        self.stains = np.zeros((3, height, width), np.float32)

    def patch(self, centre_px: tuple[float, float], radius_um: float) -> _Patch | None:
        """Slices of the canvas around a centre, and pixel-centre coordinates in microns relative to it.

        ``None`` when the patch lies wholly outside the canvas (a red cell beyond the border).
        """
        radius_px = radius_um * self.px_per_um + 2
        cx, cy = float(centre_px[0]), float(centre_px[1])  # Python floats keep the grid float32
        x0, x1 = max(0, math.floor(cx - radius_px)), min(self.width, math.ceil(cx + radius_px))
        y0, y1 = max(0, math.floor(cy - radius_px)), min(self.height, math.ceil(cy + radius_px))
        if x0 >= x1 or y0 >= y1:
            return None
        xs = ((np.arange(x0, x1, dtype=np.float32) + 0.5) - cx) / self.px_per_um
        ys = ((np.arange(y0, y1, dtype=np.float32) + 0.5) - cy) / self.px_per_um
        return (slice(y0, y1), slice(x0, x1)), xs[None, :], ys[:, None]

    def coverage(self, sdf: np.ndarray, softness_px: float = 1.0) -> np.ndarray:
        return _coverage(sdf, self.px_per_um, softness_px)


def _coverage(sdf: np.ndarray, px_per_um: float, softness_px: float) -> np.ndarray:
    """Anti-aliased 0..1 coverage of a shape: a linear ramp about ``softness_px`` wide across its edge."""
    return np.clip(0.5 + sdf * (px_per_um / softness_px), 0.0, 1.0)


def _ellipse_sdf(x, y, cx: float, cy: float, a: float, b: float, angle: float) -> np.ndarray:
    cos, sin = math.cos(angle), math.sin(angle)
    u = (x - cx) * cos + (y - cy) * sin
    v = (y - cy) * cos - (x - cx) * sin
    level = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    # First-order distance: level-set offset divided by its gradient length, exact at the boundary.
    gradient = np.sqrt((u / (a * a)) ** 2 + (v / (b * b)) ** 2) / np.maximum(level, 1e-6)
    return (1.0 - level) / np.maximum(gradient, 1e-6)


def _segment_sdf(x, y, start: tuple[float, float], end: tuple[float, float], half_width: float) -> np.ndarray:
    dx, dy = end[0] - start[0], end[1] - start[1]
    t = np.clip(((x - start[0]) * dx + (y - start[1]) * dy) / max(dx * dx + dy * dy, 1e-9), 0.0, 1.0)
    return half_width - np.hypot(x - start[0] - t * dx, y - start[1] - t * dy)


def _smooth_union(a: np.ndarray, b: np.ndarray, blend_um: float) -> np.ndarray:
    """Union that rounds the junction, so nuclear lobes merge into their strands like soft tissue."""
    h = np.clip(0.5 + 0.5 * (a - b) / blend_um, 0.0, 1.0)
    return b + (a - b) * h + blend_um * h * (1.0 - h)


def _wave_field(rng: np.random.Generator, wavelength_um: float, amplitude_um: float, n_waves: int = 5) -> SdfFunction:
    """Smooth random field (sum of plane waves) that bends an outline organically; point-evaluable."""
    angles = rng.uniform(0, 2 * math.pi, n_waves)
    frequencies = 2 * math.pi / (wavelength_um * rng.uniform(0.7, 1.4, n_waves))
    phases = rng.uniform(0, 2 * math.pi, n_waves)
    # Python floats keep float32 grids in float32 (NumPy scalars would promote them to float64).
    waves = [
        (float(f * math.cos(a)), float(f * math.sin(a)), float(p)) for f, a, p in zip(frequencies, angles, phases)
    ]
    scale = amplitude_um * math.sqrt(2.0 / n_waves)

    def field(x, y):
        # cos(kx*x + ky*y + p) expanded, so that on a grid (x a row, y a column) the trigonometry is
        # evaluated on the row and column only and the grid costs two products per wave.
        total = 0.0
        for kx, ky, phase in waves:
            along_x, along_y = kx * x, ky * y + phase
            total = total + (np.cos(along_x) * np.cos(along_y) - np.sin(along_x) * np.sin(along_y))
        return scale * total

    return field


class _Outline:
    """A roundish cell outline: radius modulated by low harmonics of the polar angle."""

    def __init__(self, rng: np.random.Generator, radius_um: float, irregularity: float, aspect: float = 1.0) -> None:
        self.radius = radius_um
        amplitudes = irregularity * rng.normal(0, 1, 4) / np.arange(2, 6)
        phases = rng.uniform(0, 2 * math.pi, 4)
        # Harmonics k = 2..5 as (a cos(p), a sin(p)), so cos(k theta + p) needs no trigonometry per pixel.
        self.harmonics = [(float(a * math.cos(p)), float(a * math.sin(p))) for a, p in zip(amplitudes, phases)]
        self.aspect, self.angle = aspect, rng.uniform(0, math.pi)
        self.max_radius = radius_um * (1 + float(np.abs(amplitudes).sum())) * max(aspect, 1 / aspect)

    def sdf(self, x, y) -> np.ndarray:
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        u = (x * cos + y * sin) / self.aspect
        v = (y * cos - x * sin) * self.aspect
        distance = np.hypot(u, v)
        cos_1, sin_1 = u / np.maximum(distance, 1e-6), v / np.maximum(distance, 1e-6)
        cos_k, sin_k = cos_1, sin_1
        boundary = 1.0
        for a_cos, a_sin in self.harmonics:
            cos_k, sin_k = cos_k * cos_1 - sin_k * sin_1, sin_k * cos_1 + cos_k * sin_1  # angle-addition
            boundary = boundary + (a_cos * cos_k - a_sin * sin_k)
        return self.radius * boundary - distance


def _texture(rng: np.random.Generator, shape: tuple[int, int], feature_px: float) -> np.ndarray:
    """Zero-mean, unit-variance smooth noise with blobs about ``feature_px`` across (bicubic upsampling)."""
    height, width = shape
    feature_px = max(feature_px, 1.0)
    coarse = rng.standard_normal(
        (max(2, math.ceil(height / feature_px) + 2), max(2, math.ceil(width / feature_px) + 2)), dtype=np.float32
    )
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC), dtype=np.float32)
    return (smooth - smooth.mean()) / max(float(smooth.std()), 1e-6)


def _gaussian_blur(array: np.ndarray, sigma_px: float) -> np.ndarray:
    """Separable Gaussian blur of a 2-D float array with zero padding (Pillow cannot blur floats)."""
    if sigma_px < 0.3:
        return array
    radius = max(1, math.ceil(2.5 * sigma_px))
    offsets = np.arange(-radius, radius + 1)
    weights = np.exp(-0.5 * (offsets / sigma_px) ** 2).astype(np.float32)
    weights /= weights.sum()
    for axis in (0, 1):
        # Zero padding: nothing lies outside the patch, so nothing may be reflected back in.
        padded = np.pad(array, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)])
        length = array.shape[axis]
        array = sum(w * padded.take(np.arange(i, i + length), axis=axis) for i, w in enumerate(weights))
    return array


def _granule_map(
    shape: tuple[int, int],
    points_um: np.ndarray,
    origin_um: tuple[float, float],
    px_per_um: float,
    sigma_um: float,
    peaks: np.ndarray,
) -> np.ndarray:
    """Round dots of Gaussian profile: bilinear splats of each granule, then one blur for all of them."""
    height, width = shape
    sigma_px = max(sigma_um * px_per_um, 0.6)
    col = (points_um[:, 0] - origin_um[0]) * px_per_um - 0.5
    row = (points_um[:, 1] - origin_um[1]) * px_per_um - 0.5
    c0, r0 = np.floor(col).astype(int), np.floor(row).astype(int)
    fc, fr = col - c0, row - r0
    # Weight so each isolated dot peaks at its amplitude after the blur.
    weight = peaks * (2 * math.pi * sigma_px * sigma_px)
    splat = np.zeros((height, width), np.float32)
    for dr, dc, share in ((0, 0, (1 - fr) * (1 - fc)), (0, 1, (1 - fr) * fc), (1, 0, fr * (1 - fc)), (1, 1, fr * fc)):
        rows, cols = r0 + dr, c0 + dc
        inside = (rows >= 0) & (rows < height) & (cols >= 0) & (cols < width)
        np.add.at(splat, (rows[inside], cols[inside]), (weight * share)[inside])
    return _gaussian_blur(splat, sigma_px)


def _points_inside(
    rng: np.random.Generator, count: int, sdf: SdfFunction, radius_um: float, margin_um: float
) -> np.ndarray:
    """Up to ``count`` uniform points in the shape, at least ``margin_um`` from its edge."""
    if count <= 0:
        return np.zeros((0, 2), np.float32)
    candidates = count * 3 + 8
    r = radius_um * np.sqrt(rng.uniform(0, 1, candidates))
    theta = rng.uniform(0, 2 * math.pi, candidates)
    x, y = r * np.cos(theta), r * np.sin(theta)
    keep = sdf(x, y) > margin_um
    return np.stack([x[keep], y[keep]], axis=1)[:count].astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Background, red cells and platelets


def _draw_plasma(canvas: _Canvas, rng: np.random.Generator) -> None:
    """A faint, uneven pink-lilac film of plasma proteins between the cells."""
    shape = (canvas.height, canvas.width)
    unevenness = _texture(rng, shape, 8 * canvas.px_per_um)
    canvas.stains[_EOSIN] += 0.035 * (1 + 0.35 * unevenness)
    canvas.stains[_NUCLEAR] += 0.012


def _draw_red_cell(canvas: _Canvas, rng: np.random.Generator, centre_um: tuple[float, float], radius_um: float) -> None:
    """A biconcave disc: eosin-stained haemoglobin, thicker at the rim, pale in the centre."""
    centre_px = (centre_um[0] * canvas.px_per_um, centre_um[1] * canvas.px_per_um)
    found = canvas.patch(centre_px, radius_um * 1.15)
    if found is None:
        return
    region, x, y = found
    aspect = rng.uniform(1.0, 1.08)
    sdf = _ellipse_sdf(x, y, 0, 0, radius_um * aspect, radius_um / aspect, rng.uniform(0, math.pi))
    sdf = sdf + _wave_field(rng, 4 * radius_um, 0.08, n_waves=3)(x, y)
    cover = canvas.coverage(sdf, softness_px=1.2)
    depth = np.clip(sdf / radius_um, 0, 1)  # 0 at the rim, 1 at the centre
    pallor_size = rng.uniform(0.4, 0.6)
    # Fourth power: the pale centre has a defined but soft edge, like the dimple of a biconcave disc.
    pallor = rng.uniform(0.5, 0.75) * np.exp(-(((1 - depth) / pallor_size) ** 4))
    thickness = rng.uniform(0.5, 0.65) * (1 - pallor) * (1 + 0.15 * np.exp(-((depth / 0.12) ** 2)))
    canvas.stains[_EOSIN][region] += cover * thickness
    canvas.stains[_NUCLEAR][region] += cover * 0.03


def _draw_platelet(canvas: _Canvas, rng: np.random.Generator, centre_um: tuple[float, float]) -> None:
    """A small irregular purple fragment with granular centre (granulomere) and paler edge."""
    centre_px = (centre_um[0] * canvas.px_per_um, centre_um[1] * canvas.px_per_um)
    radius = rng.uniform(0.8, 1.5)
    found = canvas.patch(centre_px, radius * 1.5)
    if found is None:
        return
    region, x, y = found
    outline = _Outline(rng, radius, irregularity=0.25, aspect=rng.uniform(1.0, 1.4))
    sdf = outline.sdf(x, y)
    cover = canvas.coverage(sdf)
    grains = np.clip(0.55 + 0.35 * _texture(rng, cover.shape, 0.5 * canvas.px_per_um), 0.1, None)
    centre_weight = np.clip(sdf / radius + 0.3, 0, 1)  # the pale hyalomere rim holds no granules
    canvas.stains[_NUCLEAR][region] += cover * grains * centre_weight
    canvas.stains[_CYTOPLASM][region] += cover * 0.2


def _draw_red_cells_and_platelets(
    canvas: _Canvas,
    rng: np.random.Generator,
    style: DomainStyle,
    obstacles: list[tuple[float, float, float]],
    platelet_rate: float,
) -> None:
    """Scatter red cells (some cut by the border) around the white cells, nearly touching but not piled.

    ``obstacles`` are white cells as (x, y, radius) in microns; red cells keep clear of them.
    """
    width_um, height_um = canvas.width / canvas.px_per_um, canvas.height / canvas.px_per_um
    density = style.rbc_density * rng.uniform(0.8, 1.15)
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
class _WbcPlan:
    """A white cell chosen but not yet drawn."""

    cls: str
    outline: _Outline


def _plan_wbc(cls: str, rng: np.random.Generator) -> _WbcPlan:
    """Choose the outline first, so red cells can be placed around it before the cell is drawn."""
    low, high = _DIAMETER_UM[cls]
    irregularity = {"monocyte": 0.10, "myeloblast": 0.05, "lymphocyte_typical": 0.04}.get(cls, 0.06)
    return _WbcPlan(cls, _Outline(rng, rng.uniform(low, high) / 2, irregularity, aspect=rng.uniform(1.0, 1.1)))


def _draw_wbc(
    canvas: _Canvas, plan: _WbcPlan, centre_px: tuple[float, float], rng: np.random.Generator
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
        return _coverage(sdf, self.px_per_um, softness_px)

    def texture(self, feature_um: float) -> np.ndarray:
        return _texture(self.rng, self.shape, feature_um * self.px_per_um)

    def granules(self, points: np.ndarray, sigma_um: float, peak: float, spread: float = 0.3) -> np.ndarray:
        peaks = peak * self.rng.uniform(1 - spread, 1 + spread, len(points)).astype(np.float32)
        return _granule_map(self.shape, points, self.origin, self.px_per_um, sigma_um, peaks)

    def ellipse(self, cx: float, cy: float, a: float, b: float, angle: float) -> np.ndarray:
        return _ellipse_sdf(self.x, self.y, cx, cy, a, b, angle)

    def wobble(self, wavelength_um: float, amplitude_um: float) -> np.ndarray:
        """A smooth random offset for a signed distance, so that outlines look organic, not geometric."""
        return _wave_field(self.rng, wavelength_um, amplitude_um)(self.x, self.y)

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
        points = _points_inside(rng, int(rng.integers(2, 6)), ctx.cell_sdf, ctx.max_radius, 0.3)
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
        nucleus_sdf = lobe if nucleus_sdf is None else _smooth_union(nucleus_sdf, lobe, 0.25)
        if i > 0:
            filament = _segment_sdf(ctx.x, ctx.y, centres[i - 1], (cx, cy), rng.uniform(0.22, 0.4))
            nucleus_sdf = _smooth_union(nucleus_sdf, filament, 0.3)
    nucleus_sdf = nucleus_sdf + ctx.wobble(2.0, 0.12)
    nucleus = ctx.coverage(nucleus_sdf)
    stains = _cytoplasm(ctx, nucleus, (0.06, 0.05, rng.uniform(0.28, 0.36)), 0.8, 0.1)
    stains[_NUCLEAR] += _chromatin(ctx, nucleus, nucleus_sdf, rng.uniform(1.9, 2.3), 0.7, 0.35)
    # Fine neutral granules: many tiny faint lilac dots, barely resolved.
    points = _points_inside(rng, int(320 * (ctx.radius / 6.5) ** 2), ctx.cell_sdf, ctx.max_radius, 0.25)
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
    nucleus_sdf = _segment_sdf(ctx.x, ctx.y, ends[0], ends[1], 0.35)
    for cx, cy in ends:
        long_axis, short_axis = lobe_size * rng.uniform(1.0, 1.2), lobe_size * rng.uniform(0.8, 0.95)
        lobe = ctx.ellipse(cx, cy, long_axis, short_axis, axis + math.pi / 2 + rng.normal(0, 0.3))
        nucleus_sdf = _smooth_union(nucleus_sdf, lobe, 0.3)
    nucleus_sdf = nucleus_sdf + ctx.wobble(2.2, 0.12)
    nucleus = ctx.coverage(nucleus_sdf)
    stains = _cytoplasm(ctx, nucleus, (0.03, 0.12, 0.25), 1.0, 0.1)
    stains[_NUCLEAR] += _chromatin(ctx, nucleus, nucleus_sdf, rng.uniform(1.8, 2.1), 0.75, 0.3)
    # Coarse, uniform granules fill the cytoplasm; only a few lie over the nucleus.
    points = _points_inside(rng, int(420 * (ctx.radius / 7.0) ** 2), ctx.cell_sdf, ctx.max_radius, 0.25)
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
        nucleus_sdf = lobe if nucleus_sdf is None else _smooth_union(nucleus_sdf, lobe, 0.5)
    nucleus_sdf = nucleus_sdf + ctx.wobble(2.5, 0.2)
    nucleus = ctx.coverage(nucleus_sdf, softness_px=1.5)
    stains = _cytoplasm(ctx, nucleus, (0.16, 0.12, 0.14), 1.0, 0.15)
    stains[_NUCLEAR] += _chromatin(ctx, nucleus, nucleus_sdf, rng.uniform(1.2, 1.5), 1.0, 0.2)
    # Large, unequal, very dark metachromatic granules over cytoplasm and nucleus alike.
    count = int(rng.uniform(60, 110) * (ctx.radius / 6.0) ** 2)
    points = _points_inside(rng, count, ctx.cell_sdf, ctx.max_radius, 0.2)
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
        for vx, vy in _points_inside(rng, n_vacuoles, ctx.cell_sdf, ctx.max_radius, 1.0):
            clear = np.maximum(clear, ctx.coverage(rng.uniform(0.3, 0.7) - np.hypot(ctx.x - vx, ctx.y - vy)))
        stains *= 1 - 0.75 * clear * (1 - nucleus)
    # Sparse fine azurophilic dust gives the "ground glass" look.
    points = _points_inside(rng, int(70 * (ctx.radius / 8.5) ** 2), ctx.cell_sdf, ctx.max_radius, 0.3)
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


# ---------------------------------------------------------------------------------------------------
# Image formation: stains -> light -> optics -> camera


def _develop(canvas: _Canvas, style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
    """Turn stain concentrations into the RGB image the lab's microscope camera would save."""
    height, width = canvas.height, canvas.width
    strength = style.stain_strength * math.exp(rng.normal(0, style.stain_jitter))
    stains = canvas.stains.reshape(3, -1).T
    optical_density = (stains @ style.stain_matrix).reshape(height, width, 3) * strength
    transmitted = np.exp(-optical_density)

    yy = (np.arange(height, dtype=np.float32)[:, None] + 0.5) / height - 0.5
    xx = (np.arange(width, dtype=np.float32)[None, :] + 0.5) / width - 0.5
    direction = rng.uniform(0, 2 * math.pi)
    illumination = (
        1.0
        - style.vignetting * 2.0 * (xx * xx + yy * yy)
        + style.illumination_gradient * 2.0 * (xx * math.cos(direction) + yy * math.sin(direction))
    )
    lamp = np.asarray(style.background_rgb, np.float32) * rng.uniform(0.97, 1.02)
    light = transmitted * (illumination[..., None] * lamp)

    image = Image.fromarray(np.clip(light + 0.5, 0, 255).astype(np.uint8))
    blur_px = style.blur_um * canvas.px_per_um
    if blur_px >= 0.25:
        image = image.filter(ImageFilter.GaussianBlur(blur_px))
    pixels = np.asarray(image, dtype=np.float32)
    noise = rng.standard_normal((height, width, 3), dtype=np.float32) * style.noise_std
    pixels = np.clip(pixels + noise + 0.5, 0, 255).astype(np.uint8)

    # The lab's JPEG compression, kept in memory: datasets store PNG but carry the same artefacts.
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=style.jpeg_quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return np.asarray(decoded.convert("RGB"))


# ---------------------------------------------------------------------------------------------------
# Fields and annotations


def _render_field(
    style: DomainStyle, rng: np.random.Generator, width: int, height: int, n_cells: int
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """A smear field: image, uint8 instance mask and the class of each white cell (mask value i+1)."""
    canvas = _Canvas(height, width, px_per_um=_FIELD_REFERENCE_CROP_PX / style.crop_width_um)
    _draw_plasma(canvas, rng)
    width_um, height_um = width / canvas.px_per_um, height / canvas.px_per_um
    placed: list[tuple[float, float, _WbcPlan]] = []
    for _ in range(n_cells):
        plan = _plan_wbc(str(rng.choice(CLASSES)), rng)
        radius = plan.outline.max_radius + 0.5  # keeps the whole cell, soft edge included, in the field
        if 2 * radius >= min(width_um, height_um):
            continue
        for _attempt in range(40):  # a cell that finds no free place is left out
            x, y = rng.uniform(radius, width_um - radius), rng.uniform(radius, height_um - radius)
            gaps = [math.hypot(x - ox, y - oy) - radius - other.outline.max_radius for ox, oy, other in placed]
            if all(gap > 1.0 for gap in gaps):
                placed.append((x, y, plan))
                break
    obstacles = [(x, y, plan.outline.max_radius) for x, y, plan in placed]
    _draw_red_cells_and_platelets(canvas, rng, style, obstacles, platelet_rate=1.0)
    mask = np.zeros((height, width), np.uint8)
    for instance, (x, y, plan) in enumerate(placed, start=1):
        region, inside = _draw_wbc(canvas, plan, (x * canvas.px_per_um, y * canvas.px_per_um), rng)
        mask[region][inside] = instance
    return _develop(canvas, style, rng), mask, [plan.cls for _, _, plan in placed]


def _encode_rle(mask: np.ndarray) -> dict:
    """Uncompressed COCO RLE: run lengths over the column-major pixels, starting with a background run."""
    flat = mask.ravel(order="F").astype(np.uint8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]]))
    counts = ([0] if flat.size and flat[0] else []) + runs.tolist()
    return {"counts": counts, "size": [int(mask.shape[0]), int(mask.shape[1])]}


def _coco_annotation(annotation_id: int, image_id: int, mask: np.ndarray, cls: str) -> dict:
    rows, cols = np.nonzero(mask)
    x0, y0 = int(cols.min()), int(rows.min())
    return {
        "id": annotation_id,
        "image_id": image_id,
        "category_id": 1,
        "bbox": [x0, y0, int(cols.max()) - x0 + 1, int(rows.max()) - y0 + 1],
        "area": int(rows.size),
        "iscrowd": 0,
        "segmentation": _encode_rle(mask),
        "labels": {"aecfe_class": cls},
    }


def _save_png(path: Path, pixels: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        # Level 1: the noisy pixels barely compress further, and level 6 would triple the write time.
        Image.fromarray(pixels).save(tmp, format="PNG", compress_level=1)
