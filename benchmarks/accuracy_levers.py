"""The variants that ``benchmarks/accuracy.py`` runs: each lever alone against the defaults, and all together.

A lever is the part of ``aecfe.yaml`` it changes, section by section; each comment says why it was tried.
The measured rows and what they showed are in ``docs/accuracy.md`` and ``docs/accuracy_notes.md``.
"""

from __future__ import annotations

LEVERS: dict[str, dict] = {
    "stain_norm": {"detect": {"stain_norm": "dataset"}},
    "stain_image": {"detect": {"stain_norm": "image"}},
    "channel_scaling": {"train": {"feature_scaling": "channel"}},
    "norm_first": {"train": {"norm_first": True}},
    # A cell's class does not depend on its orientation: train on the square's 8 symmetries, average over them.
    "dihedral": {"train": {"dihedral": True}},
    # The same principle with features the detector really gives: each cell's view is an image turned by a
    # random symmetry (and colour-jittered), and its latent must find its cell's (the views term).
    "turned_views": {"detect": {"views": 1, "view_turns": True}, "train": {"view_weight": 1.0}},
    "ssim_l1": {"train": {"image_loss": "ssim_l1"}},
    # The paper's alignment term, off by default since the forty-fourth look: the cheapest way to lower it is
    # to shrink every latent, and with it the reconstructions stop depending on the cell (forty-third look);
    # evaluate's per-lab standardisation (feature_norm: both) matches the labs' moments column by column instead.
    "alignment": {"train": {"align_weight": 5.0}},
    "normalised_alignment": {"train": {"alignment": "normalised", "align_weight": 5.0}},
    "feature_norm": {"evaluate": {"feature_norm": "dataset"}},
    # Each lab's features both as extracted and standardised on its own, side by side: each form alone
    # raises one direction of PBC <-> Zheng and lowers the other (eighteenth look); the forest uses both.
    "feature_norm_both": {"evaluate": {"feature_norm": "both"}},
    "all_columns": {"evaluate": {"max_shift": None}},  # the default leaves out columns a stain shifts
    "image64": {"train": {"image_size": 64}},
    # The paper's capacity: at the default width 0.5 the encoder's last hidden layer (30 channels at 1x1)
    # has rank about 18 and 9 latent dimensions hold 95 % of the variance (issue 12). Twice the channels:
    "width1": {"train": {"width": 1.0}},
    # The same capacity in the default's time: width 1.0 makes an epoch about 2.3 times as long, so half
    # the epochs keep the triangle inside the 30-minute budget.
    "width1_epochs15": {"train": {"width": 1.0, "epochs": 15}},
    # Half the autoencoder's training (the default's 30 epochs are 48 of the triangle's 83 minutes): what
    # does the 2,000-image time budget cost in accuracy?
    "epochs15": {"train": {"epochs": 15}},
    # The image loss still falls at epoch 30 on every seed of the default: what does twice the training give?
    "epochs60": {"train": {"epochs": 60}},
    # Colour-augmented views of each cell (the detector's own stain and optics jitter), their RoI features
    # taken at the cell's box, each view's latent made to find the cell's among the batch's: invariance to
    # other labs' stains learnt from the user's own cells. One view each, the least that costs.
    "views": {"detect": {"views": 1}, "train": {"view_weight": 1.0}},
    # Self-supervised pretraining of the detector's backbone on the training images' cells (SimCLR on
    # stain-jittered views): 200 steps of 64 cells, about 10 passes over the cells of 1,000 images.
    "pretrain": {"detect": {"pretrain_steps": 200}},
    # The detector's input size (issue 12 names it as a lever): its views are 256 px by default, where a
    # neutrophil's lobes and granules span few pixels. 320 px is about the most the 30-minute budget leaves
    # room for (the detector's stages grow with the pixels, about 1.6 times).
    "detector320": {"detect": {"min_size": 320, "max_size": 320}},
    # A third or more of PBC's monocytes, basophils and immature granulocytes, and of BCCD's neutrophils and
    # monocytes, have a crop segmentation that flooded into touching red cells (docs/pseudo_masks.md, which
    # tallies the same on whole images): their morphology is measured with red cells in the "cell".
    "cut_red_cells": {"extract": {"cut_red_cells": True}},
    # The same cut for the detector's pseudo-masks: the images whose masks flooded into red cells are kept
    # for its training instead of dropped, so it sees BCCD's neutrophils and monocytes as often as the rest
    # (docs/pseudo_masks.md), the cells BCCD's detectors miss most (accuracy notes, status of 2026-12-07).
    "cut_pseudo_masks": {"detect": {"pseudo_mask_cut": True}},
    # The segmented central cell for an image the detector found none in (BCCD's neutrophils and monocytes).
    "segment_missed": {"detect": {"segment_missed": True}},
    # The two speed settings of the default, each taken back alone: what does the time budget cost?
    "no_bottleneck": {"train": {"image_bottleneck": 0}},
    "fp32": {"train": {"precision": "fp32"}},
    # The detector's training runs in bfloat16 by default where the CPU has it (detect.train_precision:
    # auto); taken back to float32, the default until 2026-12-01 evening:
    "detector_fp32": {"detect": {"train_precision": "fp32"}},
    # Detection in bfloat16 too (detect.precision): faster, at what cost?
    "detector_bf16": {"detect": {"train_precision": "bf16", "precision": "bf16"}},
    # The default adapts each target's classifier to that target's own cells (3 rounds of label-free
    # self-training, every method alike); taken back, as the paper has it:
    "no_self_training": {"evaluate": {"self_training": 0}},
    # Self-training learns a target cell's label only where a forest on the morphology columns alone agrees
    # (evaluate.self_training_agreement: morphology, the default since 2026-12-06 afternoon); taken back:
    "no_agreement": {"evaluate": {"self_training_agreement": "none"}},
    # Self-training learns only target cells whose sizes lie within the source's range, widened to the
    # target's spread (evaluate.self_training_sizes: source_range, the default since 2026-12-06 night;
    # thirty-first look); taken back:
    "no_size_check": {"evaluate": {"self_training_sizes": "none"}},
    # The classifier learns only the five mature white-cell types, which is all that Zheng and BCCD hold
    # (evaluate.classes; off by default: it is a user's knowledge of the new lab, not a label-free lever):
    # PBC's immature granulocytes, erythroblasts and platelets are left out of its training.
    "five_classes": {"evaluate": {"classes": ["neutrophil", "lymphocyte", "monocyte", "eosinophil", "basophil"]}},
    # The default weighs each source class alike (evaluate.class_weight: balanced); taken back, as the paper:
    "no_class_weight": {"evaluate": {"class_weight": "none"}},
    # The default gives the classifier the features as extracted and standardised per lab side by side
    # (evaluate.feature_norm: both); taken back, as before 2026-12-04 night and in the paper:
    "feature_norm_none": {"evaluate": {"feature_norm": "none"}},
    # Forests of 500 trees instead of the paper's 100, for every method alike: a 100-tree vote moves by up to
    # 0.08 between classifier seeds across labs (docs/accuracy_notes.md, twenty-third look).
    "trees500": {"evaluate": {"trees": 500}},
    # Crops that keep the cell's shape: the paper's crop stretches the box to a square, so a cell's
    # elongation, circularity and lobes in the crop follow the box's aspect ratio, which moves by 15-30 %
    # between detectors of different seeds for the same cell (the 5th-95th percentiles on the real triangle).
    "square_crops": {"detect": {"crop_shape": "square"}},
}
ALL_LEVERS: dict[str, dict] = {}
for _name in ("stain_norm", "channel_scaling", "norm_first", "ssim_l1", "normalised_alignment", "feature_norm"):
    for _section, _values in LEVERS[_name].items():
        ALL_LEVERS.setdefault(_section, {}).update(_values)
VARIANTS: dict[str, dict] = {"default": {}, **{f"default+{k}": v for k, v in LEVERS.items()}, "all_levers": ALL_LEVERS}
QUICK = {"detect": {"train_steps": 120, "train_images": 120}, "train": {"epochs": 4}}
