"""The stage-1 detector: building, training, detection features, checkpoints, annotation readers and the
label-free stain segmentation, on tiny synthetic smear fields and tiny models."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aecfe_cli import annotations, colour, pseudo_labels, synth
from aecfe_cli import detector as net
from aecfe_cli import detector_training as training
from aecfe_cli.errors import UserError
from aecfe_cli.masks import mask_iou
from aecfe_cli.images import load_rgb
from conftest import CreatesMarkerWhenUnpickled

FIELD_SIZE = (160, 120)  # (width, height)
TINY = {"min_size": 96, "max_size": 128}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are dominated by thread synchronisation; one thread is as fast and immune to other
    processes competing for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def fields(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fields")
    synth.write_field_dataset(root, "lab_a", 3, seed=0, size=FIELD_SIZE)
    return root


@pytest.fixture(scope="module")
def samples(fields) -> list[annotations.TrainSample]:
    return annotations.read_coco(fields / "annotations.json")


@pytest.fixture(scope="module")
def images(samples) -> list[np.ndarray]:
    return [load_rgb(s.image_path) for s in samples]


@pytest.fixture(scope="module")
def trained(samples):
    """A tiny detector after two training steps, and the losses and progress calls they produced."""
    torch.manual_seed(0)
    model = net.build_detector("resnet18_fpn", **TINY)
    calls = []
    losses = training.train_detector(model, samples, epochs=1, batch_size=2, lr=1e-3, device="cpu", seed=0,
                                     train_size=96, on_step=lambda step, total, terms: calls.append((step, total, terms)))
    return model, losses, calls


# ---------------------------------------------------------------------------------------------------
# Building and training


def test_a_small_training_set_still_gets_the_step_budget(samples):
    """Two images at batch 2 are one step an epoch; a budget of 3 steps repeats them as new views."""
    assert training.training_steps(2, epochs=1, batch_size=2, min_steps=3) == 3
    assert training.training_steps(1000, epochs=1, batch_size=4, min_steps=240) == 250
    torch.manual_seed(0)
    model = net.build_detector("resnet18_fpn", **TINY)
    calls = []
    losses = training.train_detector(model, samples[:2], epochs=1, batch_size=2, lr=1e-3, device="cpu", seed=0,
                                     min_steps=3, train_size=64,
                                     on_step=lambda step, total, terms: calls.append((step, total)))
    assert len(losses) == 3 and calls == [(1, 3), (2, 3), (3, 3)]


def test_build_detector_is_a_two_class_mask_rcnn_with_recorded_arguments():
    model = net.build_detector("resnet18_fpn", **TINY, box_score_thresh=0.7)
    assert model.roi_heads.box_predictor.cls_score.out_features == 2
    assert model.roi_heads.mask_predictor.mask_fcn_logits.out_channels == 2
    assert all(p.requires_grad for p in model.parameters()), "every layer must be trainable"
    assert isinstance(model.backbone.body.bn1, torch.nn.GroupNorm)
    args = net.detector_args(model)
    assert args["backbone"] == "resnet18_fpn" and args["min_size"] == 96 and args["box_score_thresh"] == 0.7
    rebuilt = net.build_detector(**args)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_build_detector_refuses_an_unknown_backbone():
    with pytest.raises(UserError, match="resnet18_fpn"):
        net.build_detector("vgg16_fpn")


def test_training_steps_give_finite_losses_and_report_progress(trained):
    model, losses, calls = trained
    assert len(losses) == 2  # 3 fields, batch 2 -> 2 steps
    assert all(math.isfinite(loss) for loss in losses)
    assert [(step, total) for step, total, _ in calls] == [(1, 2), (2, 2)]
    assert {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness"} <= set(calls[0][2])
    assert not model.training
    assert model.transform.min_size == (96,) and model.transform.max_size == 128, "training sizes must be restored"


def test_training_is_seeded(samples):
    def run() -> list[float]:
        torch.manual_seed(123)  # the weights' initialisation is the caller's; training's own randomness is seeded
        model = net.build_detector("resnet18_fpn", **TINY)
        return training.train_detector(model, samples[:2], epochs=1, batch_size=2, lr=1e-3, device="cpu", seed=7,
                                  train_size=64)

    assert run() == run()


# ---------------------------------------------------------------------------------------------------
# Detection


def test_detect_returns_mask_branch_features_of_the_final_boxes(trained, images):
    model, _, _ = trained
    found = net.detect(model, images, "cpu", score_threshold=0.0)
    assert len(found) == len(images)
    assert all(found), "with no score threshold every image has detections"
    for image, detections in zip(images, found):
        height, width = image.shape[:2]
        for d in detections:
            assert isinstance(d, net.Detection)
            assert d.roi_feature.shape == (256, 14, 14) and d.roi_feature.dtype == np.float32
            assert d.mask.shape == (height, width) and d.mask.dtype == bool
            assert 0 <= d.box[0] <= d.box[2] <= width and 0 <= d.box[1] <= d.box[3] <= height
        assert [d.score for d in detections] == sorted((d.score for d in detections), reverse=True)

    # Recompute the mask branch's RoIAlign on the returned boxes: the captured feature must be exactly it.
    image, detections = images[0], found[0][:3]
    with torch.inference_mode():
        batch, _ = model.transform([net._as_input(image, white_balance=True)])
        features = model.backbone(batch.tensors)
        resized_h, resized_w = batch.image_sizes[0]
        scale = torch.tensor([resized_w / image.shape[1], resized_h / image.shape[0]] * 2)
        boxes = torch.from_numpy(np.stack([d.box for d in detections])) * scale
        pooled = model.roi_heads.mask_roi_pool(features, [boxes], batch.image_sizes)
    expected = pooled.numpy()
    assert np.allclose(np.stack([d.roi_feature for d in detections]), expected, atol=1e-3, rtol=1e-3)


def test_roi_features_at_the_detected_boxes_are_the_stored_features_and_follow_the_image(trained, images):
    """Views for train.view_weight: RoIAlign at given boxes of any copy of an image, in the boxes' order."""
    model, _, _ = trained
    found = net.detect(model, images[:2], "cpu", score_threshold=0.0)
    boxes = [np.stack([d.box for d in detections[:2]]) for detections in found]
    pooled = net.roi_features_at(model, images[:2], boxes, "cpu")
    stored = np.stack([d.roi_feature for detections in found for d in detections[:2]])
    assert pooled.shape == (len(stored), 256, 14, 14)
    assert np.allclose(pooled, stored, atol=1e-3, rtol=1e-3)
    copy = colour.augmented_copy(images[0], np.random.default_rng(0))
    assert copy.dtype == np.uint8 and copy.shape == images[0].shape and not np.array_equal(copy, images[0])
    assert not np.allclose(net.roi_features_at(model, [copy], boxes[:1], "cpu"), pooled[:len(boxes[0])], atol=1e-3)


def test_views_of_a_detection_batch_are_those_of_each_image_alone(trained, images):
    """detect.views copies every image of a detection batch in one call: each cell's views, in detection
    order, are those its image yields alone (seeded by its path), and an image without cells adds none."""
    from aecfe_cli.detect import _view_features

    model, _, _ = trained
    found = net.detect(model, images[:2], "cpu", score_threshold=0.0)
    results = [found[0][:2], [], found[1][:1]]
    rels, batch = ["a.png", "empty.png", "b.png"], [images[0], images[1], images[1]]
    together = _view_features(model, rels, batch, results, 2, None, "cpu")
    alone = [v for r, i, k in zip(rels, batch, results) for v in _view_features(model, [r], [i], [k], 2, None, "cpu")]
    assert len(together) == 3 and all(v.shape == (2, 256, 14, 14) and v.dtype == np.float16 for v in together)
    assert all(np.allclose(a, b, atol=2e-3) for a, b in zip(together, alone))
    assert not np.allclose(together[0][0], together[0][1], atol=1e-2)  # two different copies


def test_detect_applies_the_score_threshold(trained, images):
    model, _, _ = trained
    everything = net.detect(model, images[:1], "cpu", score_threshold=0.0)[0]
    median = float(np.median([d.score for d in everything]))
    confident = net.detect(model, images[:1], "cpu", score_threshold=median)[0]
    assert confident and all(d.score >= median for d in confident)
    assert len(confident) < len(everything)
    assert model.roi_heads.score_thresh == 0.5, "detect must restore the model's own threshold"


def test_central_only_detection_is_the_central_detection_of_the_full_pass(trained, images):
    """Single-cell datasets run the mask branch on the central box alone: same box, score, mask and feature."""
    model, _, _ = trained
    everything = net.detect(model, images, "cpu", score_threshold=0.0)
    central = net.detect(model, images, "cpu", score_threshold=0.0, central_only=True)
    for image, full, chosen in zip(images, everything, central):
        expected = net.select_central(full, image.shape)
        assert len(chosen) == 1 and expected is not None
        assert np.array_equal(chosen[0].box, expected.box) and chosen[0].score == expected.score
        assert np.array_equal(chosen[0].mask, expected.mask)
        assert np.allclose(chosen[0].roi_feature, expected.roi_feature, atol=1e-5)
    assert net.detect(model, images[:1], "cpu", score_threshold=1.01, central_only=True) == [[]]


def test_bfloat16_trains_and_detects_with_a_bfloat16_trunk_and_float32_results(samples, images):
    """detect.train_precision bf16: training runs the network in bfloat16 and keeps float32 weights.
    detect.precision bf16: detection runs the backbone in bfloat16 and hands float32 features to the heads,
    so what it returns is float32."""
    torch.manual_seed(0)
    model = net.build_detector("resnet18_fpn", **TINY)
    trunk_dtypes = []
    model.backbone.body.register_forward_hook(lambda module, inputs, output: trunk_dtypes.append(output["0"].dtype))
    before = [p.detach().clone() for p in model.parameters()]
    losses = training.train_detector(model, samples[:2], epochs=1, batch_size=2, lr=1e-3, device="cpu", seed=0,
                                     train_size=64, autocast_dtype=torch.bfloat16)
    assert trunk_dtypes == [torch.bfloat16] and all(math.isfinite(loss) for loss in losses)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))

    found = net.detect(model, images[:2], "cpu", score_threshold=0.0, autocast_dtype=torch.bfloat16)
    net.detect(model, images[:1], "cpu", score_threshold=0.0)
    assert trunk_dtypes[1:] == [torch.bfloat16, torch.float32]
    assert all(found)
    for detections in found:
        for d in detections:
            assert d.roi_feature.dtype == np.float32 and d.box.dtype == np.float32 and np.isfinite(d.roi_feature).all()


def test_select_central_prefers_the_detection_nearest_the_centre():
    def detection(box, score):
        return net.Detection(np.array(box, np.float32), score, np.zeros((100, 100), bool),
                             np.zeros((256, 14, 14), np.float32))

    corner = detection([0, 0, 20, 20], 0.99)
    centre = detection([40, 45, 60, 65], 0.60)
    assert net.select_central([corner, centre], (100, 100, 3)) is centre
    assert net.select_central([], (100, 100, 3)) is None


def test_crop_cell_adds_the_scaled_margin_and_resizes():
    # Pixel values encode coordinates, so the crop's corners reveal where it was cut.
    ys, xs = np.mgrid[0:400, 0:400]
    image = np.stack([xs // 2, ys // 2, np.zeros_like(xs)], axis=2).astype(np.uint8)
    crop = net.crop_cell(image, [100, 100, 200, 200], size=130)  # 10 before + 100 + 20 after = 130: no resize
    assert crop.shape == (3, 130, 130) and crop.dtype == np.uint8
    assert crop[0, 0, 0] == 90 // 2 and crop[1, 0, 0] == 90 // 2
    assert crop[0, 0, -1] == 219 // 2 and crop[1, -1, 0] == 219 // 2

    half = image[::2, ::2]  # a 200 px image: the margins halve to 5 before and 10 after
    crop = net.crop_cell(half, [50, 50, 100, 100], size=65)
    assert crop[0, 0, 0] == half[45, 45, 0] and crop[0, 0, -1] == half[45, 109, 0]

    edge = net.crop_cell(image, [0, 300, 60, 399], size=128)  # clipped at the image border
    assert edge.shape == (3, 128, 128) and edge[0, 0, 0] == 0


def test_a_square_crop_keeps_the_shape_of_a_cell_the_box_crop_stretches():
    # A round cell in a box twice as wide as tall (a detector that fitted it loosely sideways).
    ys, xs = np.mgrid[0:400, 0:400]
    image = np.full((400, 400, 3), 230, np.uint8)
    image[(ys - 200) ** 2 + (xs - 200) ** 2 <= 40 ** 2] = (120, 40, 160)
    box = [115, 155, 275, 235]  # 160 x 80 px, the cell at its centre

    def width_over_height(crop):
        cell = crop[1] < 100
        return cell.any(axis=0).sum() / cell.any(axis=1).sum()

    stretched = net.crop_cell(image, box, size=100)
    square = net.crop_cell(image, box, size=100, shape="square")
    assert width_over_height(stretched) == pytest.approx(0.5, abs=0.1)  # squeezed sideways to half its height
    assert width_over_height(square) == pytest.approx(1.0, abs=0.05)

    # The square is centred on the box; where it leaves the image, the image's edge pixels fill it.
    ys, xs = np.mgrid[0:250, 0:250]
    coordinates = np.stack([xs, ys, np.zeros_like(xs)], axis=2).astype(np.uint8)
    # Margins 6.25 before and 12.5 after: window x -6.25..72.5, y 93.75..132.5; the 79 px square from x -7, y 73.
    edge = net.crop_cell(coordinates, [0, 100, 60, 120], size=79, shape="square")
    assert list(edge[0, 0, :9]) == [0] * 8 + [1] and edge[0, 0, -1] == 71
    assert edge[1, 0, 0] == 73 and edge[1, -1, 0] == 151


def test_detector_flops_counts_the_whole_network_and_grows_with_the_image(trained):
    model, _, _ = trained
    square = net.detector_flops(model, (96, 96))
    wide = net.detector_flops(model, (96, 128))  # the model resizes to 96-128 px: wider means more pixels
    assert square > 1e9  # a ResNet-18 FPN Mask R-CNN is several GFLOPs even at 96 px
    assert wide > square
    assert model.roi_heads.detections_per_img == 50, "the count must restore the model's settings"


# ---------------------------------------------------------------------------------------------------
# Checkpoints


def test_save_and_load_give_identical_detections(trained, images, tmp_path):
    model, _, _ = trained
    path = tmp_path / "detector.pt"
    net.save_detector(path, model)
    loaded = net.load_detector(path, "cpu")
    assert net.detector_args(loaded) == net.detector_args(model)
    before = net.detect(model, images, "cpu", score_threshold=0.0)
    after = net.detect(loaded, images, "cpu", score_threshold=0.0)
    for a_list, b_list in zip(before, after):
        assert len(a_list) == len(b_list)
        for a, b in zip(a_list, b_list):
            assert np.array_equal(a.box, b.box) and a.score == b.score
            assert np.array_equal(a.mask, b.mask) and np.array_equal(a.roi_feature, b.roi_feature)


def test_a_pickled_payload_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "executed.txt"
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {"weight": torch.zeros(1)}, "payload": CreatesMarkerWhenUnpickled(marker)}, path)
    assert not marker.exists()
    with pytest.raises(UserError, match="evil.pt"):
        net.load_detector(path, "cpu")
    assert not marker.exists(), "the pickled object must never be executed"


def test_a_coco_91_class_state_dict_is_refused_naming_the_difference(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    coco = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "coco.pt"
    torch.save(coco.state_dict(), path)
    with pytest.raises(UserError) as error:
        net.load_detector(path, "cpu")
    message = str(error.value)
    assert "coco.pt" in message and "resnet50_fpn" in message
    assert "roi_heads.box_predictor.cls_score.weight: file has [91, 1024]" in message
    assert "needs [2, 1024]" in message


def test_coco_weights_start_training_with_new_two_class_heads(tmp_path):
    """torchvision's fine-tuning recipe: a 91-class COCO Mask R-CNN gives every tensor but the class
    heads; what could not be used is named, and the result trains as a 2-class detector."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    coco = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)
    path = tmp_path / "coco.pt"
    torch.save(coco.state_dict(), path)
    model, report = net.detector_from_initial_weights(path, **TINY)
    assert (report["backbone"], report["norm"]) == ("resnet50_fpn", "batch")
    assert sorted(name.split(" ")[0] for name in report["not_used"]) == sorted(
        f"roi_heads.{head}.{kind}" for head in ("box_predictor.cls_score", "box_predictor.bbox_pred",
                                                 "mask_predictor.mask_fcn_logits") for kind in ("weight", "bias"))
    assert "roi_heads.box_predictor.cls_score.weight (file [91, 1024], model [2, 1024])" in report["not_used"]
    assert report["loaded"] == len(coco.state_dict()) - 6 and report["new"] == 6
    own = model.state_dict()
    assert torch.equal(own["backbone.body.layer4.2.conv3.weight"], coco.state_dict()["backbone.body.layer4.2.conv3.weight"])
    assert own["roi_heads.box_predictor.cls_score.weight"].shape == (2, 1024)


def test_imagenet_resnet_weights_become_the_backbone_body(tmp_path):
    from torchvision.models import resnet18

    torch.manual_seed(0)
    classifier = resnet18(weights=None)
    path = tmp_path / "resnet18.pt"
    torch.save({"model": classifier.state_dict()}, path)  # wrapped, as training scripts often save
    model, report = net.detector_from_initial_weights(path, **TINY)
    assert report["backbone"] == "resnet18_fpn" and report["not_used"] == [] and report["loaded"] == 120
    assert torch.equal(model.state_dict()["backbone.body.conv1.weight"], classifier.state_dict()["conv1.weight"])
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="other.pt: not a torchvision ResNet or R-CNN state dict"):
        net.detector_from_initial_weights(tmp_path / "other.pt", **TINY)


def test_a_bare_two_class_torchvision_state_dict_loads_with_its_backbone_inferred(tmp_path):
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    torch.manual_seed(0)
    source = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2).eval()
    path = tmp_path / "two_class.pt"
    torch.save(source.state_dict(), path)
    loaded = net.load_detector(path, "cpu", backbone_hint="resnet18_fpn")  # the hint is only a hint
    args = net.detector_args(loaded)
    assert args["backbone"] == "resnet50_fpn" and args["norm"] == "batch" and args["white_balance"] is False
    for key, value in source.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_a_faster_rcnn_state_dict_is_refused_for_its_missing_mask_head(trained, tmp_path):
    model, _, _ = trained
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("roi_heads.mask_")}
    path = tmp_path / "faster.pt"
    torch.save(state, path)
    with pytest.raises(UserError, match="no mask head"):
        net.load_detector(path, "cpu")


# ---------------------------------------------------------------------------------------------------
# Label-free pseudo instances


def drawn_cell(size: int = 160) -> tuple[np.ndarray, np.ndarray]:
    """A pink-background smear: a lilac cell with a dark purple nucleus, two pale red cells beside it."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32)
    image = np.empty((size, size, 3), np.float32)
    image[:] = (236, 214, 200)
    for cx, cy in ((30, 30), (130, 135)):
        image[(xs - cx) ** 2 + (ys - cy) ** 2 <= 18 ** 2] = (222, 170, 165)
    cell = ((xs - 80) / 34) ** 2 + ((ys - 78) / 30) ** 2 <= 1
    image[cell] = (200, 170, 205)
    nucleus = ((xs - 76) / 20) ** 2 + ((ys - 80) / 15) ** 2 <= 1
    image[nucleus] = (95, 45, 140)
    noise = np.random.default_rng(0).normal(0, 3, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8), cell


def test_pseudo_instances_find_a_drawn_cell():
    image, cell = drawn_cell()
    boxes, masks = pseudo_labels.pseudo_instances(image)
    assert len(boxes) == 1 and masks.shape == (1, *cell.shape) and masks.dtype == bool
    assert mask_iou(masks[0], cell) > 0.8
    rows, cols = np.nonzero(cell)
    assert np.allclose(boxes[0], [cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], atol=3)


def test_pseudo_instances_find_the_synthetic_fields_cells(samples, images):
    for sample, image in zip(samples, images):
        boxes, masks = pseudo_labels.pseudo_instances(image)
        for truth in sample.masks:
            assert max((mask_iou(m, truth) for m in masks), default=0.0) > 0.8


def test_pseudo_instances_find_nothing_in_an_empty_slide():
    blank = np.random.default_rng(0).normal(225, 3, (120, 160, 3)).clip(0, 255).astype(np.uint8)
    boxes, masks = pseudo_labels.pseudo_instances(blank)
    assert boxes.shape == (0, 4) and masks.shape == (0, 120, 160)


def test_pseudo_samples_keep_images_with_cells_and_drop_empty_ones(tmp_path):
    image, _ = drawn_cell()
    Image.fromarray(image).save(tmp_path / "cell.png")
    Image.fromarray(np.full((80, 80, 3), 230, np.uint8)).save(tmp_path / "empty.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    found = pseudo_labels.pseudo_samples([tmp_path / "cell.png", tmp_path / "empty.png", tmp_path / "broken.png"])
    assert [s.image_path.name for s in found] == ["cell.png"]
    assert found[0].boxes.shape == (1, 4) and found[0].masks.shape == (1, 160, 160)


def test_pseudo_mask_cut_keeps_an_image_whose_cell_flooded_into_a_red_cell(tmp_path, monkeypatch):
    rows, cols = np.mgrid[:96, :96]
    body, nucleus = ((rows - 48) ** 2 + (cols - 48) ** 2 <= r**2 for r in (20, 9))
    red_cells = ((rows - 48) ** 2 + (cols - 77) ** 2 <= 11**2) | ((rows - 20) ** 2 + (cols - 40) ** 2 <= 10**2)
    leaked = body | red_cells  # the flooding took in two touching red cells
    Image.fromarray(np.full((96, 96, 3), 200, np.uint8)).save(tmp_path / "field.png")
    monkeypatch.setattr(pseudo_labels, "segment_cells",
                        lambda image: [pseudo_labels._Candidate(leaked, nucleus, pseudo_labels.plausible_cell(leaked, nucleus))])
    assert pseudo_labels.pseudo_samples([tmp_path / "field.png"]) == []  # dropped, as by default
    (kept,) = pseudo_labels.pseudo_samples([tmp_path / "field.png"], cut=True)
    assert kept.masks.shape == (1, 96, 96) and mask_iou(kept.masks[0], body) > 0.9
    assert np.allclose(kept.boxes[0], [28, 28, 69, 69], atol=2)  # the white cell's box, without the red cell


def test_central_instance_stands_in_with_the_central_cell_cut_off_the_red_cells_it_flooded_into(monkeypatch):
    rows, cols = np.mgrid[:96, :96]
    body, nucleus = ((rows - 48) ** 2 + (cols - 48) ** 2 <= r**2 for r in (20, 9))
    red_cells = ((rows - 48) ** 2 + (cols - 77) ** 2 <= 11**2) | ((rows - 20) ** 2 + (cols - 40) ** 2 <= 10**2)
    leaked = body | red_cells  # the flooding took in two touching red cells
    corner, corner_nucleus = ((rows - 84) ** 2 + (cols - 10) ** 2 <= r**2 for r in (9, 5))
    image = np.full((96, 96, 3), 200, np.uint8)
    candidates = [pseudo_labels._Candidate(corner, corner_nucleus, True),
                  pseudo_labels._Candidate(leaked, nucleus, pseudo_labels.plausible_cell(leaked, nucleus))]
    monkeypatch.setattr(pseudo_labels, "segment_cells", lambda image: candidates)
    box, mask = pseudo_labels.central_instance(image)
    assert mask.shape == (96, 96) and mask_iou(mask, body) > 0.9
    assert np.allclose(box, [28, 28, 69, 69], atol=2)  # the central white cell's box, without the red cell
    # A central "cell" that stays implausible (far larger than its nucleus) stands in for nothing.
    candidates[1] = pseudo_labels._Candidate(body, (rows - 48) ** 2 + (cols - 48) ** 2 <= 3**2, False)
    assert pseudo_labels.central_instance(image) is None
    monkeypatch.setattr(pseudo_labels, "segment_cells", lambda image: [])
    assert pseudo_labels.central_instance(image) is None


def test_settings_added_later_leave_what_was_made_before_them_current():
    from aecfe_cli.config import DetectConfig, ExtractConfig
    from aecfe_cli.datasets import Dataset
    from aecfe_cli.detect import DETECTION_KEYS, DETECTOR_KEYS, _section, detections_fingerprint, detector_fingerprint
    from aecfe_cli.extract import extraction_fingerprint
    from aecfe_cli.workdir import fingerprint, output_digest

    def without(section: dict, *keys: str) -> dict:
        return {k: v for k, v in section.items() if k not in keys}

    # Each later setting, at the value earlier outputs were made with, is left out; any other value names it.
    assert detector_fingerprint(DetectConfig(pseudo_mask_cut=True), 0) != detector_fingerprint(DetectConfig(), 0)
    assert detector_fingerprint(DetectConfig(), 0) == fingerprint(
        "detector", without(_section(DetectConfig(), DETECTOR_KEYS), "pseudo_mask_cut"), 0, {})
    dataset = Dataset(name="lab", layout="folder", root=Path("."), records=[])
    made_by = {"outputs": {"model.pt": {"sha256": "0"}}}
    for later in (DetectConfig(segment_missed=True), DetectConfig(views=1, view_turns=True)):
        assert (detections_fingerprint(dataset, made_by, later)
                != detections_fingerprint(dataset, made_by, DetectConfig(views=later.views)))
    assert detections_fingerprint(dataset, made_by, DetectConfig()) == fingerprint(
        "detect", without(_section(DetectConfig(), DETECTION_KEYS), "segment_missed", "view_turns"), None,
        {"images": dataset.fingerprint(), "detector": output_digest(made_by)})
    assert (extraction_fingerprint(made_by, made_by, ExtractConfig(cut_red_cells=True))
            != extraction_fingerprint(made_by, made_by, ExtractConfig()))


# ---------------------------------------------------------------------------------------------------
# Annotation readers


def write_voc(root: Path, objects: list[tuple[str, tuple[int, int, int, int]]], stem: str = "Blood_00001") -> None:
    for folder in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((60, 80, 3), 200, np.uint8)).save(root / "JPEGImages" / f"{stem}.jpg")
    annotation = ElementTree.Element("annotation")
    ElementTree.SubElement(annotation, "filename").text = f"{stem}.jpg"
    for name, (x0, y0, x1, y1) in objects:
        obj = ElementTree.SubElement(annotation, "object")
        ElementTree.SubElement(obj, "name").text = name
        box = ElementTree.SubElement(obj, "bndbox")
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), (x0, y0, x1, y1)):
            ElementTree.SubElement(box, tag).text = str(value)
    ElementTree.ElementTree(annotation).write(root / "Annotations" / f"{stem}.xml")
    (root / "ImageSets" / "Main" / "train.txt").write_text(f"{stem}\n")


def test_read_voc_reads_white_cells_drops_degenerate_boxes_and_cuts_masks(tmp_path):
    write_voc(tmp_path, [("WBC", (11, 6, 40, 30)), ("RBC", (50, 10, 70, 30)), ("WBC", (60, 40, 60, 50))])
    masks = tmp_path / "masks"
    masks.mkdir()
    semantic = np.zeros((60, 80), np.uint8)
    semantic[8:28, 12:38] = 255  # the white cell
    semantic[12:28, 52:68] = 128  # outside every WBC box: must not enter the instance
    Image.fromarray(semantic).save(masks / "Blood_Mask_00001.png")
    [sample] = annotations.read_voc(tmp_path, ["train"], mask_dir=masks)
    assert sample.image_path == tmp_path / "JPEGImages" / "Blood_00001.jpg"
    assert np.array_equal(sample.boxes, [[10, 5, 40, 30]])  # 1-based inclusive VOC -> 0-based half-open
    assert sample.masks.shape == (1, 60, 80)
    assert np.array_equal(sample.masks[0], semantic == 255)
    [without_masks] = annotations.read_voc(tmp_path)
    assert without_masks.masks is None


def test_read_voc_names_a_malformed_file(tmp_path):
    write_voc(tmp_path, [("WBC", (11, 6, 40, 30))])
    (tmp_path / "Annotations" / "Blood_00001.xml").write_text("<annotation><object><name>WBC</name>")
    with pytest.raises(UserError, match="Blood_00001.xml"):
        annotations.read_voc(tmp_path, ["train"])


def encode_compressed_rle(mask: np.ndarray) -> str:
    """pycocotools' rleToString, transcribed, to check the reader against the reference encoding."""
    flat = mask.ravel(order="F").astype(np.uint8)
    counts, previous, run = [], 0, 0
    for value in flat:
        if value != previous:
            counts.append(run)
            run, previous = 0, value
        run += 1
    counts.append(run)
    text = ""
    for i, count in enumerate(counts):
        x = count - counts[i - 2] if i > 2 else count
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if c & 0x10 else (x != 0)
            text += chr((c | 0x20 if more else c) + 48)
    return text


def test_read_coco_decodes_polygons_and_both_rle_forms(tmp_path):
    Image.fromarray(np.full((40, 50, 3), 220, np.uint8)).save(tmp_path / "a.png")
    rng = np.random.default_rng(0)
    blob = np.zeros((40, 50), bool)
    blob[5:30, 20:45] = rng.random((25, 25)) > 0.3  # many runs, so the difference coding is exercised
    flat = blob.ravel(order="F")
    changes = np.flatnonzero(np.diff(flat.astype(int))) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    uncompressed = {"size": [40, 50], "counts": ([0] if flat[0] else []) + runs}
    data = {
        "images": [{"id": 1, "file_name": "a.png", "width": 50, "height": 40}],
        "categories": [{"id": 3, "name": "WBC"}, {"id": 4, "name": "rbc"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 3, "bbox": [2, 2, 10, 10],
             "segmentation": [[2, 2, 12, 2, 12, 12, 2, 12]]},
            {"id": 2, "image_id": 1, "category_id": 3, "bbox": [20, 5, 25, 25], "segmentation": uncompressed},
            {"id": 3, "image_id": 1, "category_id": 3, "bbox": [20, 5, 25, 25],
             "segmentation": {"size": [40, 50], "counts": encode_compressed_rle(blob)}},
            {"id": 4, "image_id": 1, "category_id": 4, "bbox": [0, 0, 5, 5], "segmentation": []},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    [sample] = annotations.read_coco(tmp_path / "instances.json", category="wbc")
    assert np.array_equal(sample.boxes[0], [2, 2, 12, 12]) and len(sample.boxes) == 3
    square = np.zeros((40, 50), bool)
    square[2:13, 2:13] = True  # PIL fills the polygon including its outline
    assert np.array_equal(sample.masks[0], square)
    assert np.array_equal(sample.masks[1], blob) and np.array_equal(sample.masks[2], blob)


def test_read_coco_matches_the_synthetic_generators_instance_masks(fields, samples):
    for sample in samples:
        instance_ids = np.asarray(Image.open(fields / "masks" / sample.image_path.name))
        expected = [instance_ids == k for k in range(1, instance_ids.max() + 1)]
        assert len(sample.masks) == len(expected)
        for mask, truth in zip(sample.masks, expected):
            assert np.array_equal(mask, truth)


def test_read_coco_names_the_missing_category(tmp_path):
    (tmp_path / "instances.json").write_text(json.dumps({"images": [], "annotations": [],
                                                          "categories": [{"id": 1, "name": "cell"}]}))
    with pytest.raises(UserError, match="'wbc'.*cell"):
        annotations.read_coco(tmp_path / "instances.json")


def test_box_only_samples_get_masks_derived_inside_their_boxes(tmp_path):
    image, cell = drawn_cell()
    Image.fromarray(image).save(tmp_path / "cell.png")
    rows, cols = np.nonzero(cell)
    box = np.array([cols.min(), rows.min(), cols.max() + 1, rows.max() + 1], np.float32)
    derived = pseudo_labels.mask_from_box(image, box)
    assert mask_iou(derived, cell) > 0.8
    assert not derived[:, : int(box[0])].any() and not derived[: int(box[1])].any()


@pytest.mark.parametrize("element", range(8))
def test_turned_image_keeps_each_cell_in_its_box_as_the_autoencoder_turns_maps(element):
    """detect.view_turns: the box of a turned view must frame the same cell, turned as autoencoder.dihedral
    turns a map, or the view term would pull a cell's latent towards background."""
    from aecfe_cli.autoencoder import dihedral
    from aecfe_cli.detect import turn_image

    image = np.random.default_rng(element).integers(0, 256, (30, 50, 3), dtype=np.uint8)
    box = np.array([[7, 4, 19, 25]], np.float32)  # x0, y0, x1, y1: 12 wide, 21 high
    turned, (turned_box,) = turn_image(image, box, element)
    x0, y0, x1, y1 = turned_box.astype(int)
    inside = turned[y0:y1, x0:x1]
    expected = dihedral(torch.from_numpy(image[4:25, 7:19]).permute(2, 0, 1), element).permute(1, 2, 0).numpy()
    assert turned.shape[:2] == ((30, 50) if element % 2 == 0 else (50, 30))
    assert np.array_equal(inside, expected)
