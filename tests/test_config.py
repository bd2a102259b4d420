import os
import re
from pathlib import Path

import pytest

from aecfe_cli.config import Config, apply_overrides, check_key_combinations, config_from_dict, load_config
from aecfe_cli.errors import UserError
from conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]


def test_example_config_loads_and_documents_every_key():
    config = load_config(ROOT / "example_config.yaml")
    text = (ROOT / "example_config.yaml").read_text()
    defaults = Config().to_dict()
    for section, values in defaults.items():
        if section == "datasets":
            continue
        if section == "preset":
            assert "\npreset: null" in text and config.preset is None
            continue
        for key, value in values.items():
            assert f"  {key}:" in text, f"{section}.{key} is not documented in example_config.yaml"
            assert getattr(getattr(config, section), key) == value, f"{section}.{key} differs from the default"
    assert config.datasets["zheng"].label_map["1"] == "neutrophil"


def test_unknown_key_names_the_closest():
    with pytest.raises(UserError, match=r"unknown key 'epoch'.*did you mean 'epochs'"):
        config_from_dict({"train": {"epoch": 3}}, "cfg.yaml")
    with pytest.raises(UserError, match=r"unknown section 'trian'.*did you mean 'train'"):
        config_from_dict({"trian": {}}, "cfg.yaml")


def test_wrong_type_names_the_key():
    with pytest.raises(UserError, match=r"cfg.yaml: train.epochs: expected int"):
        config_from_dict({"train": {"epochs": "many"}}, "cfg.yaml")
    with pytest.raises(UserError, match=r"evaluate.baselines: expected true or false"):
        config_from_dict({"evaluate": {"baselines": "yes"}}, "cfg.yaml")
    with pytest.raises(UserError, match=r"cfg.yaml: train.precision 'fp16'.*: choose one of auto, fp32, bf16"):
        config_from_dict({"train": {"precision": "fp16"}}, "cfg.yaml")
    with pytest.raises(UserError, match=r"cfg.yaml: detect.precision 'half'.*: choose one of auto, fp32, bf16"):
        config_from_dict({"detect": {"precision": "half"}}, "cfg.yaml")
    with pytest.raises(UserError, match=r"cfg.yaml: detect.train_precision 'fp16'.*: choose one of auto, fp32, bf16"):
        config_from_dict({"detect": {"train_precision": "fp16"}}, "cfg.yaml")
    with pytest.raises(UserError, match=r"cfg.yaml: train.image_bottleneck: expected 0"):
        config_from_dict({"train": {"image_bottleneck": -8}}, "cfg.yaml")
    with pytest.raises(UserError, match=r"cfg.yaml: detect.pretrain_steps: expected 0 \(none\) or more"):
        config_from_dict({"detect": {"pretrain_steps": 10, "pretrain_batch_size": 1}}, "cfg.yaml")
    with pytest.raises(UserError, match=r"cfg.yaml: detect.views: expected 0 \(none\) or a number"):
        config_from_dict({"detect": {"views": -1}}, "cfg.yaml")
    with pytest.raises(UserError, match=r"cfg.yaml: detect.crop_shape 'sqare' \(did you mean 'square'\?\): choose"):
        config_from_dict({"detect": {"crop_shape": "sqare"}}, "cfg.yaml")
    with pytest.raises(UserError, match=r"cfg.yaml: train.view_weight: expected 0 \(off\) or a positive weight"):
        config_from_dict({"train": {"view_weight": -0.5}}, "cfg.yaml")


@pytest.mark.parametrize("section, values, message", [
    ("detect", {"backbone": "resnet_18_fpn"}, "detect.backbone 'resnet_18_fpn' (did you mean 'resnet18_fpn'?)"),
    ("detect", {"stain_norm": "lab"}, "detect.stain_norm 'lab': choose one of none, dataset, image"),
    ("detect", {"min_size": 512, "max_size": 256}, "detect.min_size: the detector's input size needs"),
    ("train", {"image_size": 48}, "train.image_size '48': choose one of 32, 64, 128"),
    ("train", {"alignment": "normalized"}, "train.alignment 'normalized' (did you mean 'normalised'?)"),
    ("train", {"width": 0.0}, "train.width: expected a positive width"),
    ("train", {"align_weight": -1.0}, "train.align_weight: expected 0 (off) or a positive weight"),
    ("predict", {"format": "json"}, "predict.format 'json'"),
    ("predict", {"reject_target": 1.5}, "predict.reject_target is 1.5"),
])
def test_a_value_no_stage_accepts_fails_when_read_and_when_a_flag_sets_it(section, values, message):
    # Checked here, not when its stage is reached: detection may have run for an hour by then.
    with pytest.raises(UserError, match="cfg.yaml: " + re.escape(message)):
        config_from_dict({section: values}, "cfg.yaml")
    config = Config()
    with pytest.raises(UserError, match=re.escape(message)):
        apply_overrides(config, section, **values)
    assert config == Config()  # the refused flags left the config as it was


def test_precedence_default_yaml_flag(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\n  lr: 1\n")
    config = load_config(path)
    assert config.train.epochs == 7 and config.train.lr == 1.0 and config.train.batch_size == 128
    apply_overrides(config, "train", epochs=3, lr=None)
    assert config.train.epochs == 3 and config.train.lr == 1.0


def test_python_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"train: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(path)
    assert not marker.exists()


def test_relative_dataset_root_is_relative_to_the_config(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.yaml"
    path.write_text("datasets:\n  mine:\n    root: ../data\n")
    assert load_config(path).datasets["mine"].root == str((tmp_path / "data").resolve())


def test_paper_preset_sits_below_the_yaml_and_the_flag(tmp_path):
    paper = load_config(None, "paper")
    assert (paper.preset, paper.train.image_size, paper.train.batch_size, paper.train.feature_scaling) == \
        ("paper", 128, 500, "sample")
    assert paper.detect.backbone == "resnet101_fpn" and paper.detect.stain_norm == "none"
    # The speed settings of the default are not the paper's: its image decoder reads all 256 channels.
    assert (paper.train.image_bottleneck, paper.train.precision, paper.detect.precision,
            paper.detect.train_precision) == (0, "fp32", "fp32", "fp32")
    # Nor is adapting the classifier to each target: the paper's forest is trained on the source alone.
    assert (paper.evaluate.self_training, load_config(None, None).evaluate.self_training) == (0, 3)
    # Nor weighing the source's classes alike: the paper's forest weighs every cell alike.
    assert (paper.evaluate.class_weight, load_config(None, None).evaluate.class_weight) == ("none", "balanced")
    assert (paper.evaluate.trees, load_config(None, None).evaluate.trees) == (100, 500)
    path = tmp_path / "cfg.yaml"
    path.write_text("preset: paper\ntrain:\n  epochs: 3\n")
    config = load_config(path)
    assert config.train.epochs == 3 and config.train.batch_size == 500
    assert load_config(path, "paper").train.epochs == 3
    with pytest.raises(UserError, match="unknown preset 'papr'; did you mean 'paper'"):
        load_config(None, "papr")


def test_threads_follow_the_setting_then_omp_num_threads_then_every_core(monkeypatch):
    """A scheduler (or a parallel test run) that gives a job one core says so with OMP_NUM_THREADS; an
    explicit runtime.threads still wins."""
    import torch

    from aecfe_cli.command_settings import set_threads

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        set_threads(0)
        assert torch.get_num_threads() == 1
        set_threads(2)
        assert torch.get_num_threads() == 2
        monkeypatch.delenv("OMP_NUM_THREADS")
        set_threads(0)
        assert torch.get_num_threads() == (os.cpu_count() or 1)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command, yaml, message, section, completion", [
    # alignment: normalised at the default align_weight of 0 would silently train without the term.
    ("train", "train:\n  alignment: normalised\n", "train.alignment 'normalised' needs the alignment term on",
     "train", {"align_weight": 5.0}),
    # view_turns at the default views of 0 would turn no view.
    ("detect", "detect:\n  view_turns: true\n", "detect.view_turns turns the augmented views, but detect.views is 0",
     "detect", {"views": 1}),
])
def test_a_setting_that_does_nothing_without_another_fails_before_any_work(tmp_path, command, yaml, message, section,
                                                                          completion):
    (tmp_path / "aecfe.yaml").write_text(yaml)
    result = run_cli(command, "--data", "lab_a", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert message in result.stderr
    assert not (tmp_path / "aecfe-work").exists()
    config = load_config(tmp_path / "aecfe.yaml")
    apply_overrides(config, section, **completion)  # the flag completes what the file began
    check_key_combinations(config)
