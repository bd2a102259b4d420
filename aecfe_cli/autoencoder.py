"""The AE-CFE autoencoder: model, loss, one training epoch, checkpoints (batching: ``sampling``).

Architecture, loss and optimiser follow Salehi et al. (MICCAI 2022); see docs/method.md. A cell's
256x14x14 Mask R-CNN feature is encoded to a 50-d latent z, decoded back to the feature, and the
*reconstructed* feature is decoded to the cell image. Training minimises
``MSE(feature) + (1 - SSIM(image)) + align_weight * sum_t D(z_anchor, z_t)`` where the alignment term
pulls every domain's latent statistics towards those of the anchor domain (id 0).

Three knobs exist for CPU use, all recorded in ``model_args`` so checkpoints rebuild exactly:
``width`` scales every hidden channel count, ``image_size`` (32, 64 or 128) drops stride-2 stages of
the image decoder, which at 128x128 costs about 5.5 GFLOP per sample and dominates training, and
``image_bottleneck`` lets the image decoder first reduce the 256-channel feature with a 1x1 convolution:
its first upsampling layer (5x5 kernels on all 256 channels) is otherwise over half of the model's FLOPs
(56 % at width 0.5).
"""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .config import ALIGNMENTS, FEATURE_SCALINGS, IMAGE_LOSSES, IMAGE_SIZES
from .errors import StageError, UserError
from .io import atomic_path
from .precision import autocast

CHECKPOINT_FORMAT = "aecfe-autoencoder/1"
FEATURE_SIZE = 14  # side of the RoIAlign feature map the encoder expects
ANCHOR_DOMAIN = 0  # the first dataset; every other domain is aligned to it
LOSS_TERMS = ("feature", "image", "align", "views", "total")
VIEW_TEMPERATURE = 0.2  # of the view-consistency term's cosine similarities (SimCLR's range)
DIHEDRAL_ELEMENTS = 8  # the square's symmetries: 4 quarter turns, each with and without a mirror

# (out_channels, kernel, stride) of the paper's layers; the last layer of each part is added separately
# because its channel count is not a hidden one (latent, feature or RGB) and it has no norm after it.
# The method text gives ReLU + GroupNorm for the encoder only; the decoders use the same between layers.
ENCODER_HIDDEN = ((200, 3, 1), (150, 3, 2), (100, 3, 1), (70, 2, 1), (60, 2, 1))
FEATURE_DECODER_HIDDEN = ((150, 5, 1), (200, 4, 2))
# Each stride-2 stage roughly doubles the side: 14 -> 31 -> 63 -> 127; the k2 layer then adds one pixel.
IMAGE_DECODER_UPSAMPLING = ((200, 5, 2), (180, 3, 2), (150, 3, 2))
IMAGE_DECODER_TAIL = (128, 2, 1)
MAX_NORM_GROUPS = 8

Device = Union[str, torch.device]


class NonFiniteLoss(StageError):
    """A loss or gradient became NaN/inf; raised before the optimiser step, so weights are intact."""

    def __init__(self, message: str, batch_index: int):
        super().__init__(message)
        self.batch_index = batch_index


def _norm_groups(channels: int) -> int:
    """Largest group count <= MAX_NORM_GROUPS dividing ``channels`` (scaled widths give odd counts)."""
    return max(g for g in range(1, MAX_NORM_GROUPS + 1) if channels % g == 0)


def _hidden_layers(
    convolution: type[nn.Module], in_channels: int, specs: Sequence[tuple[int, int, int]], width: float,
    norm_first: bool,
) -> tuple[list[nn.Module], int]:
    """(Transposed) convolution, ReLU and GroupNorm per ``(channels, kernel, stride)``; channels scaled by
    ``width``. Returns the layers and the channel count of the last one.

    The paper's order is ReLU then GroupNorm. On sparse maps (the decoders' first layers see a 1x1
    latent spread over 5x5) GroupNorm after ReLU rescales a group by the few activations that survived,
    which plants a fixed high-contrast spot that the image decoder's sigmoid saturates: the "droplet"
    StyleGAN2 traced to normalising sparse activations. ``norm_first`` normalises before the ReLU, the
    usual order, which removes the spot.
    """
    layers: list[nn.Module] = []
    for channels, kernel, stride in specs:
        scaled = max(1, round(channels * width))
        norm = nn.GroupNorm(_norm_groups(scaled), scaled)
        pair = [norm, nn.ReLU(inplace=True)] if norm_first else [nn.ReLU(inplace=True), norm]
        layers += [convolution(in_channels, scaled, kernel, stride), *pair]
        in_channels = scaled
    return layers, in_channels


class AECFE(nn.Module):
    """Feature encoder, feature decoder and image decoder of AE-CFE (about 4 M parameters at width 1)."""

    def __init__(self, in_channels: int = 256, latent_dim: int = 50, image_size: int = 128, width: float = 1.0,
                 feature_scaling: str = "sample", norm_first: bool = False, image_bottleneck: int = 0,
                 dihedral: bool = False):
        super().__init__()
        if image_size not in IMAGE_SIZES:
            raise UserError(f"image_size {image_size} is not supported; choose one of {', '.join(map(str, IMAGE_SIZES))}")
        if not width > 0:
            raise UserError(f"width must be positive, got {width}")
        if in_channels < 1 or latent_dim < 1:
            raise UserError(f"in_channels and latent_dim must be positive, got {in_channels} and {latent_dim}")
        if feature_scaling not in FEATURE_SCALINGS:
            raise UserError(f"feature_scaling '{feature_scaling}': choose one of {', '.join(FEATURE_SCALINGS)}")
        if image_bottleneck < 0:
            raise UserError(f"image_bottleneck must be 0 (none) or a channel count, got {image_bottleneck}")
        self.model_args = {
            "in_channels": int(in_channels),
            "latent_dim": int(latent_dim),
            "image_size": int(image_size),
            "width": float(width),
            "feature_scaling": feature_scaling,
            "norm_first": bool(norm_first),
            "image_bottleneck": int(image_bottleneck),
            "dihedral": bool(dihedral),
        }
        self.feature_scaling = feature_scaling
        if feature_scaling == "channel":
            # Fitted on the training cells by fit_feature_scaling and saved with the weights, so extraction
            # scales every later cell exactly as training did.
            self.register_buffer("feature_mean", torch.zeros(in_channels))
            self.register_buffer("feature_std", torch.ones(in_channels))
        self.in_channels = in_channels
        self.latent_dim = latent_dim
        self.image_size = image_size

        layers, last = _hidden_layers(nn.Conv2d, in_channels, ENCODER_HIDDEN, width, norm_first)
        self.encoder = nn.Sequential(*layers, nn.Conv2d(last, latent_dim, 1), nn.Tanh(), nn.Flatten())

        layers, last = _hidden_layers(nn.ConvTranspose2d, latent_dim, FEATURE_DECODER_HIDDEN, width, norm_first)
        # Min-max scaled features lie in [-1, 1] (Tanh); standardised ones are unbounded (linear output).
        output = nn.Tanh() if feature_scaling == "sample" else nn.Identity()
        self.feature_decoder = nn.Sequential(
            nn.Unflatten(1, (latent_dim, 1, 1)), *layers, nn.ConvTranspose2d(last, in_channels, 3), output
        )

        # 14 -> 31 -> 63 -> 127 per stride-2 stage, so 32/64/128 keep the first 1/2/3 stages of the paper.
        upsampling = IMAGE_DECODER_UPSAMPLING[: IMAGE_SIZES.index(image_size) + 1]
        # The bottleneck is a channel count, not scaled by width: it sets the cost of the layer after it.
        squeeze, entry = ([], in_channels) if not image_bottleneck else _hidden_layers(
            nn.Conv2d, in_channels, ((image_bottleneck, 1, 1),), 1.0, norm_first)
        layers, last = _hidden_layers(nn.ConvTranspose2d, entry, (*upsampling, IMAGE_DECODER_TAIL), width, norm_first)
        self.image_decoder = nn.Sequential(*squeeze, *layers, nn.ConvTranspose2d(last, 3, 1), nn.Sigmoid())

    def scale(self, features: Tensor) -> Tensor:
        """RoI features as the encoder expects them: min-max per sample, or standardised per channel."""
        if self.feature_scaling == "sample":
            return scale_features(features)
        return (features - self.feature_mean.view(1, -1, 1, 1)) / self.feature_std.view(1, -1, 1, 1)

    @torch.no_grad()
    def fit_feature_scaling(self, blocks) -> None:
        """Per-channel mean and standard deviation over every cell and position of ``blocks``
        (an iterable of (N, C, 14, 14) arrays or tensors); a no-op for per-sample scaling."""
        if self.feature_scaling == "sample":
            return
        total = torch.zeros(self.in_channels, dtype=torch.float64)
        squares = torch.zeros(self.in_channels, dtype=torch.float64)
        count = 0
        for block in blocks:
            values = torch.as_tensor(block).double().transpose(0, 1).reshape(self.in_channels, -1)
            total += values.sum(dim=1)
            squares += (values**2).sum(dim=1)
            count += values.shape[1]
        if count == 0:
            raise UserError("no cells to fit the feature scaling on")
        mean = total / count
        std = (squares / count - mean**2).clamp_min(0).sqrt()
        # A channel that never varies (dead in the detector) is left unscaled rather than divided by zero.
        self.feature_mean.copy_(mean.float())
        self.feature_std.copy_(torch.where(std > 1e-6, std, torch.ones_like(std)).float())

    def encode(self, features: Tensor) -> Tensor:
        """Latent codes ``(N, latent_dim)`` of features already scaled by :meth:`scale`."""
        expected = (self.in_channels, FEATURE_SIZE, FEATURE_SIZE)
        if tuple(features.shape[1:]) != expected:
            raise UserError(f"features have shape {tuple(features.shape[1:])} per cell; the autoencoder expects {expected}")
        return self.encoder(features)

    def embed(self, features: Tensor) -> Tensor:
        """A cell's latent as extraction writes it: :meth:`encode`, or with ``dihedral`` the mean of the
        latents of the 8 orientations of the square, so that how a cell lies on the slide cannot move it."""
        if not self.model_args["dihedral"]:
            return self.encode(features)
        return torch.stack([self.encode(dihedral(features, element)) for element in range(DIHEDRAL_ELEMENTS)]).mean(0)

    def forward(self, features: Tensor, views: Optional[Tensor] = None) -> tuple[Tensor, ...]:
        """``(z, feature_recon, image_recon)``; the image is decoded from the reconstructed feature.

        With ``views`` (scaled features of augmented views, any number per cell) a fourth element holds
        their latents: they are encoded in the same pass (so DistributedDataParallel sees one forward) and
        not decoded, since only their agreement with ``z`` is trained."""
        if views is None:
            z = self.encode(features)
        else:
            z, view_z = self.encode(torch.cat([features, views])).split([len(features), len(views)])
        feature_recon = self.feature_decoder(z)
        outputs = (z, feature_recon, self.image_decoder(feature_recon))
        return outputs if views is None else (*outputs, view_z)


def _unwrap(model: nn.Module) -> AECFE:
    return model.module if isinstance(model, DistributedDataParallel) else model


def dihedral(x: Tensor, element: int) -> Tensor:
    """Symmetry ``element`` (0-7) of the square on the last two axes: a mirror for 4-7, then ``element % 4``
    quarter turns. 0 is the identity."""
    if element >= 4:
        x = x.flip(-1)
    return torch.rot90(x, element % 4, dims=(-2, -1))


def random_orientations(tensors: Sequence[Tensor], generator: torch.Generator) -> list[Tensor]:
    """The same randomly drawn symmetry of the square for row i of every tensor in ``tensors`` (features
    and image target alike, each (N, C, H, W)), one draw per row from ``generator``."""
    elements = torch.randint(DIHEDRAL_ELEMENTS, (len(tensors[0]),), generator=generator).to(tensors[0].device)
    turned = [torch.empty_like(t) for t in tensors]
    for element in range(DIHEDRAL_ELEMENTS):
        rows = (elements == element).nonzero().squeeze(1)
        if len(rows):
            for out, t in zip(turned, tensors):
                out[rows] = dihedral(t[rows], element)
    return turned


def scale_features(x: Tensor) -> Tensor:
    """Min-max scale each sample to [-1, 1]; a constant sample maps to 0 instead of dividing by zero.

    NaN/inf are left to propagate (the test is ``span == 0``, which NaN fails) so that corrupt features
    surface as a non-finite loss instead of being silently zeroed.
    """
    flat = x.reshape(x.shape[0], -1)
    low = flat.min(dim=1, keepdim=True).values
    span = flat.max(dim=1, keepdim=True).values - low
    constant = span == 0
    scaled = 2 * (flat - low) / torch.where(constant, torch.ones_like(span), span) - 1
    return torch.where(constant, torch.zeros_like(flat), scaled).reshape(x.shape)


def prepare_batch(
    features: Tensor, crops: Tensor, image_size: int, device: Device, scale: Callable[[Tensor], Tensor] = scale_features
) -> tuple[Tensor, Tensor]:
    """Move a stored batch to ``device``: float32 features scaled by ``scale`` (the model's
    :meth:`AECFE.scale`) and [0, 1] images of side ``image_size``.

    Features may be float16 on disk and crops uint8; both travel in their compact dtype and are widened
    on the device. Area interpolation averages whole pixels, the right filter for shrinking a crop.
    """
    if features.ndim != 4 or crops.ndim != 4 or crops.shape[1] != 3 or features.shape[0] != crops.shape[0]:
        raise UserError(
            f"expected features (N, C, 14, 14) and crops (N, 3, S, S) with the same N, "
            f"got {tuple(features.shape)} and {tuple(crops.shape)}"
        )
    features = scale(features.to(device, non_blocking=True).float())
    images = crops.to(device, non_blocking=True).float()
    if crops.dtype == torch.uint8:
        images = images / 255.0
    if images.shape[-2:] != (image_size, image_size):
        images = F.interpolate(images, size=(image_size, image_size), mode="area")
    return features, images


@torch.no_grad()
def feature_r2(model: AECFE, feature_batches, device: Device) -> float:
    """Coefficient of determination of the feature reconstruction over ``feature_batches`` (raw RoI
    features, (N, C, 14, 14) each), in the scaled space the feature term is computed in: 1 is exact,
    0 is no better than predicting every cell's mean feature, which a collapsed latent gives.
    Float32 without autocast, so one number serves every precision setting."""
    core = _unwrap(model)
    was_training = core.training
    core.eval()
    count, total, squares, errors = 0, 0.0, 0.0, 0.0
    for batch in feature_batches:
        features = core.scale(torch.as_tensor(batch).to(device).float())
        recon = core.feature_decoder(core.encode(features))
        flat = features.double().reshape(len(features), -1)
        count += len(features)
        total = total + flat.sum(dim=0)
        squares = squares + (flat**2).sum(dim=0)
        errors += float(((recon.double().reshape(len(features), -1) - flat) ** 2).sum())
    core.train(was_training)
    # Sum over elements of each element's squared deviation from its mean over the cells; undefined (nan)
    # for fewer than two cells or identical ones, which must not fail a training that has finished.
    spread = float((squares - total**2 / count).sum()) if count > 1 else 0.0
    return 1.0 - errors / spread if spread > 0 else float("nan")


def _gaussian_window(window: int, sigma: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    offsets = torch.arange(window, device=device, dtype=dtype) - (window - 1) / 2
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    return weights / weights.sum()


def ssim(a: Tensor, b: Tensor, window: int = 11, sigma: float = 1.5, padded: bool = False) -> Tensor:
    """Mean structural similarity of two image batches in [0, 1] (Wang et al. 2004, 'valid' windows).

    The paper names a window of 10; an odd window (11, the usual choice) has a centre pixel, so each
    SSIM value describes the pixel it is centred on instead of a point half a pixel off the grid.
    ``padded`` reflects the borders first, so the outer window/2 pixels are scored too: with 'valid'
    windows they count far less than the centre (a 32-px image loses 10 of its 32 rows) and drift.
    """
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"ssim needs two (N, C, H, W) batches of one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if window % 2 == 0 or window > min(a.shape[-2:]):
        raise ValueError(f"ssim window must be odd and fit the image, got {window} for {tuple(a.shape[-2:])}")
    if padded:
        a = F.pad(a, (window // 2,) * 4, mode="reflect")
        b = F.pad(b, (window // 2,) * 4, mode="reflect")
    channels = a.shape[1]
    weights = _gaussian_window(window, sigma, a.device, a.dtype)
    # One grouped, separable blur over the five moment maps instead of five separate 2-D convolutions.
    moments = torch.cat([a, b, a * a, b * b, a * b], dim=1)
    groups = 5 * channels
    moments = F.conv2d(moments, weights.view(1, 1, 1, window).expand(groups, 1, 1, window), groups=groups)
    moments = F.conv2d(moments, weights.view(1, 1, window, 1).expand(groups, 1, window, 1), groups=groups)
    mu_a, mu_b, mean_aa, mean_bb, mean_ab = moments.split(channels, dim=1)
    var_a = mean_aa - mu_a**2
    var_b = mean_bb - mu_b**2
    cov_ab = mean_ab - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2  # the standard constants for a data range of 1
    similarity = ((2 * mu_a * mu_b + c1) * (2 * cov_ab + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return similarity.mean()


def _covariance(z: Tensor) -> Tensor:
    centred = z - z.mean(dim=0, keepdim=True)
    return centred.T @ centred / max(z.shape[0] - 1, 1)


def alignment_distance(z_a: Tensor, z_b: Tensor) -> Tensor:
    """D(a, b) = MSE of the batch means + 0.5 * symmetric KL of the softmax-normalised covariances.

    The softmax runs over the whole flattened matrix, not per row: that makes one distribution per
    domain over all latent pairs, so a domain that puts its variance on different dimensions (rows of
    different magnitude) still differs, whereas per-row normalisation would erase each row's scale.
    """
    mean_term = F.mse_loss(z_a.mean(dim=0), z_b.mean(dim=0))
    log_p = F.log_softmax(_covariance(z_a).flatten(), dim=0)
    log_q = F.log_softmax(_covariance(z_b).flatten(), dim=0)
    kl_pq = (log_p.exp() * (log_p - log_q)).sum()
    kl_qp = (log_q.exp() * (log_q - log_p)).sum()
    return mean_term + 0.5 * (kl_pq + kl_qp)


def view_consistency(z: Tensor, view_z: Tensor, temperature: float = VIEW_TEMPERATURE) -> Tensor:
    """How well each augmented view's latent finds its own cell's latent among the batch's (InfoNCE on
    cosine similarity, divided by ln(batch) so that 1 is chance and 0 is certainty, whatever the batch
    size). The cells' latents are held constant: the views move towards their originals.

    A plain distance between a view's latent and its cell's was tried first (scaled by the batch's latent
    variance): the encoder met it by mapping every cell to one latent, which makes every distance zero
    (real triangle, pipeline seed 0: latent alone 0.18 across labs). Here the other cells of the batch
    are the negatives, so a collapsed latent scores chance, not zero. ``view_z`` holds the views of each
    cell in turn: ``len(view_z)`` is a multiple of ``len(z)``."""
    per_cell = len(view_z) // max(len(z), 1)
    if per_cell * len(z) != len(view_z) or per_cell == 0:
        raise StageError(f"{len(view_z)} view latents for {len(z)} cells: expected a whole number of views per cell")
    if len(z) < 2:
        return z.new_zeros(())  # one cell has no other to be told apart from
    similarity = F.normalize(view_z, dim=1) @ F.normalize(z.detach(), dim=1).T / temperature
    own = torch.arange(len(z), device=z.device).repeat_interleave(per_cell)
    return F.cross_entropy(similarity, own) / math.log(len(z))


def aecfe_loss(
    model_outputs: tuple[Tensor, ...],
    features: Tensor,
    images: Tensor,
    domains: Tensor,
    align_weight: float = 5.0,
    image_loss: str = "ssim",
    alignment: str = "paper",
    view_weight: float = 0.0,
) -> dict[str, Tensor]:
    """The paper's loss terms and their weighted total; ``align`` is 0 for a single-domain batch.

    ``model_outputs`` is the model's output: with a fourth element (the latents of augmented views) the
    ``views`` term (:func:`view_consistency`) joins the total at ``view_weight``; without, it is 0.

    ``image_loss`` "ssim" is the paper's 1 - SSIM; "ssim_l1" scores the borders too (padded SSIM) and adds
    the mean absolute pixel error, which SSIM alone leaves free (it ignores a uniform colour offset).
    ``alignment`` "normalised" measures the domain distance on latents divided by the batch's per-dimension
    standard deviation (held constant): with the paper's distance the cheapest way to align is to shrink
    every latent towards 0, which also erases what separates the classes.
    """
    if image_loss not in IMAGE_LOSSES or alignment not in ALIGNMENTS:
        raise UserError(f"image_loss must be one of {IMAGE_LOSSES} and alignment one of {ALIGNMENTS}, "
                        f"got {image_loss!r} and {alignment!r}")
    z, feature_recon, image_recon = model_outputs[:3]
    views_term = view_consistency(z, model_outputs[3]) if len(model_outputs) > 3 else z.new_zeros(())
    feature_term = F.mse_loss(feature_recon, features)
    if image_loss == "ssim":
        image_term = 1 - ssim(image_recon, images)
    else:
        image_term = 1 - ssim(image_recon, images, padded=True) + F.l1_loss(image_recon, images)
    if alignment == "normalised":
        z = z / z.detach().std(dim=0, keepdim=True).clamp_min(1e-3)
    align_term = z.new_zeros(())
    present = torch.unique(domains).tolist()
    if len(present) > 1:
        if ANCHOR_DOMAIN not in present:
            raise StageError(
                f"a batch holds domains {present} but not the anchor domain {ANCHOR_DOMAIN}; "
                "batch with DomainBalancedBatchSampler so every batch holds every domain"
            )
        anchor = z[domains == ANCHOR_DOMAIN]
        for domain in present:
            if domain != ANCHOR_DOMAIN:
                align_term = align_term + alignment_distance(anchor, z[domains == domain])
    total = feature_term + image_term + align_weight * align_term + view_weight * views_term
    return {"feature": feature_term, "image": image_term, "align": align_term, "views": views_term, "total": total}


def _gradient_norm(model: nn.Module) -> Tensor:
    gradients = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(gradients)


def train_one_epoch(
    model: nn.Module,
    loader,
    optimizer: torch.optim.Optimizer,
    device: Device,
    align_weight: float,
    image_size: int,
    on_batch: Optional[Callable[[dict[str, float], int], None]] = None,
    image_loss: str = "ssim",
    alignment: str = "paper",
    autocast_dtype: Optional[torch.dtype] = None,
    view_weight: float = 0.0,
    orientations: Optional[torch.Generator] = None,
) -> dict[str, float]:
    """Train one pass over ``loader`` (yielding ``(features, crops, domain_ids)``, or with a fourth
    element the (N, V, 256, 14, 14) features of V augmented views per cell for the ``views`` term at
    ``view_weight``); return the sample-weighted mean of every loss term, averaged over all ranks under DDP.

    ``autocast_dtype`` (see :func:`aecfe_cli.precision.autocast_dtype`) runs the forward pass in that dtype; the loss is
    computed in float32 on the widened outputs. With ``orientations`` (a seeded generator) each cell is seen in
    a random one of the square's 8 symmetries, its feature and image target turned alike."""
    core = _unwrap(model)
    if core.model_args["image_size"] != image_size:
        raise UserError(f"image_size {image_size} does not match the model's {core.model_args['image_size']}")
    distributed = isinstance(model, DistributedDataParallel) and dist.is_available() and dist.is_initialized()
    model.train()
    sums = torch.zeros(len(LOSS_TERMS) + 1, dtype=torch.float64)  # the loss terms, then the sample count
    for batch_index, (features, crops, domains, *view_batch) in enumerate(loader):
        features, images = prepare_batch(features, crops, image_size, device, core.scale)
        if orientations is not None:
            features, images = random_orientations((features, images), orientations)
        domains = domains.to(device, non_blocking=True)
        # Flattened cell-major, so the views of one cell follow each other as view_consistency expects.
        views = core.scale(view_batch[0].to(device, non_blocking=True).float().flatten(0, 1)) if view_batch else None
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, autocast_dtype):
            outputs = model(features, views)
        outputs = tuple(output.float() for output in outputs)
        terms = aecfe_loss(outputs, features, images, domains, align_weight, image_loss, alignment, view_weight)
        # Backward runs even for a NaN loss: under DDP every rank must join the gradient all-reduce,
        # and the averaged gradient then carries any rank's NaN, so all ranks stop at the same batch.
        terms["total"].backward()
        # One device-to-host transfer per batch for the logged terms and the finiteness check.
        readings = torch.stack([*(terms[name].detach() for name in LOSS_TERMS), _gradient_norm(model)])
        finite = torch.isfinite(readings).all().float()
        if distributed:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        values = readings.tolist()[: len(LOSS_TERMS)]
        if not finite.item():
            shown = ", ".join(f"{name}={value:.4g}" for name, value in zip(LOSS_TERMS, values))
            raise NonFiniteLoss(
                f"non-finite loss or gradient at batch {batch_index} ({shown}); the weights were not updated. "
                "Check the features for NaN/inf or lower the learning rate",
                batch_index,
            )
        optimizer.step()
        count = features.shape[0]
        sums += torch.tensor([*(v * count for v in values), count], dtype=torch.float64)
        if on_batch is not None:
            on_batch(dict(zip(LOSS_TERMS, values)), count)
    if distributed:
        # gloo and NCCL both reduce float64; the sums travel on the device NCCL requires.
        reduced = sums.to(device)
        dist.all_reduce(reduced)
        sums = reduced.cpu()
    if sums[-1] == 0:
        raise StageError("the training loader yielded no batches; use a smaller batch size or drop_last=False")
    return {name: float(sums[i] / sums[-1]) for i, name in enumerate(LOSS_TERMS)}


def _is_plain(value) -> bool:
    """True for what ``torch.load(weights_only=True)`` can read back: tensors and plain containers."""
    if value is None or isinstance(value, (bool, int, float, str, Tensor, torch.dtype, torch.device)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    if isinstance(value, dict):
        return all(isinstance(key, (str, int)) and _is_plain(item) for key, item in value.items())
    return False


def save_checkpoint(
    path: Path, model: nn.Module, optimizer: Optional[torch.optim.Optimizer], epoch: int, extra: dict
) -> None:
    """Write model, optimiser state and run metadata atomically, in a form ``weights_only`` can load."""
    core = _unwrap(model)
    if not _is_plain(extra):
        raise StageError("checkpoint 'extra' must hold only numbers, strings, lists, dicts and tensors")
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model_args": dict(core.model_args),
        "state_dict": {name: tensor.detach().cpu() for name, tensor in core.state_dict().items()},
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "epoch": int(epoch),
        "extra": extra,
    }
    with atomic_path(Path(path)) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(path: Path, device: Device) -> dict:
    """Load a checkpoint with ``weights_only=True``: a pickled object is refused, never executed."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"{path}: not an aecfe autoencoder checkpoint ({reason})") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise UserError(f"{path}: not an aecfe autoencoder checkpoint (format {found!r}, expected {CHECKPOINT_FORMAT!r})")
    missing = [key for key in ("model_args", "state_dict", "epoch") if key not in checkpoint]
    if missing:
        raise UserError(f"{path}: not an aecfe autoencoder checkpoint (missing {', '.join(missing)})")
    return checkpoint


def _first_few(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def build_model(checkpoint: dict, expected: Optional[dict] = None) -> AECFE:
    """Rebuild the model a checkpoint describes and load its weights (on the checkpoint's device)."""
    model_args = checkpoint["model_args"]
    differing = [
        f"{key}: checkpoint has {model_args.get(key)!r}, expected {value!r}"
        for key, value in (expected or {}).items()
        if model_args.get(key) != value
    ]
    if differing:
        raise UserError(f"the checkpoint does not match this run ({'; '.join(differing)})")
    try:
        model = AECFE(**model_args)
    except TypeError as exc:
        raise UserError(f"the checkpoint's model_args {model_args} do not describe an AECFE model ({exc})") from exc
    state = checkpoint["state_dict"]
    own = model.state_dict()
    problems = [f"missing {key}" for key in own if key not in state]
    problems += [f"unexpected {key}" for key in state if key not in own]
    problems += [
        f"{key} has shape {tuple(state[key].shape)}, the model needs {tuple(own[key].shape)}"
        for key in own
        if key in state and state[key].shape != own[key].shape
    ]
    if problems:
        raise UserError(f"the checkpoint's weights do not fit the model: {_first_few(problems)}")
    devices = {tensor.device for tensor in state.values()}
    model.to(devices.pop() if len(devices) == 1 else "cpu")
    model.load_state_dict(state)
    return model


def count_flops(model: nn.Module, batch: int = 1) -> dict[str, float]:
    """Forward FLOPs (2 x multiply-adds of the convolutions) of ``batch`` samples, per part and in total,
    counted by torch's FlopCounterMode on one forward pass of zeros.

    Norms, activations and biases add well under 1 % and are not counted.
    """
    from torch.utils.flop_counter import FlopCounterMode

    core = _unwrap(model)
    parameter = next(core.parameters())
    features = torch.zeros(batch, core.in_channels, FEATURE_SIZE, FEATURE_SIZE, device=parameter.device)
    parts = {
        "encoder": (core.encoder, features),
        "feature_decoder": (core.feature_decoder, torch.zeros(batch, core.latent_dim, device=parameter.device)),
        "image_decoder": (core.image_decoder, features),
    }
    flops: dict[str, float] = {}
    with torch.no_grad():
        for name, (network, inputs) in parts.items():
            with FlopCounterMode(display=False) as counter:
                network(inputs.to(parameter.dtype))
            flops[name] = float(counter.get_total_flops())
    flops["total"] = sum(flops.values())
    return flops
