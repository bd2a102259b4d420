"""Configuration: one dataclass per stage, one YAML section each; default < YAML < command-line flag.

Unknown keys and wrong types fail with one line naming the key and the closest valid one, the way
ultralytics checks its arguments, because a misspelt key silently ignored costs a user a whole run.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import UserError, check_choice


@dataclass
class DatasetConfig:
    """One registered dataset (an entry under ``datasets:``)."""

    layout: str = "folder"  # matek | acevedo | int20 | folder | csv
    root: Optional[str] = None  # folder of the dataset; env AECFE_<NAME>_ROOT overrides when set
    csv: Optional[str] = None  # csv layout: the CSV file, relative to root
    path_column: str = "path"  # csv layout: column holding the image path
    label_column: str = "label"  # csv layout: column holding the class
    path_template: str = "{}"  # csv layout: Python format applied to the path value, e.g. "{:0>3}.bmp"
    label_map: dict = field(default_factory=dict)  # original class name (or code) -> vocabulary name
    class_map: dict = field(default_factory=dict)  # int20 layout: folder name -> fine class

    def __post_init__(self):
        # YAML reads `1: neutrophil` with an integer key; file names and CSV cells are strings.
        self.label_map = {str(k): str(v) for k, v in self.label_map.items()}
        self.class_map = {str(k): str(v) for k, v in self.class_map.items()}


# Every choice a stage offers is named here and checked when the config is read or a flag sets it, so a
# misspelt value fails before any work (and before the workdir's config.yaml keeps it for the next command),
# not when its stage is reached after an hour of detection. The stage modules take their choices from here;
# this module stays free of torch so that `aecfe --help` is instant.
PRECISIONS = ("auto", "fp32", "bf16")  # of the networks; precision.autocast_dtype resolves them
CROP_SHAPES = ("box", "square")
BACKBONES = ("resnet18_fpn", "resnet34_fpn", "resnet50_fpn", "resnet101_fpn")
STAIN_NORMS = ("none", "dataset", "image")
IMAGE_SIZES = (32, 64, 128)
FEATURE_SCALINGS = ("sample", "channel")  # the paper's per-sample min-max, or per-channel standardisation
IMAGE_LOSSES = ("ssim", "ssim_l1")
ALIGNMENTS = ("paper", "normalised")
REJECT_BY = ("accuracy", "coverage", "none")
PREDICT_FORMATS = ("csv", "geojson")


@dataclass
class DetectConfig:
    backbone: str = "resnet18_fpn"  # resnet18_fpn (CPU default) | resnet34_fpn | resnet50_fpn | resnet101_fpn
    min_size: int = 256  # detector input size; the paper works at 900-1024 px
    max_size: int = 256
    score_threshold: float = 0.7  # the paper keeps detections at score >= 0.7
    # True: an image of a single-cell dataset in which the detector found no cell gets the segmented cell
    # nearest its centre instead, where the stain segmentation finds a plausible one (cut to its solid part
    # where it flooded into red cells), with its RoI feature taken at that box; instances.csv's found_by
    # says "segmentation". False (the paper): the image is listed under no_detection. Smear fields
    # (all_cells) have no central cell to stand in, so there it does nothing.
    segment_missed: bool = False
    # Above this share of a dataset's readable images without a detection, detect warns (--strict: fails):
    # a detector that learnt too little from a small dataset otherwise drops most images silently.
    max_missing_fraction: float = 0.05
    crop_size: int = 128  # side of the stored cell crop (the paper: 128)
    # "box": the box with its margins resized to crop_size x crop_size, as the paper did, which stretches
    # a cell whose box is not square; "square": the box with its margins grown along its shorter side to a
    # square about its centre, so the crop keeps the cell's shape (detector.crop_cell).
    crop_shape: str = "box"
    batch_size: int = 8  # images per inference batch
    all_cells: bool = False  # keep every cell of a smear field instead of the central one
    chunk_images: int = 256  # images per resumable shard written to disk
    train_images: int = 1000  # images (split evenly over the datasets) a label-free detector learns from
    # A label-free detector's training drops an image when a cell's pseudo-mask is not plausible, mostly one
    # flooded into touching red cells, and irregular classes most (BCCD's monocytes: 35 % kept;
    # docs/pseudo_masks.md). True cuts such a mask to its solid part first (pseudo_labels.solid_part, as
    # extract.cut_red_cells does for the morphology), keeping those images: BCCD 90 % instead of 62 %.
    pseudo_mask_cut: bool = False
    train_epochs: int = 1  # passes over the training images, unless train_steps asks for more
    # The least number of optimisation steps, whatever the dataset size: a lab with fifty images repeats
    # them as fresh augmented views until the budget is spent (one epoch of 48 images is 12 steps, too few
    # to learn anything from random weights). 240 steps is one epoch of about 1,000 images at batch 4.
    train_steps: int = 240
    train_batch_size: int = 4
    train_lr: float = 0.001
    # Self-supervised pretraining of the backbone on the training images' own cells before Mask R-CNN
    # training (SimCLR on stain-jittered views, aecfe_cli/backbone_pretraining.py): steps of
    # pretrain_batch_size cells, two views each. 0 (the paper, which starts from ImageNet) skips it.
    pretrain_steps: int = 0
    pretrain_batch_size: int = 64
    # Stain normalisation before the detector, for training, RoI features and crops alike: "dataset" maps
    # each dataset's CIELAB means and deviations onto one reference (Reinhard), "image" each image's own,
    # "none" keeps the colours. Off until benchmarks/accuracy.py shows it helps on real labs.
    stain_norm: str = "none"
    # The detector's training runs in bfloat16 where the CPU or GPU computes it natively ("auto"): 2.2 s a
    # step became 1.1 s on the real triangle's CPU. Detection, whose RoI features the autoencoder learns from,
    # stays float32: with the backbone, FPN and RPN in bfloat16 the autoencoder's image term stalled on 2
    # seeds of 3 (docs/accuracy_notes.md, "Fifth step" and "Seventh step").
    train_precision: str = "auto"  # auto | fp32 | bf16
    precision: str = "fp32"  # fp32 | auto | bf16, of detection
    # Colour-augmented views per detected cell (stain, lamp, hue, focus and camera jitter, as in detector
    # training) whose RoI features, taken at the cell's own box, are stored beside the original's
    # (roi_views.npy) for train.view_weight to make the latent invariant to them. 0 stores none.
    views: int = 0
    # True: each view is also turned by a random one of the square's 8 symmetries (quarter turns, mirrors)
    # before the detector sees it, so that the view term teaches the latent that a cell's orientation does
    # not matter with features the detector really gives for a turned cell (a turned RoI map is not one).
    view_turns: bool = False
    weights: Optional[str] = None  # a Mask R-CNN state dict to use instead of training one
    init_weights: Optional[str] = None  # a torchvision COCO Mask R-CNN or ImageNet ResNet to fine-tune from
    annotations: Optional[str] = None  # VOC folder or COCO JSON to train the detector on
    annotation_masks: Optional[str] = None  # VOC only: folder of whole-cell mask PNGs (else masks from boxes)

    def __post_init__(self):
        if not 0 <= self.max_missing_fraction <= 1:
            raise UserError(f"max_missing_fraction: expected a fraction from 0 to 1, got {self.max_missing_fraction}")
        check_choice("train_precision", self.train_precision, PRECISIONS)
        check_choice("precision", self.precision, PRECISIONS)
        if self.pretrain_steps < 0 or self.pretrain_batch_size < 2:
            raise UserError(f"pretrain_steps: expected 0 (none) or more, with pretrain_batch_size 2 or more; got "
                            f"{self.pretrain_steps} and {self.pretrain_batch_size}")
        if self.views < 0:
            raise UserError(f"views: expected 0 (none) or a number of augmented views per cell, got {self.views}")
        check_choice("crop_shape", self.crop_shape, CROP_SHAPES)
        check_choice("backbone", self.backbone, BACKBONES)
        check_choice("stain_norm", self.stain_norm, STAIN_NORMS)
        if not 32 <= self.min_size <= self.max_size:
            raise UserError(f"min_size: the detector's input size needs 32 <= min_size <= max_size, got "
                            f"{self.min_size} and {self.max_size}")


@dataclass
class TrainConfig:
    latent_dim: int = 50
    image_size: int = 32  # the image decoder's output side (32 | 64 | 128); the paper uses 128
    width: float = 0.5  # multiplier of every hidden channel count; the paper uses 1.0
    # Lambda of the paper's domain-alignment term (the paper: 5). Off by default: its cheapest minimum is a latent
    # shrunk towards 0, which blurs every reconstruction alike and hides a new lab's shift from predict, and
    # without it the features carry as well across real labs (docs/accuracy_notes.md, forty-third look).
    align_weight: float = 0.0
    epochs: int = 30  # the paper trains 150
    batch_size: int = 128  # the paper uses 500
    lr: float = 0.001
    sample_every: int = 5  # write a reconstruction grid every K epochs
    # Levers against the paper's autoencoder (docs/accuracy.md); each stays at the paper's value until
    # benchmarks/accuracy.py shows, on the mean over seeds, that it helps on real labs.
    # What the encoder sees: "channel" standardises each RoI channel with statistics of the training cells
    # (kept with the model), "sample" is the paper's per-sample min-max, where one outlier sets a cell's scale.
    feature_scaling: str = "sample"
    norm_first: bool = False  # true: GroupNorm before ReLU; the paper's ReLU-then-norm plants a spot in images
    image_loss: str = "ssim"  # ssim (the paper) | ssim_l1 (padded SSIM + L1: borders and colour count)
    alignment: str = "paper"  # paper | normalised (latents in batch-std units: no shrinking); needs align_weight > 0
    # Weight of the view-consistency term: the latent of each colour-augmented view (detect.views) must find
    # its own cell's latent among the batch's (InfoNCE over ln(batch): 1 is chance, 0 certainty), so that
    # mapping every cell to one latent cannot satisfy it. 0 (the paper) leaves it out.
    view_weight: float = 0.0
    # A white cell's class does not depend on how it lies on the slide: true shows each training cell in a
    # random one of the square's 8 symmetries (quarter turns and mirrors, RoI feature and image target alike)
    # and extraction averages the latent over all 8. False: the paper, one orientation as detected.
    dihedral: bool = False
    # Speed, chosen to meet the time budget of the real triangle (docs/accuracy_notes.md, "Fourth step").
    # Channels the image decoder reduces the 256-channel feature to before upsampling (0: none, the paper).
    image_bottleneck: int = 64
    precision: str = "auto"  # auto (bfloat16 where the CPU or GPU has it natively) | fp32 | bf16

    def __post_init__(self):
        check_choice("precision", self.precision, PRECISIONS)
        check_choice("image_size", self.image_size, IMAGE_SIZES)
        check_choice("feature_scaling", self.feature_scaling, FEATURE_SCALINGS)
        check_choice("image_loss", self.image_loss, IMAGE_LOSSES)
        check_choice("alignment", self.alignment, ALIGNMENTS)
        if not self.width > 0 or self.latent_dim < 1:
            raise UserError(f"width: expected a positive width and a latent_dim of 1 or more, got {self.width} "
                            f"and {self.latent_dim}")
        if self.image_bottleneck < 0:
            raise UserError(f"image_bottleneck: expected 0 (none) or a channel count, got {self.image_bottleneck}")
        for name in ("view_weight", "align_weight"):  # a negative weight would reward what its term penalises
            if getattr(self, name) < 0:
                raise UserError(f"{name}: expected 0 (off) or a positive weight, got {getattr(self, name)}")


@dataclass
class ExtractConfig:
    batch_size: int = 512
    # Append label-free morphology descriptors (nucleus and cell shape, stain-normalised colour of nucleus
    # and cytoplasm, cytoplasm-against-nucleus contrast; aecfe_cli/morphology.py) to each cell's latent.
    morphology: bool = True
    # Where the segmentation of a crop's cell flooded into touching red cells (a mask that is not solid: a
    # third or more of PBC's monocytes, basophils and immature granulocytes), cut them off at their necks
    # before the morphology is measured (pseudo_labels.solid_part). Off: measured on the mask as flooded.
    cut_red_cells: bool = False


@dataclass
class EvaluateConfig:
    classifier: str = "random_forest"  # random_forest | logistic_regression | knn | linear_svm
    labels: str = "auto"  # fine | coarse | auto
    baselines: bool = True  # score raw-pixel, colour-histogram and stain-normalised histogram baselines on the same splits
    split_seed: int = 42
    # "dataset": standardise the learned features of each dataset with its own statistics before the
    # classifier (label-free, AdaBN-like); "both": the features as extracted and so standardised, side by
    # side (aecfe_cli/classify.py, normalise_features); "none" uses them as extracted (the paper). "both"
    # raised PBC <-> Zheng both ways on three real seeds, where each other form raises one direction only
    # (docs/accuracy_notes.md, nineteenth look).
    feature_norm: str = "both"
    # Leave out of a target's classifier (evaluate and predict) the learned-feature columns whose median moves
    # between the source and that target by more than this many interquartile ranges (label-free;
    # aecfe_cli/classify.py, stable_columns): what moves a whole lab is its stain, not its cell classes.
    # null keeps all (the paper), as does a source or target of fewer than 30 cells (classify.MIN_CELLS_FOR_SHIFT).
    # 1.5 raised the real cross-lab mean (docs/accuracy.md).
    max_shift: Optional[float] = 1.5
    # Rounds of label-free self-training of each target's classifier on that target's own cells (evaluate and
    # predict; aecfe_cli/classify.py, fit_classifier): the forest refits on the source plus the target cells it
    # labels most confidently. Every method, baselines included, gets it alike. 0 is off (the paper). 3 raised
    # the real cross-lab mean on 5 of 6 feature sets (docs/accuracy_notes.md, sixth step).
    self_training: int = 3
    # Self-training takes a target cell's label only where a forest on the morphology columns alone agrees
    # (evaluate and predict; aecfe_cli/classify.py, fit_classifier): a second view rarely makes the forest's
    # own confident mistakes, so fewer wrong labels are learnt (co-training). none: every confident cell, as
    # before. morphology raised the real cross-lab mean on three of three seeds (docs/accuracy_notes.md,
    # twenty-ninth look).
    self_training_agreement: str = "morphology"
    # Self-training takes a target cell's label only where its sizes lie within the source's range, widened to
    # the target's own spread (evaluate and predict; aecfe_cli/classify.py, within_size_range): a new lab's
    # classes that the source lacks (PBC's platelets and erythroblasts against BCCD) are mostly smaller than any
    # white cell, and would be learnt under a source class. none: no size check. source_range raised the real
    # cross-lab mean on nine draws of nine (docs/accuracy_notes.md, thirtieth and thirty-first looks).
    self_training_sizes: str = "source_range"
    # balanced: the classifier weighs each source class inversely to its number of cells (evaluate and
    # predict; aecfe_cli/classify.py, make_classifier), so a source lab's class mix (Zheng: 59 % neutrophils)
    # is no prior for another lab. none: every cell alike (the paper). knn cannot weigh classes.
    class_weight: str = "balanced"
    # Trees of the random forest (evaluate and predict), for every method alike; the paper has 100. 500 lower
    # the variance of the forest's vote (PBC -> Zheng moved by 0.08-0.11 between classifier seeds with 100,
    # 0.002-0.016 with 500) and raised the real cross-lab mean on three of three seeds, at about 100 s more
    # for the triangle's evaluation (docs/accuracy_notes.md, twenty-fourth look).
    trees: int = 500
    # The source classes the classifier learns (evaluate and predict), named at the label level used, e.g.
    # [neutrophil, lymphocyte, monocyte, eosinophil, basophil] when the new lab's smears hold the five mature
    # white-cell types only: the source's other cells (PBC's immature granulocytes, erythroblasts, platelets) are
    # left out before anything is fitted or normalised, so no new cell is called a class it cannot be. Your
    # knowledge of the new lab, not its labels. null or []: every source class (the paper's protocol).
    classes: Optional[list] = None

    def __post_init__(self):
        if self.classes is not None and not all(isinstance(name, str) and name for name in self.classes):
            raise UserError(f"classes: {self.classes!r} is not a list of class names, e.g. [neutrophil, lymphocyte]")


@dataclass
class PredictConfig:
    """``predict`` labels new cells with the classifier ``evaluate`` scores (its classifier, labels, split_seed)."""

    reject_by: str = "accuracy"  # accuracy | coverage | none: how the confidence threshold is calibrated
    reject_target: float = 0.9  # accuracy: held-out accuracy of accepted cells; coverage: held-out share accepted
    neighbours: int = 5  # shift distance = mean distance to this many nearest source training cells
    shift_quantile: float = 0.95  # beyond training: past this quantile of held-out distances or reconstruction errors
    shift_warn_fraction: float = 0.25  # warn when at least this share of a dataset's cells is beyond
    montage_cells: int = 24  # example cells per class montage
    all_cells: bool = False  # detect every cell of a smear field in the --data datasets (not the source)
    format: str = "csv"  # csv | geojson (also one GeoJSON per image, for QuPath)

    def __post_init__(self):
        check_choice("reject_by", self.reject_by, REJECT_BY)
        check_choice("format", self.format, PREDICT_FORMATS)
        for key in ("reject_target", "shift_quantile", "shift_warn_fraction"):
            if not 0 < getattr(self, key) <= 1:
                raise UserError(f"{key} is {getattr(self, key)}: use a fraction in (0, 1], e.g. 0.9")
        for key in ("neighbours", "montage_cells"):
            if getattr(self, key) < 1:
                raise UserError(f"{key} is {getattr(self, key)}: use 1 or more")


@dataclass
class RuntimeConfig:
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    seed: int = 0
    threads: int = 0  # torch CPU threads; 0 = OMP_NUM_THREADS when set, else every core
    strict: bool = False  # an unreadable image is an error instead of being skipped and listed


# Named starting points below the YAML file: default < preset < YAML < flag. "paper" is the exact
# configuration of Salehi et al. (MICCAI 2022) for reproduction; it is slow on a CPU (see docs/benchmarks.md).
PRESETS: dict[str, dict] = {
    "paper": {
        "detect": {"backbone": "resnet101_fpn", "min_size": 900, "max_size": 1024, "score_threshold": 0.7,
                   "stain_norm": "none", "train_precision": "fp32", "precision": "fp32", "crop_shape": "box"},
        "train": {"image_size": 128, "width": 1.0, "epochs": 150, "batch_size": 500, "lr": 0.001,
                  "align_weight": 5.0, "feature_scaling": "sample", "norm_first": False, "image_loss": "ssim",
                  "alignment": "paper", "image_bottleneck": 0, "precision": "fp32", "dihedral": False},
        "extract": {"morphology": False},
        "evaluate": {"classifier": "random_forest", "feature_norm": "none", "max_shift": None, "self_training": 0,
                     "self_training_agreement": "none", "self_training_sizes": "none",
                     "class_weight": "none", "trees": 100},
    },
}

SECTIONS: dict[str, type] = {
    "detect": DetectConfig,
    "train": TrainConfig,
    "extract": ExtractConfig,
    "evaluate": EvaluateConfig,
    "predict": PredictConfig,
    "runtime": RuntimeConfig,
}


@dataclass
class Config:
    datasets: dict[str, DatasetConfig] = field(default_factory=dict)
    detect: DetectConfig = field(default_factory=DetectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    predict: PredictConfig = field(default_factory=PredictConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    preset: Optional[str] = None  # the named preset the sections started from (see PRESETS)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _closest(name: str, valid) -> str:
    match = difflib.get_close_matches(name, list(valid), n=1, cutoff=0.5)
    return f"; did you mean '{match[0]}'?" if match else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check a YAML or flag value against a dataclass field's type; ints are accepted as floats."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        return _coerce(value, inner, where)
    expected = origin or annotation
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if expected is int and isinstance(value, bool):
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if not isinstance(value, expected):
        raise UserError(f"{where}: expected {getattr(expected, '__name__', expected)}, got {value!r}")
    return value


def _build(cls: type, values: dict, where: str):
    if not isinstance(values, dict):
        raise UserError(f"{where}: expected a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise UserError(f"{where}: unknown key '{key}'{_closest(str(key), hints)}")
        kwargs[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except UserError as exc:  # a range check in the dataclass's __post_init__, which names its key
        raise UserError(f"{where}.{exc}") from None


def config_from_dict(data: dict, source: str) -> Config:
    """Build a Config from parsed YAML; ``source`` (the file name) starts every error message."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: the config must be a mapping of sections (datasets, detect, train, ...)")
    valid = {"datasets", "preset", *SECTIONS}
    for key in data:
        if key not in valid:
            raise UserError(f"{source}: unknown section '{key}'{_closest(str(key), valid)}")
    data = with_preset(data, data.get("preset"), f"{source}: preset")
    config = Config(preset=data.get("preset"))
    for key, value in data.items():
        if key == "preset":
            continue
        if key == "datasets":
            if not isinstance(value, dict):
                raise UserError(f"{source}: datasets: expected a mapping of name -> settings")
            config.datasets = {
                str(name): _build(DatasetConfig, entry or {}, f"{source}: datasets.{name}")
                for name, entry in value.items()
            }
        else:
            setattr(config, key, _build(SECTIONS[key], value or {}, f"{source}: {key}"))
    return config


def with_preset(data: dict, preset: Optional[str], where: str) -> dict:
    """``data`` (parsed YAML) over the sections of a named preset: the YAML's own keys win."""
    if preset is None:
        return data
    if not isinstance(preset, str) or preset not in PRESETS:
        raise UserError(f"{where}: unknown preset '{preset}'{_closest(str(preset), PRESETS)}")
    merged = {section: dict(values) for section, values in PRESETS[preset].items()}
    for section, values in data.items():
        if section in merged and isinstance(values, dict):
            merged[section].update(values)
        else:
            merged[section] = values
    merged["preset"] = preset
    return merged


def load_config(path: Optional[Path], preset: Optional[str] = None) -> Config:
    """Read a YAML config with ``yaml.safe_load`` (Python tags are refused), or the defaults."""
    import yaml

    if path is None:
        return config_from_dict({"preset": preset} if preset else {}, "--preset")
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found; pass an existing file to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UserError(f"{path}: not valid YAML ({first}); fix the file or see example_config.yaml") from exc
    except UnicodeDecodeError as exc:
        raise UserError(f"{path}: not a text file; pass a YAML config to --config") from exc
    if preset is not None:
        if data is not None and not isinstance(data, dict):
            raise UserError(f"{path}: the config must be a mapping of sections (datasets, detect, train, ...)")
        data = {**(data or {}), "preset": preset}  # the flag wins over the file's preset
    config = config_from_dict(data, str(path))
    # Relative dataset roots are relative to the config file, so a config travels with its data.
    for entry in config.datasets.values():
        if entry.root and not Path(entry.root).is_absolute():
            entry.root = str((path.parent / entry.root).resolve())
    return config


def check_key_combinations(config: Config) -> None:
    """Settings each valid alone that do nothing together. Checked once flags are on top of the YAML (a file's
    ``alignment: normalised`` with ``--align-weight 5`` is fine), before any work starts."""
    train = config.train
    if train.alignment != "paper" and train.align_weight == 0:  # else the chosen form would silently do nothing
        raise UserError(f"train.alignment '{train.alignment}' needs the alignment term on: set train.align_weight "
                        "(--align-weight; the paper: 5), or leave train.alignment out")
    if config.detect.view_turns and not config.detect.views:  # else there would be no view to turn
        raise UserError("detect.view_turns turns the augmented views, but detect.views is 0: set detect.views "
                        "(for example 1, with train.view_weight), or leave detect.view_turns out")


def apply_overrides(config: Config, section: str, **values: Any) -> None:
    """Set flag values (None = flag not given) on a section, with the same type checks as YAML."""
    target = getattr(config, section)
    hints = typing.get_type_hints(type(target))
    given = {key: _coerce(value, hints[key], f"--{key.replace('_', '-')}")
             for key, value in values.items() if value is not None}
    if given:  # rebuilt, so that the section's own checks see the flags too
        setattr(config, section, _build(type(target), {**dataclasses.asdict(target), **given}, section))


def default_config_path() -> Optional[Path]:
    candidate = Path("aecfe.yaml")
    return candidate if candidate.is_file() else None


def env_root(name: str) -> Optional[str]:
    return os.environ.get(f"AECFE_{name.upper().replace('-', '_')}_ROOT")
