"""The command line as users and scripts meet it: help, version, exit codes, one-line errors."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_cli


def _one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


def test_help_lists_every_command_without_importing_torch():
    code = ("import sys; from typer.testing import CliRunner; from aecfe_cli.cli import app; "
            "r = CliRunner().invoke(app, ['--help']); print(r.output); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT).stdout
    for command in ("datasets", "synth", "detect", "train", "extract", "evaluate", "predict", "run", "demo", "status"):
        assert command in out
    assert out.strip().splitlines()[-1] == "False"


def test_version(tmp_path):
    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("aecfe ")


@pytest.mark.parametrize(
    "args, fragments",
    [
        (["datasets", "--data", "nope"], ["unknown dataset 'nope'"]),
        (["datasets", "--data", "macek"], ["did you mean 'matek'"]),
        (["datasets", "--data", "./missing_folder"], ["missing_folder", "no such file"]),
        (["datasets", "--data", "matek"], ["AECFE_MATEK_ROOT"]),
        (["synth", "--out", "x", "--domain", "lab_z"], ["unknown synthetic domain 'lab_z'"]),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(tmp_path, args, fragments):
    _one_line_error(run_cli(*args, cwd=tmp_path), *fragments)


def test_empty_folder(tmp_path):
    (tmp_path / "empty" / "monocyte").mkdir(parents=True)
    _one_line_error(run_cli("datasets", "--data", "empty", cwd=tmp_path), "empty", "holds no images")


def test_unknown_config_key(tmp_path):
    (tmp_path / "aecfe.yaml").write_text("train:\n  epoch: 3\n")
    _one_line_error(run_cli("datasets", cwd=tmp_path), "aecfe.yaml", "unknown key 'epoch'", "did you mean 'epochs'")


def test_wrong_type_in_config(tmp_path):
    (tmp_path / "c.yaml").write_text("detect:\n  min_size: big\n")
    _one_line_error(run_cli("--config", "c.yaml", "datasets", cwd=tmp_path), "c.yaml", "detect.min_size")


def test_corrupt_image_is_listed_and_strict_fails(tmp_path):
    folder = tmp_path / "set" / "monocyte"
    folder.mkdir(parents=True)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    from PIL import Image

    Image.new("RGB", (8, 8), (200, 100, 150)).save(folder / "good.png")
    result = run_cli("datasets", "--data", "set", cwd=tmp_path)
    assert result.returncode == 0
    assert "broken.png" in result.stdout and "1 unreadable" in result.stdout
    (tmp_path / "strict.yaml").write_text("runtime:\n  strict: true\n")
    _one_line_error(run_cli("--config", "strict.yaml", "datasets", "--data", "set", cwd=tmp_path), "unreadable")


def test_debug_shows_the_traceback(tmp_path):
    result = run_cli("--debug", "datasets", "--data", "nope", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_usage_error_is_exit_2(tmp_path):
    assert run_cli("evaluate", cwd=tmp_path).returncode == 2
    assert run_cli("no-such-command", cwd=tmp_path).returncode == 2


def test_acevedo_sample_counts_when_present(tmp_path):
    pbc = ROOT.parent / "shared" / "data" / "pbc" / "PBC_dataset_normal_DIB"
    if not pbc.is_dir():
        pytest.skip("shared PBC sample absent")
    result = run_cli("datasets", "--data", str(pbc), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "layout acevedo, 1200 images, 8 classes" in result.stdout.replace("\n", " ").replace("  ", " ")
    for subtype, count in (("PMY", 37), ("MY ", 59), ("MMY", 45), ("IG ", 9)):
        line = next(l for l in result.stdout.splitlines() if f" {subtype}" in l)
        assert str(count) in line
    totals = {line.split()[1]: line.split()[-2] for line in result.stdout.splitlines() if " total " in line}
    assert totals == {"ig": "150", "neutrophil": "150"}  # classes split into subtypes; the others have one row


@pytest.mark.slow
def test_detector_training_starts_from_imagenet_weights(tiny_project):
    import torch
    from torchvision.models import resnet18

    torch.save(resnet18(weights=None).state_dict(), tiny_project / "resnet18.pt")
    done = run_cli("detect", "--data", "lab_a", "--init-weights", "resnet18.pt", cwd=tiny_project)
    assert done.returncode == 0, done.stderr
    assert "starting from resnet18.pt (resnet18_fpn, 120 tensors loaded" in done.stderr
    manifest = json.loads((tiny_project / "aecfe-work" / "detector" / "manifest.json").read_text())
    assert manifest["obtained"]["initial_weights"]["backbone"] == "resnet18_fpn"
    _one_line_error(run_cli("detect", "--data", "lab_a", "--init-weights", "missing.pt", cwd=tiny_project),
                    "missing.pt: not found", "--init-weights")
