"""Tests of the AE-CFE autoencoder module: shapes, loss parts, batching, training, checkpoints, DDP."""

from __future__ import annotations

import math
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset

from aecfe_cli.autoencoder import (
    AECFE,
    NonFiniteLoss,
    aecfe_loss,
    alignment_distance,
    build_model,
    count_flops,
    dihedral,
    feature_r2,
    load_checkpoint,
    prepare_batch,
    random_orientations,
    save_checkpoint,
    scale_features,
    ssim,
    train_one_epoch,
    view_consistency,
)
from aecfe_cli.errors import StageError, UserError
from aecfe_cli.sampling import DomainBalancedBatchSampler
from aecfe_cli.precision import autocast_dtype, place
from conftest import CreatesMarkerWhenUnpickled

TINY = {"width": 0.25, "image_size": 32}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and when other processes load the CPU two
    busy-waiting OpenMP threads make these tests up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(seed: int = 0) -> AECFE:
    torch.manual_seed(seed)
    return AECFE(**TINY)


def random_cells(count: int, crop_size: int = 48, seed: int = 0, domains: int = 2):
    """Float16 features, uint8 crops and domain ids shaped like the stored detect-stage output."""
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(count, 256, 14, 14, generator=generator).half()
    crops = torch.randint(0, 256, (count, 3, crop_size, crop_size), generator=generator, dtype=torch.uint8)
    domain_ids = torch.arange(count) % domains
    return features, crops, domain_ids


@pytest.mark.parametrize("image_size", [32, 64, 128])
def test_output_shapes(image_size):
    model = AECFE(width=0.25, image_size=image_size)
    z, feature_recon, image_recon = model(torch.randn(2, 256, 14, 14))
    assert z.shape == (2, 50)
    assert feature_recon.shape == (2, 256, 14, 14)
    assert image_recon.shape == (2, 3, image_size, image_size)
    assert z.abs().max() <= 1 and feature_recon.abs().max() <= 1  # Tanh outputs
    assert 0 <= image_recon.min() and image_recon.max() <= 1  # Sigmoid output


def test_paper_settings_have_about_four_million_parameters():
    model = AECFE()
    parameters = sum(p.numel() for p in model.parameters())
    assert 3.8e6 < parameters < 4.2e6, parameters
    assert model.model_args == {"in_channels": 256, "latent_dim": 50, "image_size": 128, "width": 1.0,
                                "feature_scaling": "sample", "norm_first": False, "image_bottleneck": 0,
                                "dihedral": False}
    # The method notes about 5.5 GFLOP per sample for the image decoder at 128x128.
    assert count_flops(model)["image_decoder"] == pytest.approx(5.5e9, rel=0.02)


def test_image_bottleneck_cuts_the_image_decoder_and_keeps_shapes(tmp_path):
    """The 1x1 reduction before the first upsampling layer is what makes the default cheap to train;
    its model rebuilds from the checkpoint like any other."""
    plain = AECFE(width=0.5, image_size=32)
    squeezed = AECFE(width=0.5, image_size=32, image_bottleneck=64)
    assert count_flops(squeezed)["image_decoder"] < 0.45 * count_flops(plain)["image_decoder"]
    assert count_flops(squeezed)["encoder"] == count_flops(plain)["encoder"]
    z, feature_recon, image_recon = squeezed(torch.randn(2, 256, 14, 14))
    assert (z.shape, feature_recon.shape, image_recon.shape) == ((2, 50), (2, 256, 14, 14), (2, 3, 32, 32))
    save_checkpoint(tmp_path / "model.pt", squeezed, None, 1, {})
    rebuilt = build_model(load_checkpoint(tmp_path / "model.pt", "cpu")).eval()
    features = torch.randn(3, 256, 14, 14)
    assert torch.equal(rebuilt(features)[2], squeezed.eval()(features)[2])
    with pytest.raises(UserError, match="image_bottleneck"):
        AECFE(image_bottleneck=-1)


def test_bfloat16_training_runs_the_forward_in_bfloat16_and_keeps_float32_weights(monkeypatch):
    assert autocast_dtype("fp32", "cpu") is None
    assert autocast_dtype("bf16", "cpu") is torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert autocast_dtype("auto", "cpu") is None  # emulated bfloat16 would be slower than float32
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert autocast_dtype("auto", "cpu") is torch.bfloat16
    with pytest.raises(UserError, match="precision"):
        autocast_dtype("fp16", "cpu")

    model = tiny_model()
    seen = []
    model.image_decoder.register_forward_hook(lambda module, inputs, output: seen.append(output.dtype))
    features, crops, domains = random_cells(16)
    loader = DataLoader(TensorDataset(features, crops, domains),
                        batch_sampler=DomainBalancedBatchSampler(domains.tolist(), batch_size=8, seed=0))
    before = [p.detach().clone() for p in model.parameters()]
    means = train_one_epoch(model, loader, torch.optim.Adam(model.parameters()), "cpu", 5.0, 32,
                            autocast_dtype=torch.bfloat16)
    assert seen == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(value == value and 0 <= value < 10 for value in means.values())


def test_count_flops_matches_torch_flop_counter():
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model()
    with FlopCounterMode(display=False) as counter:
        model(torch.randn(3, 256, 14, 14))
    flops = count_flops(model, batch=3)
    assert flops["total"] == counter.get_total_flops()
    assert flops["total"] == flops["encoder"] + flops["feature_decoder"] + flops["image_decoder"]


def test_bad_constructor_arguments_and_feature_shape_are_user_errors():
    with pytest.raises(UserError, match="image_size"):
        AECFE(image_size=96)
    with pytest.raises(UserError, match="width"):
        AECFE(width=0)
    with pytest.raises(UserError, match=r"\(256, 14, 14\)"):
        tiny_model().encode(torch.randn(2, 256, 7, 7))


def test_scale_features_range_and_constant_input():
    x = torch.randn(4, 256, 14, 14) * 7 + 3
    x[2] = 5.0  # a constant sample must not divide by zero
    scaled = scale_features(x)
    for i in (0, 1, 3):
        assert scaled[i].min().item() == pytest.approx(-1)
        assert scaled[i].max().item() == pytest.approx(1)
    assert torch.equal(scaled[2], torch.zeros_like(scaled[2]))
    # The map is monotone: sorting by the input leaves the scaled values sorted.
    assert (scaled[0].flatten()[x[0].flatten().argsort()].diff() >= 0).all()


def test_prepare_batch_widens_and_resizes_with_area_interpolation():
    features, crops, _ = random_cells(2, crop_size=64)
    scaled, images = prepare_batch(features, crops, 32, "cpu")
    assert scaled.dtype == torch.float32 and images.dtype == torch.float32
    assert images.shape == (2, 3, 32, 32)
    expected = crops.float().div(255).reshape(2, 3, 32, 2, 32, 2).mean(dim=(3, 5))  # 2x2 block average
    assert torch.allclose(images, expected, atol=1e-6)
    with pytest.raises(UserError):
        prepare_batch(features, crops[:1], 32, "cpu")


def test_channel_scaling_is_fitted_on_training_cells_and_travels_with_the_checkpoint(tmp_path):
    """Per-channel standardisation keeps activation strength (per-sample min-max would map a cell and
    the same cell at half strength to one input) and extraction scales exactly as training did."""
    torch.manual_seed(0)
    cells = torch.randn(40, 256, 14, 14) * torch.linspace(0.1, 5, 256).view(1, -1, 1, 1) + 3
    model = AECFE(**TINY, feature_scaling="channel")
    model.fit_feature_scaling([cells[:25], cells[25:]])
    scaled = model.scale(cells)
    assert scaled.mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(scaled.std(dim=(0, 2, 3), unbiased=False), torch.ones(256), atol=1e-3)
    assert not torch.allclose(model.scale(cells[:1] / 2), model.scale(cells[:1]))
    assert torch.allclose(scale_features(cells[:1] / 2), scale_features(cells[:1]), atol=1e-6)
    save_checkpoint(tmp_path / "model.pt", model, None, 1, {})
    restored = build_model(load_checkpoint(tmp_path / "model.pt", "cpu"))
    assert torch.equal(restored.scale(cells), scaled)
    with pytest.raises(UserError, match="feature_scaling 'minmax'"):
        AECFE(**TINY, feature_scaling="minmax")


class _Constant(torch.nn.Module):
    """A feature decoder that ignores its latent: every cell gets one fixed feature map."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.value.expand(len(z), *self.value.shape)


def test_feature_r2_is_one_for_an_exact_reconstruction_and_zero_for_the_mean_cell():
    """The number a user reads to see whether the feature term learnt anything: 1 for a perfect
    reconstruction, 0 for a latent that carries nothing (every cell decoded to the mean cell), in the
    scaled space the loss uses, and the same whether the cells come in one batch or several."""
    torch.manual_seed(0)
    cells = torch.randn(30, 256, 14, 14) * 2 + 1
    model = AECFE(**TINY, feature_scaling="channel")
    model.fit_feature_scaling([cells])
    model.encoder = torch.nn.Flatten()
    model.feature_decoder = torch.nn.Unflatten(1, (256, 14, 14))
    assert feature_r2(model, [cells[:7], cells[7:]], "cpu") == pytest.approx(1.0, abs=1e-6)
    model.feature_decoder = _Constant(model.scale(cells).mean(dim=0))
    assert feature_r2(model, [cells], "cpu") == pytest.approx(0.0, abs=1e-5)
    assert feature_r2(model, [cells[:13], cells[13:]], "cpu") == pytest.approx(0.0, abs=1e-5)
    model.feature_decoder = _Constant(model.scale(cells).mean(dim=0) + 0.5)  # worse than the mean
    assert feature_r2(model, [cells], "cpu") < -0.1
    assert model.training  # left as it was found
    assert math.isnan(feature_r2(model, [cells[:1]], "cpu"))  # undefined for one cell, and no error


def test_padded_ssim_scores_the_border_that_valid_windows_ignore():
    image = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    damaged = image.clone()
    damaged[..., :3, :] = 0.5  # only the top three rows differ
    assert ssim(image, damaged).item() > ssim(image, damaged, padded=True).item() + 0.02


def test_normalised_alignment_cannot_be_lowered_by_shrinking_the_latent():
    torch.manual_seed(0)
    z = torch.cat([torch.randn(16, 8), torch.randn(16, 8) + 1.5])
    domains = torch.arange(32) // 16
    features, images = torch.zeros(32, 1), torch.rand(32, 3, 16, 16)

    def align(scale: float, alignment: str) -> float:
        outputs = (z * scale, features, images)
        return aecfe_loss(outputs, features, images, domains, image_loss="ssim", alignment=alignment)["align"].item()

    assert align(0.05, "paper") < 0.01 * align(1.0, "paper")
    assert align(0.05, "normalised") == pytest.approx(align(1.0, "normalised"), rel=1e-3)


def test_ssim_is_one_for_identical_images_and_falls_with_noise():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(4, 3, 32, 32, generator=generator)
    assert ssim(images, images).item() == pytest.approx(1.0, abs=1e-5)
    scores = [
        ssim(images, (images + level * torch.randn(images.shape, generator=generator)).clamp(0, 1)).item()
        for level in (0.02, 0.1, 0.3)
    ]
    assert 1 > scores[0] > scores[1] > scores[2]
    with pytest.raises(ValueError, match="odd"):
        ssim(images, images, window=10)


def test_alignment_distance_small_for_one_distribution_positive_for_shifted_domains():
    generator = torch.Generator().manual_seed(0)
    same_a = torch.tanh(torch.randn(400, 50, generator=generator) * 0.5)
    same_b = torch.tanh(torch.randn(400, 50, generator=generator) * 0.5)
    shifted = torch.tanh(torch.randn(400, 50, generator=generator) * 0.5 + 0.5)
    near = alignment_distance(same_a, same_b).item()
    far = alignment_distance(same_a, shifted).item()
    assert near < 0.01
    assert far > 10 * near and far > 0.05
    # The covariance term alone: same mean, one domain's variance concentrated on a few dimensions.
    concentrated = same_b.clone()
    concentrated[:, :5] *= 4
    concentrated -= concentrated.mean(0) - same_b.mean(0)
    assert alignment_distance(same_a, concentrated).item() > 10 * near


def test_loss_terms_and_single_domain_alignment():
    model = tiny_model()
    features, crops, _ = random_cells(8)
    features, images = prepare_batch(features, crops, 32, "cpu")
    one_domain = aecfe_loss(model(features), features, images, torch.zeros(8, dtype=torch.long))
    assert set(one_domain) == {"feature", "image", "align", "views", "total"}
    assert one_domain["views"].item() == 0  # no views given
    assert one_domain["align"].item() == 0
    assert one_domain["total"].item() == pytest.approx(one_domain["feature"].item() + one_domain["image"].item())
    two = aecfe_loss(model(features), features, images, torch.arange(8) % 2, align_weight=5.0)
    assert two["align"].item() > 0
    expected = two["feature"] + two["image"] + 5.0 * two["align"]
    assert two["total"].item() == pytest.approx(expected.item())
    with pytest.raises(StageError, match="anchor"):
        aecfe_loss(model(features), features, images, torch.arange(8) % 2 + 1)


def test_loss_falls_on_a_fixed_batch():
    model = tiny_model()
    features, crops, domains = random_cells(8)
    features, images = prepare_batch(features, crops, 32, "cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    totals = []
    for _ in range(30):
        optimizer.zero_grad()
        terms = aecfe_loss(model(features), features, images, domains)
        terms["total"].backward()
        optimizer.step()
        totals.append(terms["total"].item())
    assert totals[-1] < 0.8 * totals[0], totals


def test_train_one_epoch_reports_means_and_progress():
    model = tiny_model()
    features, crops, domains = random_cells(24)
    sampler = DomainBalancedBatchSampler(domains.tolist(), batch_size=8, seed=0)
    loader = DataLoader(TensorDataset(features, crops, domains), batch_sampler=sampler)
    seen = []
    means = train_one_epoch(
        model, loader, torch.optim.Adam(model.parameters()), "cpu", 5.0, 32, on_batch=lambda terms, n: seen.append((terms, n))
    )
    assert [n for _, n in seen] == [8, 8, 8]
    assert means["total"] == pytest.approx(sum(t["total"] for t, _ in seen) / 3)
    with pytest.raises(UserError, match="image_size"):
        train_one_epoch(model, loader, torch.optim.Adam(model.parameters()), "cpu", 5.0, 64)


def test_dihedral_elements_are_the_eight_symmetries_of_the_square():
    square = torch.arange(16.0).reshape(1, 1, 4, 4)
    turned = [dihedral(square, element) for element in range(8)]
    assert torch.equal(turned[0], square)
    assert len({tuple(t.flatten().tolist()) for t in turned}) == 8
    # Every element maps the square onto itself: the corners stay corners, the centre stays inside.
    assert all(sorted(t[0, 0, [0, 0, 3, 3], [0, 3, 0, 3]].tolist()) == [0, 3, 12, 15] for t in turned)


def test_random_orientations_turn_each_cells_feature_and_image_alike():
    """A cell's image target must lie as its feature does, or the image decoder learns a blur of all 8."""
    features = torch.randn(64, 2, 14, 14)
    images = torch.nn.functional.interpolate(features, size=(28, 28), mode="nearest")  # the same picture, larger
    turned_features, turned_images = random_orientations((features, images), torch.Generator().manual_seed(0))
    assert torch.equal(torch.nn.functional.interpolate(turned_features, size=(28, 28), mode="nearest"), turned_images)
    unchanged = [bool(torch.equal(a, b)) for a, b in zip(turned_features, features)]
    assert 0 < sum(unchanged) < 64  # about an eighth keep the identity
    again = random_orientations((features, images), torch.Generator().manual_seed(0))
    assert torch.equal(again[0], turned_features)  # one seed, one draw: a resumed epoch turns the same cells


def test_dihedral_model_extracts_the_same_latent_however_the_cell_lies(tmp_path):
    model = AECFE(**{**TINY, "dihedral": True}).eval()
    features = torch.randn(3, 256, 14, 14)
    with torch.no_grad():
        latents = [model.embed(dihedral(features, element)) for element in range(8)]
        plain = tiny_model().eval()
        assert not torch.allclose(plain.embed(features), plain.embed(dihedral(features, 1)), atol=1e-4)
    assert all(torch.allclose(latent, latents[0], atol=1e-5) for latent in latents)
    save_checkpoint(tmp_path / "model.pt", model, None, 1, {})
    rebuilt = build_model(load_checkpoint(tmp_path / "model.pt", "cpu")).eval()
    assert rebuilt.model_args["dihedral"] is True
    with torch.no_grad():
        assert torch.equal(rebuilt.embed(features), model.embed(features))


def test_train_one_epoch_with_orientations_is_reproducible_from_its_generator():
    features, crops, domains = random_cells(16)

    def trained(orientations):
        model = tiny_model()
        sampler = DomainBalancedBatchSampler(domains.tolist(), batch_size=8, seed=0)
        loader = DataLoader(TensorDataset(features, crops, domains), batch_sampler=sampler)
        train_one_epoch(model, loader, torch.optim.Adam(model.parameters()), "cpu", 0.0, 32, orientations=orientations)
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    first = trained(torch.Generator().manual_seed(3))
    assert torch.equal(first, trained(torch.Generator().manual_seed(3)))
    assert not torch.equal(first, trained(None))


def test_view_consistency_is_low_when_views_find_their_cells_and_chance_when_the_latent_collapses():
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(16, 50, generator=generator)
    own = view_consistency(z, z.repeat_interleave(2, dim=0) + 0.1 * torch.randn(32, 50, generator=generator)).item()
    assert own < 0.05
    # One latent for every cell, the collapse a plain distance rewards: chance (1), not zero.
    collapsed = torch.ones(16, 50)
    assert view_consistency(collapsed, collapsed.repeat_interleave(2, dim=0)).item() == pytest.approx(1.0, abs=1e-5)
    # Shrinking every latent changes nothing (cosine similarity).
    views = z.repeat_interleave(2, dim=0) + 0.8 * torch.randn(32, 50, generator=generator)
    assert view_consistency(0.1 * z, 0.1 * views).item() == pytest.approx(view_consistency(z, views).item(), rel=1e-4)
    # Each view must find its own cell: cell-major order matters.
    assert view_consistency(z, z.repeat(2, 1)).item() > 0.5
    with pytest.raises(StageError, match="views per cell"):
        view_consistency(z, views[:5])


def test_views_are_encoded_with_the_cells_and_pull_only_their_own_latents():
    model = tiny_model()
    features, crops, domains = random_cells(8)
    features, images = prepare_batch(features, crops, 32, "cpu")
    views = features.repeat_interleave(2, dim=0) + 0.5 * torch.randn(16, 256, 14, 14)
    outputs = model(features, views)
    assert len(outputs) == 4 and outputs[3].shape == (16, 50)
    assert torch.allclose(outputs[0], model(features)[0], atol=1e-5)  # the cells' latents do not see the views
    assert torch.allclose(outputs[3], model.encode(views), atol=1e-5)
    terms = aecfe_loss(outputs, features, images, domains, view_weight=2.0)
    assert terms["views"].item() > 0
    expected = terms["feature"] + terms["image"] + 5.0 * terms["align"] + 2.0 * terms["views"]
    assert terms["total"].item() == pytest.approx(expected.item(), rel=1e-5)
    # Views identical to their cells find them better than noisy ones.
    same = aecfe_loss(model(features, features.repeat_interleave(2, dim=0)), features, images, domains)["views"].item()
    assert same < terms["views"].item()


def test_train_one_epoch_trains_views_towards_their_cells():
    model = tiny_model()
    features, crops, domains = random_cells(24)
    views = (features.float().unsqueeze(1) + 2.0 * torch.randn(24, 1, 256, 14, 14)).half()
    sampler = DomainBalancedBatchSampler(domains.tolist(), batch_size=8, seed=0)
    loader = DataLoader(TensorDataset(features, crops, domains, views), batch_sampler=sampler)
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    first = train_one_epoch(model, loader, optimizer, "cpu", 5.0, 32, view_weight=10.0)
    for _ in range(8):
        last = train_one_epoch(model, loader, optimizer, "cpu", 5.0, 32, view_weight=10.0)
    assert first["views"] > 0.9 and last["views"] < 0.7 * first["views"], (first, last)  # 1 is chance


def test_sampler_every_batch_holds_every_domain_with_equal_shares():
    domains = [0] * 50 + [1] * 12 + [2] * 5
    sampler = DomainBalancedBatchSampler(domains, batch_size=9, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 17  # ceil(50 / 3): the largest domain is shown once
    for batch in batches:
        assert sorted(domains[i] for i in batch) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    shown = [i for batch in batches for i in batch]
    assert {i for i in shown if domains[i] == 0} == set(range(50))
    with pytest.raises(UserError, match="domains"):
        DomainBalancedBatchSampler(domains, batch_size=2, seed=0)


def test_sampler_is_deterministic_per_seed_and_epoch():
    domains = [0] * 40 + [1] * 30

    def batches(seed, epoch):
        sampler = DomainBalancedBatchSampler(domains, batch_size=10, seed=seed)
        sampler.set_epoch(epoch)
        return list(sampler)

    assert batches(0, 0) == batches(0, 0)
    assert batches(0, 0) != batches(0, 1)
    assert batches(0, 0) != batches(1, 0)


def test_sampler_ranks_are_disjoint_and_equally_long():
    domains = [0] * 41 + [1] * 20
    shards = [list(DomainBalancedBatchSampler(domains, batch_size=6, seed=3, rank=r, world_size=2)) for r in (0, 1)]
    assert len(shards[0]) == len(shards[1]) > 0
    assert all(len(b0) == len(b1) for b0, b1 in zip(*shards))
    indices = [{i for batch in shard for i in batch} for shard in shards]
    assert not indices[0] & indices[1]
    assert len(indices[0] | indices[1]) >= 60  # only the odd remainder of the 41 sits out


def test_sampler_single_domain_is_plain_shuffled_batching():
    sampler = DomainBalancedBatchSampler([0] * 10, batch_size=4, seed=0)
    batches = list(sampler)
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(i for b in batches for i in b) == list(range(10))
    assert [i for b in batches for i in b] != list(range(10))
    assert len(DomainBalancedBatchSampler([0] * 10, batch_size=4, seed=0, drop_last=True)) == 2


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_model()
    optimizer = torch.optim.Adam(model.parameters())
    features, crops, domains = random_cells(8)
    features, images = prepare_batch(features, crops, 32, "cpu")
    aecfe_loss(model(features), features, images, domains)["total"].backward()
    optimizer.step()
    path = tmp_path / "model.pt"
    save_checkpoint(path, model, optimizer, epoch=3, extra={"datasets": ["matek", "acevedo"], "loss": 0.5})
    checkpoint = load_checkpoint(path, "cpu")
    assert checkpoint["epoch"] == 3 and checkpoint["extra"]["datasets"] == ["matek", "acevedo"]
    rebuilt = build_model(checkpoint, expected={"in_channels": 256, "latent_dim": 50})
    model.eval()
    rebuilt.eval()
    with torch.no_grad():
        for original, restored in zip(model(features), rebuilt(features)):
            assert torch.equal(original, restored)
    fresh = torch.optim.Adam(rebuilt.parameters())
    fresh.load_state_dict(checkpoint["optimizer"])
    assert fresh.state_dict()["state"][0]["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))  # the atomic write left no temporary file


def test_channels_last_training_computes_what_the_plain_layout_does_and_saves_plain_weights(tmp_path):
    """`aecfe train` keeps the weights channels-last on a CPU for speed: the model must compute the same
    outputs and gradients, and its checkpoint must rebuild into an ordinary model with the same outputs."""
    plain = tiny_model()
    placed = place(tiny_model(), "cpu")
    placed.load_state_dict(plain.state_dict())
    assert placed.image_decoder[3].weight.is_contiguous(memory_format=torch.channels_last)
    features, crops, domains = random_cells(8)
    features, images = prepare_batch(features, crops, 32, "cpu")
    for model in (plain, placed):
        aecfe_loss(model(features), features, images, domains)["total"].backward()
    for (name, a), b in zip(plain.named_parameters(), placed.parameters()):
        # Float sums in another order: equal up to rounding, relative to the gradient's size.
        assert (a.grad - b.grad).norm() <= 1e-4 * a.grad.norm(), name
    save_checkpoint(tmp_path / "model.pt", placed, torch.optim.Adam(placed.parameters()), epoch=1, extra={})
    rebuilt = build_model(load_checkpoint(tmp_path / "model.pt", "cpu")).eval()
    with torch.no_grad():
        for expected, got in zip(plain.eval()(features), rebuilt(features)):
            assert (expected - got).norm() <= 1e-5 * expected.norm()


def test_load_checkpoint_refuses_pickled_code(tmp_path):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"format": "aecfe-autoencoder/1", "payload": CreatesMarkerWhenUnpickled(marker)}, path)
    assert not marker.exists()
    with pytest.raises(UserError, match="not an aecfe autoencoder checkpoint"):
        load_checkpoint(path, "cpu")
    assert not marker.exists()


def test_load_checkpoint_refuses_other_files(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint")
    plain_pickle = tmp_path / "plain.pt"
    plain_pickle.write_bytes(pickle.dumps({"a": 1}, protocol=2))
    other_weights = tmp_path / "other.pt"
    torch.save({"conv.weight": torch.zeros(2)}, other_weights)
    for path in (text, plain_pickle, other_weights, tmp_path / "missing.pt"):
        with pytest.raises(UserError, match=str(path.name)):
            load_checkpoint(path, "cpu")


def test_build_model_names_differing_and_mismatched_keys(tmp_path):
    path = tmp_path / "model.pt"
    save_checkpoint(path, tiny_model(), None, epoch=0, extra={})
    checkpoint = load_checkpoint(path, "cpu")
    with pytest.raises(UserError, match=r"latent_dim: checkpoint has 50, expected 32"):
        build_model(checkpoint, expected={"in_channels": 256, "latent_dim": 32})
    checkpoint["state_dict"]["encoder.0.weight"] = torch.zeros(1)
    del checkpoint["state_dict"]["encoder.0.bias"]
    checkpoint["state_dict"]["stray"] = torch.zeros(1)
    with pytest.raises(UserError) as raised:
        build_model(checkpoint)
    message = str(raised.value)
    assert "missing encoder.0.bias" in message and "unexpected stray" in message and "encoder.0.weight has shape" in message


def test_non_finite_features_raise_before_the_step_and_keep_weights():
    model = tiny_model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    features, crops, domains = random_cells(16)
    features[9, 0, 0, 0] = float("nan")  # in the second batch of 8
    loader = DataLoader(TensorDataset(features, crops, domains), batch_size=8)
    with pytest.raises(NonFiniteLoss) as raised:
        train_one_epoch(model, loader, torch.optim.Adam(model.parameters()), "cpu", 5.0, 32)
    assert raised.value.batch_index == 1
    assert "batch 1" in str(raised.value)
    # The first batch did step, so compare against a model trained on that batch alone.
    reference = tiny_model()
    train_one_epoch(
        reference,
        DataLoader(TensorDataset(features[:8], crops[:8], domains[:8]), batch_size=8),
        torch.optim.Adam(reference.parameters()),
        "cpu",
        5.0,
        32,
    )
    for name, tensor in model.state_dict().items():
        assert torch.isfinite(tensor).all(), name
        assert torch.equal(tensor, reference.state_dict()[name]), name
    assert any(not torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def _ddp_worker(rank: int, world_size: int, store_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=world_size)
    try:
        model = torch.nn.parallel.DistributedDataParallel(tiny_model(seed=0))
        features, crops, domains = random_cells(48, crop_size=32)
        sampler = DomainBalancedBatchSampler(domains.tolist(), batch_size=8, seed=0, rank=rank, world_size=world_size)
        loader = DataLoader(TensorDataset(features, crops, domains), batch_sampler=sampler)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        means = train_one_epoch(model, loader, optimizer, "cpu", 5.0, 32)
        torch.save({"state": model.module.state_dict(), "means": means}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_end_with_identical_weights(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    initial = tiny_model(seed=0).state_dict()
    for name, tensor in results[0]["state"].items():
        assert torch.equal(tensor, results[1]["state"][name]), name
    assert any(not torch.equal(initial[name], tensor) for name, tensor in results[0]["state"].items())
    assert results[0]["means"] == results[1]["means"]  # the epoch means are reduced over both ranks
