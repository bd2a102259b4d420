"""`status` names what changed: a stale stage says which setting, seed, input or code version differs."""

import json

from aecfe_cli import __version__, workdir
from aecfe_cli.workdir import fingerprint, state, what_changed, write_manifest


def _finished_stage(folder, stage, config, seed=0, inputs=None):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "out.bin").write_bytes(b"result")
    value = fingerprint(stage, config, seed, inputs or {})
    write_manifest(folder, stage, fingerprint_value=value, config=config, seed=seed, device="cpu",
                   inputs=inputs or {}, outputs=["out.bin"], counts={}, timings={})
    return folder


def test_a_changed_setting_is_named_with_old_and_new_value(tmp_path):
    folder = _finished_stage(tmp_path / "train", "train", {"epochs": 15, "lr": 0.001, "width": 0.5})
    same = fingerprint("train", {"epochs": 15, "lr": 0.001, "width": 0.5}, 0, {})
    assert state(folder, same) == "done" and what_changed(folder, same) == []
    other = fingerprint("train", {"epochs": 30, "lr": 0.001, "width": 0.5}, 1, {})
    assert state(folder, other) == "stale"
    assert what_changed(folder, other) == ["train.epochs 15 -> 30", "runtime.seed 0 -> 1"]


def test_the_detector_names_its_section_and_inputs_are_named(tmp_path):
    folder = _finished_stage(tmp_path / "detector", "detector", {"min_size": 128}, inputs={"weights": "aaa"})
    expected = fingerprint("detector", {"min_size": 256}, 0, {"weights": "bbb"})
    assert what_changed(folder, expected) == ["detect.min_size 128 -> 256", "input weights changed"]


def test_a_new_key_or_code_version_is_named(tmp_path, monkeypatch):
    folder = _finished_stage(tmp_path / "detect", "detect", {"crop_size": 32}, seed=None)
    monkeypatch.setattr(workdir, "__version__", "9.9.9")
    expected = fingerprint("detect", {"crop_size": 32, "all_cells": False}, None, {})
    assert what_changed(folder, expected) == ["detect.all_cells (unset) -> false", f"aecfe version {__version__} -> 9.9.9"]


def test_a_manifest_without_made_with_is_compared_by_its_config(tmp_path):
    """Workdirs made before manifests recorded what their fingerprint was made of still get a reason."""
    folder = _finished_stage(tmp_path / "train", "train", {"epochs": 15, "lr": 0.001})
    manifest = json.loads((folder / "manifest.json").read_text())
    del manifest["made_with"]
    manifest["fingerprint"] = "from-an-older-version"
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert what_changed(folder, fingerprint("train", {"epochs": 30, "lr": 0.001}, 0, {})) == ["train.epochs 15 -> 30"]
    assert what_changed(folder, fingerprint("train", {"epochs": 15, "lr": 0.001}, 0, {})) == ["its inputs changed"]


def test_an_output_changed_on_disk_is_named(tmp_path):
    config = {"epochs": 15}
    folder = _finished_stage(tmp_path / "train", "train", config)
    (folder / "out.bin").write_bytes(b"truncated")
    expected = fingerprint("train", config, 0, {})
    assert state(folder, expected) == "stale" and what_changed(folder, expected) == ["out.bin changed on disk"]


def test_status_reads_a_saved_config_another_version_wrote_as_the_defaults(tmp_path):
    from conftest import run_cli

    work = tmp_path / "w"
    work.mkdir()
    (work / "datasets.json").write_text("{}")
    (work / "config.yaml").write_text("detect:\n  a_key_of_another_version: 3\n")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in work.iterdir())
    result = run_cli("--workdir", "w", "status", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "unknown key 'a_key_of_another_version'" in result.stderr and "built-in defaults" in result.stderr
    assert {(r["stage"], r["state"]) for r in json.loads(result.stdout)} == {("detector", "missing"), ("train", "missing")}
    assert sorted((p.name, p.stat().st_mtime_ns) for p in work.iterdir()) == before


def test_a_command_without_a_config_keeps_the_settings_of_the_command_that_last_wrote_the_workdir(tmp_path):
    """After `aecfe demo` (its own small settings), `aecfe --workdir aecfe-demo predict ...` must reuse the
    demo's detector and model, not retrain both with the built-in defaults; ./aecfe.yaml and flags still win."""
    import yaml

    from conftest import run_cli

    work = tmp_path / "w"
    work.mkdir()
    (work / "config.yaml").write_text("train:\n  epochs: 7\nruntime:\n  seed: 3\n")
    for image in ("a/monocyte/1.png", "a/lymphocyte/2.png", "b/monocyte/3.png"):  # labelled, but unreadable
        (tmp_path / image).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / image).write_text("not an image")

    def settings_after_a_command(*flags):
        # The command passes its checks and saves its settings, then stops (exit 2) at the first stage: no
        # image can be read to train a detector on.
        result = run_cli("--workdir", "w", *flags, "evaluate", "--source", "a", "--target", "b", cwd=tmp_path)
        assert result.returncode == 2 and "no training images for the detector" in result.stderr, result.stderr
        saved = yaml.safe_load((work / "config.yaml").read_text())
        return saved["train"]["epochs"], saved["runtime"]["seed"]

    assert settings_after_a_command() == (7, 3)
    assert settings_after_a_command("--seed", "1") == (7, 1)
    (tmp_path / "aecfe.yaml").write_text("train:\n  epochs: 12\n")
    assert settings_after_a_command() == (12, 0)
