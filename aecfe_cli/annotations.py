"""Annotated detector training data: Pascal VOC (boxes, optional whole-cell mask PNGs) and COCO
instances (polygons or RLE, decoded here without pycocotools)."""

from __future__ import annotations

import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from .errors import UserError
from .io import read_json
from .masks import box_pixels


@dataclass
class TrainSample:
    image_path: Path
    boxes: np.ndarray  # (K, 4) float x0, y0, x1, y1 in pixels
    masks: Optional[np.ndarray]  # (K, H, W) bool, or None: masks are then derived from the boxes
    stain: Optional[np.ndarray] = None  # (2, 3) LAB statistics of the image's dataset (stain normalisation)


def read_voc(
    root: Path,
    split_files: Optional[Sequence[str]] = None,
    mask_dir: Optional[Path] = None,
    class_name: str = "WBC",
) -> list[TrainSample]:
    """Pascal VOC: ``root/Annotations/*.xml`` and ``root/JPEGImages``; ``split_files`` names lists in
    ``root/ImageSets/Main`` (e.g. ["train", "val"]), default every annotation. ``mask_dir`` holds one
    whole-cell mask PNG per image (mask > 64 is cell; BCCD: BloodImage_Mask_NNNNN.png); instances are cut
    from it by their boxes. Fields without a ``class_name`` object are kept as negatives."""
    root = Path(root)
    annotations = root / "Annotations"
    if not annotations.is_dir():
        raise UserError(f"{root}: no Annotations/ folder; pass the root of a Pascal VOC dataset")
    if split_files:
        ids = []
        for name in split_files:
            list_path = root / "ImageSets" / "Main" / (name if name.endswith(".txt") else f"{name}.txt")
            if not list_path.is_file():
                raise UserError(f"{list_path}: split list not found; choose from "
                                f"{sorted(p.stem for p in (root / 'ImageSets' / 'Main').glob('*.txt'))}")
            ids += [line.split()[0] for line in list_path.read_text().splitlines() if line.strip()]
        xml_paths = [annotations / f"{image_id}.xml" for image_id in dict.fromkeys(ids)]
    else:
        xml_paths = sorted(annotations.glob("*.xml"))
    samples = []
    for xml_path in xml_paths:
        image_path, boxes = _parse_voc(xml_path, root, class_name)
        masks = None
        if mask_dir is not None:
            mask_path = _voc_mask_path(Path(mask_dir), xml_path.stem)
            if mask_path is not None:
                masks = _instance_masks_from_semantic(mask_path, boxes, image_path)
        samples.append(TrainSample(image_path, boxes, masks))
    return samples


def _parse_voc(xml_path: Path, root: Path, class_name: str) -> tuple[Path, np.ndarray]:
    if not xml_path.is_file():
        raise UserError(f"{xml_path}: listed in the split but missing; fix the ImageSets list or add the file")
    try:
        tree = ElementTree.parse(xml_path).getroot()
        filename = tree.findtext("filename") or f"{xml_path.stem}.jpg"
        boxes = []
        for obj in tree.iter("object"):
            if (obj.findtext("name") or "").strip().lower() != class_name.lower():
                continue
            bndbox = obj.find("bndbox")
            if bndbox is None:
                raise ValueError("object without <bndbox>")
            # VOC pixels are 1-based and inclusive: [xmin - 1, xmax) in 0-based half-open coordinates.
            x0, y0, x1, y1 = (float(bndbox.findtext(tag)) for tag in ("xmin", "ymin", "xmax", "ymax"))
            if x1 - (x0 - 1) >= 2 and y1 - (y0 - 1) >= 2:  # degenerate boxes (a point, a line) dropped
                boxes.append([x0 - 1, y0 - 1, x1, y1])
    except (ElementTree.ParseError, ValueError, TypeError) as exc:
        raise UserError(f"{xml_path}: malformed VOC annotation ({exc}); fix or remove the file") from None
    image_path = root / "JPEGImages" / Path(filename).name
    if not image_path.is_file():
        raise UserError(f"{xml_path}: its image {image_path} is missing; restore it or remove the annotation")
    return image_path, np.asarray(boxes, np.float32).reshape(-1, 4)


def _voc_mask_path(mask_dir: Path, stem: str) -> Optional[Path]:
    candidates = [f"{stem}.png", f"{stem}_mask.png"]
    prefix, _, number = stem.rpartition("_")
    if prefix and number.isdigit():
        candidates.append(f"{prefix}_Mask_{number}.png")  # BCCD: BloodImage_00007 -> BloodImage_Mask_00007
    return next((mask_dir / name for name in candidates if (mask_dir / name).is_file()), None)


def _instance_masks_from_semantic(mask_path: Path, boxes: np.ndarray, image_path: Path) -> Optional[np.ndarray]:
    try:
        with Image.open(mask_path) as mask_image:
            semantic = np.asarray(mask_image.convert("L")) > 64
    except (OSError, ValueError) as exc:
        raise UserError(f"{mask_path}: unreadable mask ({exc}); fix or remove it") from None
    image_size = _image_size(image_path)
    if semantic.shape != image_size:
        raise UserError(f"{mask_path}: mask is {semantic.shape[1]}x{semantic.shape[0]} but its image "
                        f"{image_path.name} is {image_size[1]}x{image_size[0]}; masks must match their images")
    masks = np.zeros((len(boxes), *semantic.shape), bool)
    for k, box in enumerate(boxes):
        x0, y0, x1, y1 = box_pixels(box, semantic.shape)
        masks[k, y0:y1, x0:x1] = semantic[y0:y1, x0:x1]
        if masks[k].sum() < 0.2 * max((x1 - x0) * (y1 - y0), 1):
            return None  # the mask file does not cover this box: derive all masks of the image instead
    return masks


def _image_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as image:
            return image.height, image.width
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable image ({exc})") from None


def read_coco(json_path: Path, category: str = "wbc") -> list[TrainSample]:
    """COCO instances JSON: ``bbox`` plus ``segmentation`` as polygons or RLE (uncompressed or
    compressed; decoded here, no pycocotools). ``file_name`` is relative to the JSON's folder (or its
    ``images/``). Crowd regions are skipped; annotations without segmentation get derived masks."""
    json_path = Path(json_path)
    try:
        data = read_json(json_path)
        categories = {int(c["id"]): str(c["name"]) for c in data.get("categories", [])}
        chosen = {cid for cid, name in categories.items() if name.lower() == category.lower()}
        if not chosen:
            raise UserError(f"{json_path}: no category named '{category}' (categories: "
                            f"{sorted(categories.values())}); pass the white-cell category name")
        by_image: dict[int, list[dict]] = {}
        for annotation in data.get("annotations", []):
            if int(annotation["category_id"]) in chosen and not annotation.get("iscrowd", 0):
                by_image.setdefault(int(annotation["image_id"]), []).append(annotation)
        samples = []
        for image in data["images"]:
            image_path = _coco_image_path(json_path, str(image["file_name"]))
            height, width = int(image["height"]), int(image["width"])
            boxes, masks, complete = [], [], True
            for annotation in by_image.get(int(image["id"]), []):
                x, y, w, h = (float(v) for v in annotation["bbox"])
                if w < 1 or h < 1:
                    continue
                boxes.append([x, y, x + w, y + h])
                segmentation = annotation.get("segmentation")
                if segmentation:
                    masks.append(_decode_segmentation(segmentation, height, width))
                else:
                    complete = False
            box_array = np.asarray(boxes, np.float32).reshape(-1, 4)
            mask_array = np.stack(masks) if masks else np.zeros((0, height, width), bool)
            samples.append(TrainSample(image_path, box_array, mask_array if complete else None))
        return samples
    except UserError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise UserError(f"{json_path}: malformed COCO annotations ({type(exc).__name__}: {exc}); fix the file") from None


def _coco_image_path(json_path: Path, file_name: str) -> Path:
    for base in (json_path.parent, json_path.parent / "images"):
        if (base / file_name).is_file():
            return base / file_name
    raise UserError(f"{json_path}: image '{file_name}' not found beside the JSON or in images/; fix file_name")


def _decode_segmentation(segmentation, height: int, width: int) -> np.ndarray:
    if isinstance(segmentation, list):  # polygons [[x0, y0, x1, y1, ...], ...]
        from PIL import ImageDraw

        canvas = Image.new("L", (width, height), 0)
        draw = ImageDraw.Draw(canvas)
        for polygon in segmentation:
            points = [(float(polygon[i]), float(polygon[i + 1])) for i in range(0, len(polygon) - 1, 2)]
            if len(points) >= 3:
                draw.polygon(points, fill=1, outline=1)
        return np.asarray(canvas, bool)
    rle_height, rle_width = (int(v) for v in segmentation["size"])
    if (rle_height, rle_width) != (height, width):
        raise ValueError(f"RLE size {rle_height}x{rle_width} differs from the image's {height}x{width}")
    counts = segmentation["counts"]
    runs = _decode_rle_string(counts) if isinstance(counts, (str, bytes)) else [int(c) for c in counts]
    if sum(runs) != height * width:
        raise ValueError(f"RLE runs cover {sum(runs)} pixels, the image has {height * width}")
    values = np.zeros(len(runs), bool)
    values[1::2] = True  # runs alternate background, cell, background, ... starting with background
    flat = np.repeat(values, runs)
    return flat.reshape((height, width), order="F")  # COCO RLE runs down columns


def _decode_rle_string(counts) -> list[int]:
    """pycocotools' compressed RLE: 5-bit groups, continuation bit 0x20, sign bit 0x10 of the last
    group, and from the third count on each value is a difference to the count two before."""
    text = counts.decode("ascii") if isinstance(counts, bytes) else counts
    runs: list[int] = []
    position = 0
    while position < len(text):
        value, shift, more = 0, 0, True
        while more:
            group = ord(text[position]) - 48
            value |= (group & 0x1F) << (5 * shift)
            more = bool(group & 0x20)
            position += 1
            shift += 1
            if not more and group & 0x10:
                value |= -1 << (5 * shift)
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            raise ValueError("corrupt compressed RLE (negative run)")
        runs.append(value)
    return runs
