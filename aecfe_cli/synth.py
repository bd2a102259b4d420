"""Deterministic synthetic blood-smear images: the embedded data every command, test and demo runs on.

Nothing is downloaded. Images are drawn the way a bright-field microscope forms them: every structure
deposits an amount of one of three stains, and light passing the slide is attenuated per colour channel
by Beer-Lambert's law, ``I = illumination * exp(-sum(concentration * optical_density))``. The stains are

* the nuclear (azure-eosinate) stain: chromatin, basophil granules, platelets, fine neutrophil granules;
* the cytoplasm (basophilic, RNA-binding) stain: the blue of lymphocyte, monocyte and blast cytoplasm;
* eosin: red blood cells, eosinophil granules and the pink of neutrophil cytoplasm.

Each cell class has its own morphology (``synth_cells``, drawn with the primitives of ``synth_shapes``).
Each laboratory domain has its own
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

import numpy as np
from PIL import Image, ImageFilter

from aecfe_cli.errors import UserError
from aecfe_cli.io import atomic_path, write_json
from aecfe_cli.synth_cells import CLASSES, Rgb, WbcPlan, draw_plasma, draw_red_cells_and_platelets, draw_wbc, plan_wbc
from aecfe_cli.synth_shapes import Canvas

__all__ = ["CLASSES", "DOMAINS", "DomainStyle", "render_cell_image", "write_cell_dataset", "write_field_dataset"]


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

# Fields are drawn at the magnification a 128-pixel cell crop of the same domain has.
_FIELD_REFERENCE_CROP_PX = 128
_MIN_SIZE_PX = 16
# Random-stream id of fields; cell crops use their class index, so the two never share a stream.
_FIELD_STREAM = 1_000_000


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
    canvas = Canvas(size, size, px_per_um=size / style.crop_width_um)
    draw_plasma(canvas, rng)
    jitter_px = 0.04 * size
    centre = (size / 2 + rng.uniform(-jitter_px, jitter_px), size / 2 + rng.uniform(-jitter_px, jitter_px))
    cell = plan_wbc(cls, rng)
    obstacles = [(centre[0] / canvas.px_per_um, centre[1] / canvas.px_per_um, cell.outline.max_radius)]
    draw_red_cells_and_platelets(canvas, rng, style.rbc_density, obstacles, platelet_rate=0.5)
    draw_wbc(canvas, cell, centre, rng)
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
# Image formation: stains -> light -> optics -> camera


def _develop(canvas: Canvas, style: DomainStyle, rng: np.random.Generator) -> np.ndarray:
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
    canvas = Canvas(height, width, px_per_um=_FIELD_REFERENCE_CROP_PX / style.crop_width_um)
    draw_plasma(canvas, rng)
    width_um, height_um = width / canvas.px_per_um, height / canvas.px_per_um
    placed: list[tuple[float, float, WbcPlan]] = []
    for _ in range(n_cells):
        plan = plan_wbc(str(rng.choice(CLASSES)), rng)
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
    draw_red_cells_and_platelets(canvas, rng, style.rbc_density, obstacles, platelet_rate=1.0)
    mask = np.zeros((height, width), np.uint8)
    for instance, (x, y, plan) in enumerate(placed, start=1):
        region, inside = draw_wbc(canvas, plan, (x * canvas.px_per_um, y * canvas.px_per_um), rng)
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
