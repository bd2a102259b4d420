"""Self-supervised pretraining of the detector's backbone on the user's own cells."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aecfe_cli import annotations, synth
from aecfe_cli import backbone_pretraining as pretraining
from aecfe_cli import detector as net
from aecfe_cli.errors import StageError, UserError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    root = tmp_path_factory.mktemp("fields")
    synth.write_field_dataset(root, "lab_a", 5, seed=0, size=(160, 120))
    return annotations.read_coco(root / "annotations.json")


def test_contrastive_loss_is_low_when_each_view_finds_its_partner_and_high_when_it_cannot():
    generator = torch.Generator().manual_seed(0)
    cells = torch.randn(8, 16, generator=generator)
    paired = cells.repeat_interleave(2, dim=0) + 0.01 * torch.randn(16, 16, generator=generator)
    unpaired = torch.randn(16, 16, generator=generator)
    assert pretraining.contrastive_loss(paired).item() < 0.3
    assert pretraining.contrastive_loss(unpaired).item() > 1.5  # about ln(15) when nothing matches
    # Partners are rows 2k and 2k+1: the same rows paired otherwise are not partners.
    assert pretraining.contrastive_loss(cells.repeat(2, 1)).item() > 1.5
    with pytest.raises(StageError, match="pairs"):
        pretraining.contrastive_loss(paired[:5])


def test_cell_windows_cut_one_square_per_box_and_views_are_seeded_jittered_squares(samples):
    windows = pretraining.cell_windows(samples, "none")
    assert len(windows) == sum(len(s.boxes) for s in samples)
    assert all(w.shape == (pretraining.WINDOW_SIZE, pretraining.WINDOW_SIZE, 3) and w.dtype == np.uint8 for w in windows)
    first = pretraining.augmented_view(windows[0], np.random.default_rng(1))
    assert first.shape == (3, pretraining.VIEW_SIZE, pretraining.VIEW_SIZE) and first.dtype == torch.float32
    assert 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, pretraining.augmented_view(windows[0], np.random.default_rng(1)))
    assert not torch.equal(first, pretraining.augmented_view(windows[0], np.random.default_rng(2)))


def test_pretraining_changes_the_trunk_only_and_reports_its_losses(samples):
    torch.manual_seed(0)
    model = net.build_detector("resnet18_fpn", min_size=96, max_size=128)
    body_before = {k: v.clone() for k, v in model.backbone.body.state_dict().items()}
    fpn_before = {k: v.clone() for k, v in model.backbone.fpn.state_dict().items()}
    calls = []
    summary = pretraining.pretrain_backbone(model.backbone.body, samples, steps=3, batch_size=4, device="cpu", seed=0,
                                            on_step=lambda step, total, loss: calls.append((step, total, loss)))
    assert [c[:2] for c in calls] == [(1, 3), (2, 3), (3, 3)] and all(np.isfinite(c[2]) for c in calls)
    assert summary["steps"] == 3 and summary["cells"] == sum(len(s.boxes) for s in samples) and summary["batch_size"] == 4
    after = model.backbone.body.state_dict()
    assert any(not torch.equal(body_before[k], after[k]) for k in body_before)
    assert all(torch.equal(fpn_before[k], v) for k, v in model.backbone.fpn.state_dict().items())
    with pytest.raises(UserError, match="at least 2"):
        pretraining.pretrain_backbone(model.backbone.body, samples, steps=1, batch_size=1, device="cpu", seed=0)
