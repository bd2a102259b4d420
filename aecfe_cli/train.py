"""Stage 2: train the AE-CFE autoencoder on the detections of one or several datasets.

``model.pt`` is rewritten after every epoch (model, optimiser, epoch, constructor arguments), so an
interrupted run continues where it stopped and ends with the same weights as an uninterrupted one: the
batches of each epoch depend only on (seed, epoch), never on when the process started.
Under ``torchrun`` (WORLD_SIZE > 1) every rank trains its share with DistributedDataParallel; only
rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from . import autoencoder as ae
from . import precision
from .config import TrainConfig
from .detect import VIEWS_FILE
from .errors import UserError
from .io import iter_npy_blocks, read_npy, write_csv, write_figure
from .reporting import Reporter
from .sampling import DomainBalancedBatchSampler
from .workdir import fingerprint, invalidate, output_digest, write_manifest

FEATURE_CHANNELS = 256
SAMPLES_PER_DOMAIN = 6  # cells shown in each reconstruction grid, per dataset
R2_CELLS = 2048  # evenly spaced training cells the feature R^2 is measured on (seconds, not minutes)


class CellArrays(torch.utils.data.Dataset):
    """Detected cells of several datasets as one indexable set: (feature, crop, domain id), and with
    ``views`` the RoI features of each cell's augmented views (``detect.views``) as a fourth element.

    Arrays stay memory-mapped; a batch is gathered with one sorted fancy index per dataset.
    """

    def __init__(self, detect_dirs: Sequence[Path], views: bool = False):
        self.features = [read_npy(Path(d) / "roi_features.npy") for d in detect_dirs]
        self.crops = [read_npy(Path(d) / "crops.npy") for d in detect_dirs]
        self.views = [_read_views(Path(d), len(f)) for d, f in zip(detect_dirs, self.features)] if views else None
        if self.views and len({v.shape[1] for v in self.views}) > 1:
            raise UserError("the datasets were detected with different detect.views "
                            f"({', '.join(str(v.shape[1]) for v in self.views)}); detect them again with one setting")
        sizes = [len(f) for f in self.features]
        self.domains = np.concatenate([np.full(n, i, dtype=np.int64) for i, n in enumerate(sizes)])
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, index: int):
        return self._gather([index])

    def __getitems__(self, indices: list[int]):
        return self._gather(indices)

    def _gather(self, indices):
        indices = np.asarray(indices)
        features, crops, domains, views = [], [], [], []
        for domain in np.unique(self.domains[indices]):
            local = np.sort(indices[self.domains[indices] == domain]) - self.offsets[domain]
            features.append(np.asarray(self.features[domain][local]))
            crops.append(np.asarray(self.crops[domain][local]))
            domains.append(np.full(len(local), domain, dtype=np.int64))
            if self.views:
                views.append(np.asarray(self.views[domain][local]))
        batch = (torch.from_numpy(np.concatenate(features)), torch.from_numpy(np.concatenate(crops)),
                 torch.from_numpy(np.concatenate(domains)))
        return (*batch, torch.from_numpy(np.concatenate(views))) if self.views else batch


def _read_views(folder: Path, cells: int) -> np.ndarray:
    path = folder / VIEWS_FILE
    if not path.is_file():
        raise UserError(f"{path} is missing: train.view_weight needs the RoI features of augmented views; "
                        "set detect.views (for example 1) so that detection stores them, or train.view_weight: 0")
    views = read_npy(path)
    if views.ndim != 5 or len(views) != cells or views.shape[2:] != (FEATURE_CHANNELS, 14, 14):
        raise UserError(f"{path}: shape {views.shape} does not match the {cells} cells of roi_features.npy; "
                        "run detection again")
    return views


def _identity_collate(batch):
    return batch


def _inputs(detect_manifests: Sequence[dict]) -> dict[str, str]:
    """Ordered detection digests: the first dataset is the alignment anchor, so order matters."""
    return {f"{i}:{m['inputs']['dataset']['name']}": output_digest(m) for i, m in enumerate(detect_manifests)}


def training_fingerprint(detect_manifests: Sequence[dict], cfg: TrainConfig, seed: int) -> str:
    return fingerprint("train", dataclasses.asdict(cfg), seed, _inputs(detect_manifests))


def run_training(
    names: Sequence[str],
    detect_dirs: Sequence[Path],
    detect_manifests: Sequence[dict],
    cfg: TrainConfig,
    folder: Path,
    device: torch.device,
    seed: int,
    reporter: Reporter,
    require_resume: bool = False,
) -> Optional[dict]:
    """Train, or continue an interrupted training with the same inputs; returns the manifest (rank 0)."""
    dataset = CellArrays(detect_dirs, views=cfg.view_weight > 0)
    for name, directory, features in zip(names, detect_dirs, dataset.features):
        if not len(features):
            raise UserError(f"{directory}: dataset '{name}' has no detected cell to train on; check its detections")
    rank, world_size = _init_distributed(device)
    expected = training_fingerprint(detect_manifests, cfg, seed)
    # Epochs are left out of the resume key so that raising them continues a finished run.
    resume_key = fingerprint("train-resume", {**dataclasses.asdict(cfg), "epochs": None}, seed, _inputs(detect_manifests))
    torch.manual_seed(seed)
    model = ae.AECFE(FEATURE_CHANNELS, cfg.latent_dim, cfg.image_size, cfg.width, cfg.feature_scaling,
                     cfg.norm_first, cfg.image_bottleneck, cfg.dihedral)
    autocast_dtype = precision.autocast_dtype(cfg.precision, device)
    model.fit_feature_scaling(block for directory in detect_dirs
                              for block in iter_npy_blocks(Path(directory) / "roi_features.npy", 512))
    precision.place(model, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    start_epoch, history = _restore(folder / "model.pt", resume_key, model, optimizer, device, require_resume, reporter)
    if rank == 0:
        invalidate(folder)
    if world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    sampler = DomainBalancedBatchSampler(dataset.domains.tolist(), cfg.batch_size, seed, rank, world_size)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=_identity_collate,
                                         pin_memory=device.type == "cuda")
    started = time.perf_counter()
    samples_seen = 0  # balanced batches re-draw small domains, so an epoch is more than len(dataset)
    if start_epoch:
        reporter.info(f"training: continuing from epoch {start_epoch} of {cfg.epochs} ({folder / 'model.pt'})")
    if autocast_dtype is not None and rank == 0:
        reporter.info(f"training: forward pass in bfloat16 on {device} (train.precision: {cfg.precision}; fp32 turns it off)")
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        with reporter.progress(f"epoch {epoch + 1}/{cfg.epochs}", len(sampler) * cfg.batch_size, unit="samples") as bar:
            def on_batch(terms: dict, count: int) -> None:
                nonlocal samples_seen
                samples_seen += count
                bar.advance(count, loss=terms["total"], align=terms["align"])

            # Drawn from (seed, epoch, rank) alone, like the batches, so a resumed run turns the same cells.
            orientations = None
            if cfg.dihedral:
                state = np.random.SeedSequence([seed, epoch, rank]).generate_state(1, np.uint64)[0]
                orientations = torch.Generator().manual_seed(int(state))
            terms = ae.train_one_epoch(model, loader, optimizer, device, cfg.align_weight, cfg.image_size,
                                       on_batch=on_batch, image_loss=cfg.image_loss, alignment=cfg.alignment,
                                       autocast_dtype=autocast_dtype, view_weight=cfg.view_weight,
                                       orientations=orientations)
        history.append({"epoch": epoch + 1, **terms})
        if rank == 0:
            ae.save_checkpoint(folder / "model.pt", model, optimizer, epoch + 1,
                               extra={"resume_key": resume_key, "history": history, "datasets": list(names)})
            if (epoch + 1) % cfg.sample_every == 0 or epoch + 1 == cfg.epochs:
                _write_reconstructions(folder / f"reconstructions_epoch{epoch + 1:03d}.png", model, dataset, cfg, device)
    seconds = time.perf_counter() - started
    if world_size > 1:
        torch.distributed.barrier()
    if rank != 0:
        return None
    _write_history(folder, history)
    core = model.module if world_size > 1 else model
    r2 = ae.feature_r2(core, _feature_sample(dataset, R2_CELLS), device)
    outputs = ["model.pt", "history.csv", "loss.png"]
    return write_manifest(
        folder,
        "train",
        fingerprint_value=expected,
        config=dataclasses.asdict(cfg),
        seed=seed,
        device=str(device),
        inputs={name: output_digest(m) for name, m in zip(names, detect_manifests)},
        outputs=outputs,
        counts={"cells": len(dataset), "per_dataset": {n: int((dataset.domains == i).sum()) for i, n in enumerate(names)},
                "epochs": cfg.epochs, "parameters": sum(p.numel() for p in core.parameters()), "world_size": world_size},
        timings={"seconds_this_run": round(seconds, 2),
                 "samples_per_second": round(samples_seen / seconds, 1) if seconds > 0 and samples_seen else None},
        extra={"datasets": list(names), "anchor": names[0], "flops_per_sample": ae.count_flops(core),
               "precision": precision.name(autocast_dtype),
               "final_loss": history[-1] if history else None, "feature_r2": round(r2, 4) if math.isfinite(r2) else None},
    )


def _feature_sample(dataset: CellArrays, cells: int, batch: int = 256):
    """RoI features of up to ``cells`` evenly spaced training cells, in batches."""
    indices = np.unique(np.linspace(0, len(dataset) - 1, min(cells, len(dataset))).astype(int))
    for start in range(0, len(indices), batch):
        yield dataset._gather(indices[start:start + batch])[0]


def _init_distributed(device: torch.device) -> tuple[int, int]:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), world_size


def _restore(path: Path, resume_key: str, model, optimizer, device, require_resume: bool, reporter) -> tuple[int, list]:
    if not path.is_file():
        if require_resume:
            raise UserError(f"{path}: no checkpoint to resume from; run without --resume")
        return 0, []
    checkpoint = ae.load_checkpoint(path, device)
    if checkpoint.get("extra", {}).get("resume_key") != resume_key:
        if require_resume:
            raise UserError(f"{path}: the checkpoint was trained with other data or settings; run without --resume")
        reporter.info("training: inputs or settings changed, starting from scratch")
        return 0, []
    model.load_state_dict(ae.build_model(checkpoint).state_dict())
    optimizer.load_state_dict(checkpoint["optimizer"])
    return int(checkpoint["epoch"]), list(checkpoint["extra"]["history"])


def _write_history(folder: Path, history: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    write_csv(folder / "history.csv", ["epoch", *ae.LOSS_TERMS],
              [[h["epoch"], *(f"{h[t]:.6g}" for t in ae.LOSS_TERMS)] for h in history])
    figure, axes = plt.subplots(1, len(ae.LOSS_TERMS), figsize=(4 * len(ae.LOSS_TERMS), 3))
    epochs = [h["epoch"] for h in history]
    for axis, term in zip(axes, ae.LOSS_TERMS):
        axis.plot(epochs, [h[term] for h in history], marker="o", markersize=3)
        axis.set_title(term)
        axis.set_xlabel("epoch")
    figure.tight_layout()
    write_figure(folder / "loss.png", figure)


@torch.no_grad()
def _write_reconstructions(path: Path, model, dataset: CellArrays, cfg: TrainConfig, device) -> None:
    """Input crops beside their reconstructions, a few cells of every dataset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    core = model.module if hasattr(model, "module") else model
    # Evenly spaced cells of each dataset, so the grid spans its classes (rows are sorted by folder).
    indices = [int(dataset.offsets[d]) + int(i) for d in range(len(dataset.features))
               for i in np.unique(np.linspace(0, len(dataset.features[d]) - 1, SAMPLES_PER_DOMAIN).astype(int))]
    features, crops = dataset._gather(indices)[:2]
    features, images = ae.prepare_batch(features, crops, cfg.image_size, device, core.scale)
    was_training = core.training
    core.eval()
    _, _, reconstructed = core(features)
    core.train(was_training)
    figure, axes = plt.subplots(2, len(indices), figsize=(1.2 * len(indices), 2.6), squeeze=False)
    for column in range(len(indices)):
        for row, batch in enumerate((images, reconstructed)):
            axes[row][column].imshow(batch[column].permute(1, 2, 0).clamp(0, 1).cpu().numpy())
            axes[row][column].axis("off")
    axes[0][0].set_title("input", fontsize=7, loc="left")
    axes[1][0].set_title("reconstruction", fontsize=7, loc="left")
    write_figure(path, figure)


def load_trained_model(folder: Path, device: torch.device) -> ae.AECFE:
    checkpoint = ae.load_checkpoint(folder / "model.pt", device)
    model = ae.build_model(checkpoint, expected={"in_channels": FEATURE_CHANNELS}).to(device)
    model.eval()
    return model

