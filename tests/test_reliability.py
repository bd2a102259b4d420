"""Guarantees for long unattended runs on messy clinical folders (README: Reliability)."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from conftest import ROOT, TINY_CONFIG, copy_project, run_cli

pytestmark = pytest.mark.slow


def _project(tmp_path, tiny_cells, domains=("lab_a", "lab_b")):
    for domain in domains:
        shutil.copytree(tiny_cells[domain], tmp_path / domain)
    (tmp_path / "aecfe.yaml").write_text(TINY_CONFIG)
    return tmp_path


def _start(args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "aecfe_cli", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_when(process, condition, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return
        assert process.poll() is None, f"finished before the kill point: {process.communicate()}"
        time.sleep(0.02)
    process.kill()
    raise AssertionError("kill point never reached")


def _digests(folder, names):
    return {name: (folder / name).read_bytes() for name in names}


def test_bad_images_are_skipped_listed_and_strict_fails(tmp_path, finished_project):
    root = copy_project(finished_project[0], tmp_path)
    cls = root / "lab_a" / "monocyte"
    good = next(cls.iterdir())
    data = good.read_bytes()
    (cls / "truncated.png").write_bytes(data[: len(data) // 3])
    (cls / "zero.png").write_bytes(b"")
    (cls / "text.jpg").write_text("not an image")
    (cls / "loop.png").symlink_to(cls / "loop.png")
    rgb = np.asarray(Image.open(good).convert("RGB"))
    Image.fromarray((rgb[:, :, 0].astype(np.uint16) * 257)).save(cls / "grey16 é.tif")
    Image.fromarray(rgb[:, :, 1]).save(cls / "grey 8.tif")
    Image.fromarray(np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])).save(cls / "rgba ü.png")
    result = run_cli("detect", "--data", "lab_a", cwd=root)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((root / "aecfe-work/detect/lab_a/manifest.json").read_text())
    assert manifest["counts"]["unreadable"] == 3  # truncated, zero-byte, text; the symlink loop is skipped
    assert manifest["counts"]["images"] == 36 + 6
    assert any("loop.png" in s for s in manifest["skipped"])
    assert any("truncated.png" in u for u in manifest["unreadable"])
    images = {row.split(",")[1] for row in (root / "aecfe-work/detect/lab_a/instances.csv").read_text().splitlines()[1:]}
    assert {"monocyte/grey16 é.tif", "monocyte/grey 8.tif", "monocyte/rgba ü.png"} <= images
    strict = run_cli("detect", "--data", "lab_a", "--strict", "--force", cwd=root)
    assert strict.returncode == 2 and ("truncated.png" in strict.stderr or "text.jpg" in strict.stderr)
    assert len(strict.stderr.strip().splitlines()) >= 1 and "Traceback" not in strict.stderr


DETECT_FILES = ["instances.csv", "roi_features.npy", "crops.npy"]


def _copy_with_lab_a_reference(tmp_path, finished_project):
    """A copy of the finished project, whose lab_a detections are the reference: (root, detect folder of
    lab_a, the reference bytes of its files)."""
    root = copy_project(finished_project[0], tmp_path)
    folder = root / "aecfe-work/detect/lab_a"
    return root, folder, _digests(folder, DETECT_FILES)


@pytest.mark.parametrize("chunks_from_before_found_by", [False, True])
def test_killed_detection_resumes_to_the_same_result(tmp_path, finished_project, chunks_from_before_found_by):
    # With chunks_from_before_found_by, the finished chunks have rows without found_by, as an earlier version
    # wrote them; the fingerprint is unchanged, so an upgraded aecfe resumes from them, and every cell they
    # hold is the detector's.
    root, folder, reference = _copy_with_lab_a_reference(tmp_path, finished_project)
    shutil.rmtree(folder)
    process = _start(["detect", "--data", "lab_a"], root)
    _kill_when(process, lambda: len(list((folder / "parts").glob("part_*.json"))) >= 2 if (folder / "parts").is_dir() else False)
    assert not (folder / "manifest.json").exists()
    if chunks_from_before_found_by:
        for part in (folder / "parts").glob("part_*.json"):
            meta = json.loads(part.read_text())
            part.write_text(json.dumps({**meta, "rows": [row[:-1] for row in meta["rows"]]}))
    resumed = run_cli("detect", "--data", "lab_a", cwd=root)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert _digests(folder, DETECT_FILES) == reference
    assert not list(folder.glob(".*.tmp"))


def test_killed_training_resumes_to_the_same_weights(tmp_path, finished_project):
    root = copy_project(finished_project[0], tmp_path)
    (root / "aecfe.yaml").write_text(TINY_CONFIG.replace("epochs: 2", "epochs: 6"))
    # The reference continues the finished 2-epoch training to 6 epochs, as an uninterrupted run would end.
    assert run_cli("train", "--data", "lab_a", "--data", "lab_b", cwd=root).returncode == 0
    folder = root / "aecfe-work/train"
    reference = (folder / "model.pt").read_bytes()
    import torch

    def epoch_at_least(n):
        try:
            return torch.load(folder / "model.pt", weights_only=True)["epoch"] >= n
        except Exception:  # mid-rename or not there yet
            return False

    process = _start(["train", "--data", "lab_a", "--data", "lab_b", "--force"], root)
    time.sleep(0.5)
    _kill_when(process, lambda: not (folder / "manifest.json").exists() and epoch_at_least(2))
    assert not (folder / "manifest.json").exists()
    resumed = run_cli("train", "--data", "lab_a", "--data", "lab_b", "--resume", cwd=root)
    assert resumed.returncode == 0, resumed.stderr
    assert "continuing from epoch" in resumed.stderr
    assert torch.equal(torch.load(folder / "model.pt", weights_only=True)["state_dict"]["encoder.0.weight"],
                       torch.load(__import__("io").BytesIO(reference), weights_only=True)["state_dict"]["encoder.0.weight"])
    assert (folder / "model.pt").read_bytes() == reference


def test_crashed_extraction_leaves_nothing_finished_looking(tmp_path, finished_project):
    root = copy_project(finished_project[0], tmp_path)
    folder = root / "aecfe-work/extract/lab_a"
    reference = _digests(folder, ["features.npy", "features.csv"])
    process = _start(["extract", "--data", "lab_a", "--force"], root)
    _kill_when(process, lambda: not (folder / "manifest.json").exists())
    leftovers = [p for p in folder.iterdir() if p.name not in ("features.npy", "features.csv")]
    assert all(p.name.endswith(".tmp") for p in leftovers)
    status = json.loads(run_cli("status", "--json", cwd=root).stdout)
    assert {"stage": "extract", "dataset": "lab_a", "state": "missing", "changed": [], "detail": ""} in status
    assert run_cli("extract", "--data", "lab_a", cwd=root).returncode == 0
    assert _digests(folder, ["features.npy", "features.csv"]) == reference
    assert not list(folder.glob(".*.tmp"))


def test_second_command_on_a_busy_workdir_refuses(tmp_path, tiny_cells):
    root = _project(tmp_path, tiny_cells, domains=("lab_a",))
    (root / "aecfe-work").mkdir()
    with open(root / "aecfe-work" / ".lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        handle.write("aecfe pid 4242")
        handle.flush()
        result = run_cli("detect", "--data", "lab_a", cwd=root)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: aecfe-work: in use by aecfe pid 4242; wait for it to finish or use another --workdir"
    assert not (root / "aecfe-work" / "detector").exists()


def test_unwritable_workdir_and_failing_write_keep_earlier_artefacts(tmp_path, finished_project):
    root = copy_project(finished_project[0], tmp_path)
    (root / "file").write_text("")
    result = run_cli("--workdir", "file/work", "detect", "--data", "lab_a", cwd=root)
    assert result.returncode == 2 and "not writable" in result.stderr and len(result.stderr.splitlines()) == 1
    folder = root / "aecfe-work/detect/lab_a"
    before = _digests(folder, ["instances.csv", "roi_features.npy", "crops.npy", "manifest.json"])
    # A disk that fills up mid-run: every rename fails with ENOSPC.
    code = ("import errno, os, sys; real = os.replace\n"
            "def full(a, b): raise OSError(errno.ENOSPC, 'No space left on device', str(b))\n"
            "os.replace = full\nsys.argv = ['aecfe', 'detect', '--data', 'lab_a', '--force']\n"
            "from aecfe_cli.cli import main; main()")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    failed = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert failed.returncode == 1 and "No space left on device" in failed.stderr, failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    after = {name: (folder / name).read_bytes() for name in ["instances.csv", "roi_features.npy", "crops.npy"]}
    assert after == {k: v for k, v in before.items() if k != "manifest.json"}


def test_pickled_weights_are_refused_and_never_run(tmp_path, tiny_cells):
    root = _project(tmp_path, tiny_cells, domains=("lab_a",))
    marker = tmp_path / "payload-ran"
    code = ("import pickle, os\n"
            "class P:\n"
            f"    def __reduce__(self): return (os.system, ('touch {marker}',))\n"
            "import torch; torch.save({'state_dict': P()}, 'evil.pt')")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
    result = run_cli("detect", "--data", "lab_a", "--weights", "evil.pt", cwd=root)
    assert result.returncode == 2 and "evil.pt" in result.stderr and "Traceback" not in result.stderr
    assert not marker.exists()


def test_foreign_architecture_weights_name_what_differs(tmp_path, tiny_cells):
    root = _project(tmp_path, tiny_cells, domains=("lab_a",))
    code = ("import torch, torchvision\n"
            "m = torchvision.models.detection.maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=91)\n"
            "torch.save(m.state_dict(), 'coco.pt')")
    subprocess.run([sys.executable, "-c", code], cwd=root, check=True)
    result = run_cli("detect", "--data", "lab_a", "--weights", "coco.pt", cwd=root)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and "file has [91, 1024]" in errors[0]
    assert "Traceback" not in result.stderr


def test_dataset_problems_exit_2(tmp_path, tiny_cells):
    root = _project(tmp_path, tiny_cells)
    only = root / "only_monocytes"
    shutil.copytree(tiny_cells["lab_a"] / "monocyte", only / "monocyte")
    result = run_cli("run", "--data", "only_monocytes", "--data", "lab_b", cwd=root)
    assert result.returncode == 2 and "single class" in result.stderr, result.stderr
    # The images' labels rule it out before anything is detected or trained: no run is wasted.
    assert not (root / "aecfe-work" / "detector" / "manifest.json").exists()


def test_a_classifier_that_cannot_be_built_as_configured_exits_2_before_any_work(tmp_path, tiny_cells):
    root = _project(tmp_path, tiny_cells)
    result = run_cli("evaluate", "--source", "lab_a", "--target", "lab_b", "--classifier", "knn", cwd=root)
    assert result.returncode == 2 and "knn cannot weigh classes" in result.stderr, result.stderr
    assert "--class-weight none" in result.stderr
    result = run_cli("evaluate", "--source", "lab_a", "--target", "lab_b", "--class-weight", "balance", cwd=root)
    assert result.returncode == 2 and "did you mean 'balanced'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    result = run_cli("predict", "--source", "lab_a", "--data", "lab_b", "--trees", "0", cwd=root)
    assert result.returncode == 2 and "evaluate.trees is 0" in result.stderr and "--trees" in result.stderr
    assert not (root / "aecfe-work" / "detector" / "manifest.json").exists()
    # Nor is the refused setting saved for the next command in the workdir.
    assert not (root / "aecfe-work" / "config.yaml").exists()


@pytest.mark.parametrize("setting, message", [
    ("feature_norm: datset", "evaluate.feature_norm 'datset' (did you mean 'dataset'?)"),
    ("max_shift: -1", "evaluate.max_shift is -1"),
    ("self_training_sizes: sourcerange", "did you mean 'source_range'?"),
])
def test_a_misspelt_classifier_setting_in_the_config_fails_before_the_pipeline_starts(
        tmp_path, tiny_cells, setting, message):
    # These settings are first used by evaluate, after detection and training: a whole run would be lost.
    root = _project(tmp_path, tiny_cells)
    (root / "aecfe.yaml").write_text(TINY_CONFIG + f"  {setting}\n")
    result = run_cli("run", "--data", "lab_a", "--data", "lab_b", cwd=root)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert result.returncode == 2 and len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "aecfe-work" / "config.yaml").exists()
    assert not (root / "aecfe-work" / "detector").exists()


def test_a_refused_setting_is_not_handed_on_to_the_next_command_in_the_workdir(tmp_path, finished_project):
    root = copy_project(finished_project[0], tmp_path)
    (root / "aecfe.yaml").unlink()  # the commands take their settings from the workdir's config.yaml
    saved = root / "aecfe-work" / "config.yaml"
    before = saved.read_bytes()
    refused = [
        (("evaluate", "--source", "lab_a", "--target", "lab_b", "--classes", "monocyte,neutrophil"),
         "evaluate.classes names 'neutrophil'"),  # checked against the source's labels
        (("predict", "--source", "lab_a", "--data", "lab_b", "--classes", "monocyte,neutrophil"),
         "evaluate.classes names 'neutrophil'"),
        (("predict", "--source", "lab_a", "--data", "lab_b", "--format", "xml"), "predict.format 'xml'"),
        (("train", "--data", "lab_a", "--data", "lab_b", "--image-size", "48"), "train.image_size '48'"),
    ]
    for command, message in refused:
        result = run_cli(*command, cwd=root)
        assert result.returncode == 2 and message in result.stderr, (command, result.stderr)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # the flag's error, no word on the file
        assert saved.read_bytes() == before, command
    # So the next command without those flags runs with the run's own settings: every stage is reused.
    result = run_cli("evaluate", "--source", "lab_a", "--target", "lab_b", cwd=root)
    assert result.returncode == 0 and "up to date, reusing" in result.stderr, result.stderr
    assert "detecting" not in result.stderr and "training" not in result.stderr


def test_evaluating_datasets_that_share_no_class_exits_2_without_detecting(tmp_path, finished_project, tiny_cells):
    root = copy_project(finished_project[0], tmp_path)
    only = root / "only_monocytes"
    shutil.copytree(tiny_cells["lab_a"] / "monocyte", only / "monocyte")
    other = root / "other_classes"
    shutil.copytree(tiny_cells["lab_b"] / "basophil", other / "basophil")
    shutil.copytree(tiny_cells["lab_b"] / "eosinophil", other / "eosinophil")
    result = run_cli("evaluate", "--source", "lab_a", "--target", "other_classes", cwd=root)
    assert result.returncode == 0, result.stderr  # shared classes: basophil, eosinophil
    shutil.rmtree(other / "basophil")
    shutil.rmtree(other / "eosinophil")
    shutil.copytree(tiny_cells["lab_b"] / "basophil", other / "platelet")
    result = run_cli("evaluate", "--source", "only_monocytes", "--target", "other_classes", cwd=root)
    assert result.returncode == 2 and "single class" in result.stderr, result.stderr
    result = run_cli("evaluate", "--source", "lab_a", "--target", "other_classes", cwd=root)
    assert result.returncode == 2 and "share no class" in result.stderr, result.stderr
    assert "detecting" not in result.stderr and "training" not in result.stderr  # other_classes changed: it was not re-detected
    result = run_cli("--config", "nope.yaml", "status", cwd=root)
    assert result.returncode == 2 and "nope.yaml" in result.stderr


def test_concurrent_shards_merge_to_the_plain_result(tmp_path, finished_project):
    root, folder, reference = _copy_with_lab_a_reference(tmp_path, finished_project)
    shutil.rmtree(folder)
    workers = [_start(["detect", "--data", "lab_a", "--shard", f"{i}/2"], root) for i in range(2)]
    outcomes = [worker.communicate(timeout=300) for worker in workers]
    assert [w.returncode for w in workers] == [0, 0], outcomes
    assert not (folder / "manifest.json").exists()
    assert len(list((folder / "parts").glob("part_*.json"))) == 5  # 36 images in chunks of 8
    merged = run_cli("detect", "--data", "lab_a", cwd=root)
    assert merged.returncode == 0, merged.stderr
    assert "resuming, 5 of 5 chunks already done" in merged.stderr
    assert _digests(folder, DETECT_FILES) == reference
