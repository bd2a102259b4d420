"""Training throughput of the AE-CFE autoencoder per configuration (image size, width, batch).

Runs ``train_one_epoch`` (forward, backward, finiteness check, Adam step) on random features and crops
held in memory, so the numbers are the model's cost without disk or detector time. Prints forward
FLOPs per sample, measured samples/s, time per 10,000 cells and the ratio to the paper's setting;
writes no files. Usage: ``python benchmarks/train_speed.py [--quick] [--device cpu|cuda]``.

A shared machine makes timings noisy: the load average is printed first, compare runs taken under a
similar load. A batch whose activations would not fit in memory (the paper's 500 at 128x128 needs
tens of GB) is measured at the largest batch that fits; per-sample cost hardly changes with batch.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

# Without this, libgomp's threads busy-wait for each other; when another process holds one of the two
# cores, every parallel region stalls and throughput drops 1.5-10x. Must be set before torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aecfe_cli.autoencoder import AECFE, count_flops, prepare_batch, train_one_epoch  # noqa: E402
from aecfe_cli.precision import place  # noqa: E402

CROP_SIZE = 128  # the detect stage stores 128x128 crops; prepare_batch shrinks them per config
TARGET_CELLS = 10_000
PAPER = (128, 1.0, 500)
QUICK_PAPER_BATCH = 32
# (image_size, width, batch): the paper's setting first, then candidates for the CPU default.
CONFIGS = [PAPER, (64, 1.0, 128), (64, 0.5, 128), (64, 0.25, 128), (32, 1.0, 128), (32, 0.5, 128), (32, 0.5, 256)]
MEMORY_FRACTION = 0.25  # of the free memory for saved activations; backward temporaries and other users need the rest


def random_batches(count: int, batch: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Stored-format batches: float16 features, uint8 crops, two domains in equal shares."""
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 256, 14, 14, generator=generator).half(),
            torch.randint(0, 256, (batch, 3, CROP_SIZE, CROP_SIZE), generator=generator, dtype=torch.uint8),
            torch.arange(batch) % 2,
        )
        for _ in range(count)
    ]


def activation_bytes_per_sample(model: AECFE, device: torch.device) -> int:
    """Bytes autograd keeps for the model's backward per sample, counted with saved-tensor hooks (batch of 2)."""
    weights = {parameter.data_ptr() for parameter in model.parameters()}
    saved = 0

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if tensor.data_ptr() not in weights:  # weights are saved too but do not grow with the batch
            saved += tensor.numel() * tensor.element_size()
        return tensor

    features, crops, _ = random_batches(1, 2, seed=1)[0]
    features, _ = prepare_batch(features, crops, model.image_size, device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(features)
    return saved // 2


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        fields = dict(line.split(":", 1) for line in meminfo)
    return int(fields["MemAvailable"].split()[0]) * 1024


def measure(image_size: int, width: float, batch: int, timed_batches: int, device: torch.device) -> dict:
    torch.manual_seed(0)
    model = place(AECFE(image_size=image_size, width=width), device)  # as `aecfe train` places it
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    per_sample = activation_bytes_per_sample(model, device)
    fitting = max(2, int(free_memory_bytes(device) * MEMORY_FRACTION // per_sample))
    run_batch = min(batch, fitting)
    # A small warm-up batch builds the oneDNN/cuDNN kernels so that the timed batches measure steady state;
    # its FLOPs (forward, loss and backward as executed, counted by FlopCounterMode) are the step's per sample.
    warm_up = random_batches(1, min(run_batch, 8), seed=2)
    with FlopCounterMode(display=False) as counter:
        train_one_epoch(model, warm_up, optimizer, device, 5.0, image_size)
    rates = []
    # Each batch is timed on its own: on a shared machine the best batch shows the model's cost and
    # the median what a run would get under the current load. (Process CPU time is no better a clock:
    # OpenMP threads spin while waiting for a descheduled partner, so it grows with the load too.)
    for batch_data in random_batches(timed_batches, run_batch, seed=3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        train_one_epoch(model, [batch_data], optimizer, device, 5.0, image_size)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        rates.append(run_batch / (time.perf_counter() - start))
    return {
        "run_batch": run_batch,
        "median_samples_per_s": statistics.median(rates),
        "best_samples_per_s": max(rates),
        "flops": count_flops(model)["total"],
        "step_flops": counter.get_total_flops() / len(warm_up[0][0]),
        "parameters": sum(p.numel() for p in model.parameters()),
        "activation_gb_at_batch": per_sample * batch / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"one timed batch per configuration (not three), batch {QUICK_PAPER_BATCH} for the paper setting",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    timed_batches = 1 if args.quick else 3

    load = ", ".join(f"{value:.2f}" for value in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}, load average {load}"
    )
    print(
        f"{'image':>5} {'width':>5} {'batch':>5} {'params':>8} {'GFLOP/sample':>12} {'samples/s median':>16} "
        f"{'best':>6} {'s/10k cells':>11} {'FLOP ratio':>10} {'speed ratio':>11}"
    )
    paper = None
    for image_size, width, batch in CONFIGS:
        is_paper = (image_size, width, batch) == PAPER
        if is_paper and args.quick:
            batch = QUICK_PAPER_BATCH
        # The paper's setting is ~20x slower per sample on a CPU: one timed batch is enough.
        result = measure(image_size, width, batch, 1 if is_paper else timed_batches, device)
        paper = paper or result
        note = (
            f"  (ran at batch {result['run_batch']}: batch {batch} needs ~{result['activation_gb_at_batch']:.0f} GB of activations)"
            if result["run_batch"] < batch
            else ""
        )
        rate = result["median_samples_per_s"]
        print(
            f"{image_size:>5} {width:>5} {batch:>5} {result['parameters'] / 1e6:>7.2f}M {result['flops'] / 1e9:>12.3f} "
            f"{rate:>16.1f} {result['best_samples_per_s']:>6.1f} {TARGET_CELLS / rate:>11.0f} "
            f"{paper['flops'] / result['flops']:>9.1f}x {rate / paper['median_samples_per_s']:>10.1f}x{note}",
            flush=True,
        )
    print(
        "s/10k cells and speed ratio use the median; FLOP ratio: the paper setting's forward FLOPs / this one's; speed ratio: samples/s / the paper setting's."
    )


if __name__ == "__main__":
    main()
