"""Every benchmark of aecfe in one run; writes docs/benchmarks.md (and, with --json, the raw numbers).

    python benchmarks/run.py [--quick] [--out docs/benchmarks.md] [--json PATH] [--only PART,...] [--cache DIR]

Parts (each isolated: one that fails is reported in the output and the others still run):

* machine   CPU model, cores, vector extensions, clock, memory, library versions, OMP_WAIT_POLICY, load
            average at start and end; the theoretical float32 peak: cores x clock x FMA units x float32
            lanes x 2 (see ``theoretical_peak``), the denominator of every "fraction of peak".
* peak      the best measured kernels, next to it: float32 ``torch.mm`` 2048x2048 and a 3x3 256->256
            convolution on 4 x 64x64 (the detector's bulk) on all threads, at the start and the end of the run.
* detect    images/s of ``detector.detect`` on synthetic 360x363 cells (the PBC size), CPU default
            (``build_detector()``: ResNet-18-FPN at 256 px) against the paper's configuration (torchvision
            ResNet-50-FPN at 900 px), in interleaved rounds; FLOPs per image (= per cell: one cell per
            image) counted by FlopCounterMode while detecting the timed images, at the size the model runs
            at. benchmarks/detect_speed.py runs it alone, on PBC images if present.
* train     samples/s of one Adam step per batch, CPU default (image 32, width 0.5, batch 128) against the
            paper's (image 128, width 1, batch 500, or the largest batch that fits), with
            ``benchmarks/train_speed.py``'s ``measure()``; FLOPs of a whole step (forward, loss, backward)
            counted by FlopCounterMode.
* extract   cells/s of ``model.encode(scale_features(x))`` in batches of 512 on stored-format (float16)
            256x14x14 features, as the extract stage does, for both models' encoders, interleaved; FLOPs
            counted by FlopCounterMode on one such batch.
* evaluate  seconds of ``run_evaluation`` (random forest, no baselines) on 10,000 x 50 source + 10,000 x 50
            target features (benchmarks/evaluate_speed.py's generator). Both configurations feed the
            same 50-d features to the same classifier, so this stage is measured once.
* memory    peak resident memory of ``aecfe detect`` and ``aecfe extract`` subprocesses at 1,000 and 10,000
            images (--quick: 200 and 1,000) of synthetic 128 px cells, with ``/usr/bin/time -v`` (else
            ``getrusage`` of a fresh child; see benchmarks/memory.py); the larger size must stay within
            1.2x the smaller. The detector (128 px) is trained once on 64 of the cells and cached.

--quick (a before-and-after check of a change) finishes in under 5 minutes on a quiet 2-core machine and
prints its report without touching docs/benchmarks.md, the reference of full runs (--out FILE keeps it);
the full run about 20 minutes there (measured 2026-11-25: 18 min with a cold cache, 16 min warm). The memory
part's synthetic images and detector are cached (default: a folder in the system temp dir, outside the
repository; --cache DIR to choose) and reused by later runs.
"""

from __future__ import annotations

import os

# Idle OpenMP threads must sleep, not spin: on a shared machine spinning threads waiting for a
# descheduled partner make every parallel region many times slower. Set before torch is imported;
# the aecfe subprocesses of the memory part inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import datetime  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
sys.path.insert(0, str(ROOT))
sys.path.insert(1, str(BENCHMARKS))

from machine import kernel_peak, machine_info  # noqa: E402
from run_report import derived, markdown  # noqa: E402
from run_settings import (  # noqa: E402
    DEFAULT_CACHE,
    DEFAULT_OUT,
    DEFAULT_TRAIN,
    DETECTOR_TRAINING,
    EVALUATE_CELLS,
    EVALUATE_DIMENSION,
    EXTRACT_BATCH,
    FLAT_LIMIT,
    IMAGE_HW,
    MEMORY_DOMAIN,
    MEMORY_IMAGE_SIZE,
    MEMORY_SEED,
    PAPER_TRAIN,
    SELECTABLE,
    SETTINGS,
)


def detector_training_config() -> str:
    return (f"detect:\n  min_size: {MEMORY_IMAGE_SIZE}\n  max_size: {MEMORY_IMAGE_SIZE}\n"
            f"  train_images: {DETECTOR_TRAINING['train_images']}\n  train_epochs: {DETECTOR_TRAINING['train_epochs']}\n"
            f"  train_steps: {DETECTOR_TRAINING['train_steps']}\n"
            f"runtime:\n  seed: {MEMORY_SEED}\n")


def memory_config(weights: Path, quick: bool) -> str:
    """The config of every measured run (the same for both sizes)."""
    lines = [
        "# Small images keep 10,000 of them feasible on 2 cores: flatness is about streaming, not detector size.",
        "detect:",
        f"  min_size: {MEMORY_IMAGE_SIZE}",
        f"  max_size: {MEMORY_IMAGE_SIZE}",
        f"  weights: {json.dumps(str(weights))}   # trained once on these synthetic cells, cached",
    ]
    if quick:
        lines.append("  chunk_images: 64   # --quick: both sizes hold several full chunks (default 256)")
    lines += ["train:", "  epochs: 1"]
    if quick:
        lines += ["extract:", "  batch_size: 128   # --quick: both sizes hold several full batches (default 512)"]
    lines += ["runtime:", f"  seed: {MEMORY_SEED}"]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# Helpers


def load_average() -> list[float]:
    return [round(value, 2) for value in os.getloadavg()] if hasattr(os, "getloadavg") else []


def now_utc() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def say(message: str) -> None:
    print(message, flush=True)


def run_part(name: str, function, results: dict, *args) -> None:
    """Run one part; an exception is recorded (and printed) instead of ending the run."""
    started = time.perf_counter()
    record = {"load_start": load_average()}
    say(f"\n== {name} (load average {', '.join(map(str, record['load_start']))})")
    try:
        record.update(function(*args))
        record["ok"] = True
    except Exception as exc:  # noqa: BLE001  (isolation is the point)
        record["ok"] = False
        record["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
        say(f"!! {name} failed: {record['error']}")
        traceback.print_exc(file=sys.stdout)
    record["seconds"] = round(time.perf_counter() - started, 1)
    record["load_end"] = load_average()
    say(f"== {name} done in {record['seconds']} s")
    results[name] = record


# ---------------------------------------------------------------------------------------------------
# detect


def synthetic_pbc_images(count: int) -> list[np.ndarray]:
    """Seeded synthetic single-cell images at the PBC size, cycling through classes and domains."""
    from aecfe_cli import synth

    domains = list(synth.DOMAINS)
    images = []
    for index in range(count):
        cls = synth.CLASSES[index % len(synth.CLASSES)]
        style = synth.DOMAINS[domains[index % len(domains)]]
        square = synth.render_cell_image(cls, style, np.random.default_rng(1000 + index), max(IMAGE_HW))
        images.append(np.ascontiguousarray(square[: IMAGE_HW[0], : IMAGE_HW[1]]))
    return images


def bench_detect(settings: dict, images: list[np.ndarray] | None = None) -> dict:
    """Both detectors on ``images`` (default: synthetic cells at the PBC size) in interleaved rounds."""
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    from aecfe_cli import detector as net

    torch.manual_seed(0)
    if images is None:
        images = synthetic_pbc_images(max(settings["detect_default"], settings["detect_paper"]))
    paper = maskrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=2, min_size=900, max_size=900)
    configs = {
        "default": {"label": "build_detector(): ResNet-18-FPN at 256 px", "model": net.build_detector(),
                    "per_round": settings["detect_default"]},
        "paper": {"label": "torchvision maskrcnn_resnet50_fpn at 900 px", "model": paper,
                  "per_round": settings["detect_paper"]},
    }
    for key, config in configs.items():
        model = config["model"].eval()
        model.roi_heads.detections_per_img = 1  # one cell per image, whatever the untrained scores
        net.detect(model, images[:1], "cpu", score_threshold=0.0)  # warm-up: allocator, kernels
        config["flops"], config["input_hw"] = executed_flops(model, images[:config["per_round"]])
        config["seconds"], config["images"], config["round_rates"] = 0.0, 0, []
    # Interleaved rounds: both configurations see the same stretch of machine load.
    for _ in range(settings["detect_rounds"]):
        for key, config in configs.items():
            count = config["per_round"]
            started = time.perf_counter()
            found = net.detect(config["model"], images[:count], "cpu", score_threshold=0.0)
            seconds = time.perf_counter() - started
            if not all(len(f) == 1 for f in found):
                raise RuntimeError("each image must carry exactly one detection")
            config["seconds"] += seconds
            config["images"] += count
            config["round_rates"].append(round(count / seconds, 3))
    out = {"image_hw": list(IMAGE_HW), "rounds": settings["detect_rounds"]}
    for key, config in configs.items():
        rate = config["images"] / config["seconds"]
        out[key] = {"label": config["label"], "images": config["images"], "seconds": round(config["seconds"], 2),
                    "rate": round(rate, 3), "round_rates": config["round_rates"], "flops": config["flops"],
                    "input_hw": config["input_hw"]}
        say(f"{key:8s} {config['label']:45s} {rate:7.3f} images/s  {config['flops'] / 1e9:7.1f} GFLOP/image "
            f"at {config['input_hw'][0]}x{config['input_hw'][1]} ({config['images']} images)")
    return out


def executed_flops(model, images: list[np.ndarray]) -> tuple[float, list[int]]:
    """FLOPs per image of ``detector.detect`` on exactly the images a round times (the proposals that reach
    the box head depend on the image), counted by FlopCounterMode, and the (padded) size the network runs
    at after the model's own resizing, seen by a hook on the backbone."""
    from torch.utils.flop_counter import FlopCounterMode

    from aecfe_cli import detector as net

    sizes = []
    hook = model.backbone.register_forward_pre_hook(lambda module, inputs: sizes.append(list(inputs[0].shape[-2:])))
    try:
        with FlopCounterMode(display=False) as counter:
            net.detect(model, images, "cpu", score_threshold=0.0)
    finally:
        hook.remove()
    return counter.get_total_flops() / len(images), max(sizes)


# ---------------------------------------------------------------------------------------------------
# train


def bench_train(settings: dict) -> dict:
    import train_speed

    device = torch.device("cpu")
    paper_batch = PAPER_TRAIN["batch"] if not settings["quick"] else train_speed.QUICK_PAPER_BATCH
    d = DEFAULT_TRAIN
    p = PAPER_TRAIN
    runs = {"default": [], "paper": []}
    runs["default"].append(train_speed.measure(d["image_size"], d["width"], d["batch"], settings["train_timed"], device))
    # The paper's setting is ~20x slower per sample; one timed batch is enough (as in train_speed.py).
    runs["paper"].append(train_speed.measure(p["image_size"], p["width"], paper_batch, 1, device))
    if settings["train_sandwich"]:  # default again after the paper: both sides of the long paper batch
        runs["default"].append(train_speed.measure(d["image_size"], d["width"], d["batch"], settings["train_timed"], device))
    out = {"memory_fraction": train_speed.MEMORY_FRACTION}
    for key, config, asked in (("default", d, d["batch"]), ("paper", p, paper_batch)):
        measured = runs[key]
        rate = statistics.mean(m["median_samples_per_s"] for m in measured)
        out[key] = {
            "label": f"image {config['image_size']}, width {config['width']:g}, batch {asked}",
            "image_size": config["image_size"], "width": config["width"], "batch_asked": asked,
            "batch_run": measured[0]["run_batch"], "rate": round(rate, 3),
            "rates": [round(m["median_samples_per_s"], 3) for m in measured],
            "best": round(max(m["best_samples_per_s"] for m in measured), 3),
            "flops": measured[0]["step_flops"], "forward_flops": measured[0]["flops"],
            "parameters": measured[0]["parameters"],
            "activation_gb_at_batch": round(measured[0]["activation_gb_at_batch"], 2),
        }
        note = f" (ran at batch {out[key]['batch_run']})" if out[key]["batch_run"] < asked else ""
        say(f"{key:8s} {out[key]['label']:35s} {rate:8.2f} samples/s  {out[key]['flops'] / 1e9:6.3f} GFLOP/sample "
            f"per step{note}")
    return out


# ---------------------------------------------------------------------------------------------------
# extract


def bench_extract(settings: dict) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from aecfe_cli import autoencoder as ae

    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(4)
    # Two stored-format batches (float16, as detect writes them), cycled: realistic without 1 GB of RAM.
    pool = [torch.randn(EXTRACT_BATCH, 256, 14, 14, generator=generator).half() for _ in range(2)]
    configs = {}
    for key, config in (("default", DEFAULT_TRAIN), ("paper", PAPER_TRAIN)):
        model = ae.AECFE(image_size=config["image_size"], width=config["width"]).eval()
        configs[key] = {"model": model, "seconds": 0.0, "cells": 0,
                        "label": f"encoder of width {config['width']:g} (image {config['image_size']} model)"}

    def encode(model, block):
        return model.encode(ae.scale_features(block.float())).cpu().numpy()

    with torch.inference_mode():
        for config in configs.values():
            encode(config["model"], pool[0][:64])  # warm-up
            with FlopCounterMode(display=False) as counter:
                encode(config["model"], pool[0])
            config["flops"] = counter.get_total_flops() / len(pool[0])
        for index in range(settings["extract_batches"]):  # interleaved, batch by batch
            block = pool[index % len(pool)]
            for config in configs.values():
                started = time.perf_counter()
                encode(config["model"], block)
                config["seconds"] += time.perf_counter() - started
                config["cells"] += len(block)
    out = {"batch": EXTRACT_BATCH}
    for key, config in configs.items():
        rate = config["cells"] / config["seconds"]
        out[key] = {"label": config["label"], "cells": config["cells"], "seconds": round(config["seconds"], 2),
                    "rate": round(rate, 1), "flops": config["flops"]}
        say(f"{key:8s} {config['label']:40s} {rate:8.1f} cells/s  {config['flops'] / 1e6:7.1f} MFLOP/cell "
            f"({config['cells']} cells)")
    return out


# ---------------------------------------------------------------------------------------------------
# evaluate


def bench_evaluate(settings: dict) -> dict:
    import evaluate_speed

    from aecfe_cli.evaluate import run_evaluation

    if evaluate_speed.DIMENSION != EVALUATE_DIMENSION:
        raise RuntimeError(f"evaluate_speed.DIMENSION is {evaluate_speed.DIMENSION}, expected {EVALUATE_DIMENSION}")
    source = evaluate_speed.class_structured_cells("source", EVALUATE_CELLS, seed=1, shift=0.0, stretch=1.0)
    target = evaluate_speed.class_structured_cells("target", EVALUATE_CELLS, seed=2, shift=0.3, stretch=1.2)
    seconds = []
    for _ in range(settings["evaluate_reps"]):
        with tempfile.TemporaryDirectory() as out_dir:
            started = time.perf_counter()
            report = run_evaluation(source, [target], Path(out_dir), baselines=False)
            seconds.append(time.perf_counter() - started)
    median = statistics.median(seconds)
    say(f"run_evaluation, {EVALUATE_CELLS:,} + {EVALUATE_CELLS:,} cells x {EVALUATE_DIMENSION}: {median:.2f} s "
        f"(median of {len(seconds)}); in-domain accuracy {report['in_domain']['accuracy']:.3f}")
    # (not "seconds": run_part records each part's own wall time under that key)
    return {"cells": EVALUATE_CELLS, "dimension": EVALUATE_DIMENSION, "evaluation_seconds": round(median, 2),
            "all_seconds": [round(s, 2) for s in seconds], "in_domain_accuracy": report["in_domain"]["accuracy"],
            "cross_domain_accuracy": report["targets"]["target"]["accuracy"]}


# ---------------------------------------------------------------------------------------------------
# memory


def aecfe_command() -> list[str]:
    script = Path(sys.executable).with_name("aecfe")
    if script.is_file():
        return [str(script)]
    found = shutil.which("aecfe")
    return [found] if found else [sys.executable, "-m", "aecfe_cli"]


def run_checked(command: list[str], timeout: float) -> None:
    """Run an unmeasured step; a failure raises with the last lines of its output."""
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}: {' | '.join(tail)}")


def code_digest(*modules: str) -> str:
    digest = hashlib.sha256()
    for module in modules:
        digest.update((ROOT / "aecfe_cli" / f"{module}.py").read_bytes())
    return digest.hexdigest()[:16]


def cached_cells(cache: Path, per_class: int) -> Path:
    """A folder-layout dataset of ``6 x per_class`` synthetic 128 px cells: hard links (or copies) of the
    first images of a cached pool, which is (re)generated only when it is smaller than needed. Image i
    of a class depends only on (seed, domain, class, i), so every view of the pool is the same data."""
    from aecfe_cli import synth

    pool = cache / "pool"
    marker = pool / "complete.json"
    wanted = {"domain": MEMORY_DOMAIN, "seed": MEMORY_SEED, "size": MEMORY_IMAGE_SIZE, "synth": code_digest("synth")}
    current = json.loads(marker.read_text()) if marker.is_file() else {}
    if {k: current.get(k) for k in wanted} != wanted or current.get("per_class", 0) < per_class:
        say(f"generating {per_class * len(synth.CLASSES):,} synthetic {MEMORY_IMAGE_SIZE} px cells into {pool} "
            "(cached for later runs)")
        started = time.perf_counter()
        # Only what this script made is removed: the pool and the views that link into it.
        shutil.rmtree(pool, ignore_errors=True)
        for view in cache.glob("cells_*"):
            shutil.rmtree(view, ignore_errors=True)
        synth.write_cell_dataset(pool / "images", MEMORY_DOMAIN, per_class, MEMORY_SEED, size=MEMORY_IMAGE_SIZE)
        marker.write_text(json.dumps({**wanted, "per_class": per_class}))
        say(f"  generated in {time.perf_counter() - started:.0f} s")
    expected = per_class * len(synth.CLASSES)
    view = cache / f"cells_{expected}"
    if not view.is_dir() or sum(1 for _ in view.glob("*/*.png")) != expected:
        shutil.rmtree(view, ignore_errors=True)
        for cls in synth.CLASSES:
            (view / cls).mkdir(parents=True)
            for index in range(per_class):
                name = f"{MEMORY_DOMAIN}_{cls}_{index:04d}.png"
                try:
                    os.link(pool / "images" / cls / name, view / cls / name)
                except OSError:
                    shutil.copy2(pool / "images" / cls / name, view / cls / name)
    return view


def cached_detector(cache: Path, aecfe: list[str]) -> tuple[Path, str]:
    """Weights of a detector trained with ``aecfe detect`` on a few of the synthetic cells (once per cache
    and code version); returns the weights file and how it was obtained."""
    folder = cache / "detector"
    weights = folder / "model.pt"
    marker = folder / "complete.json"
    wanted = {"config": detector_training_config(), "per_class": DETECTOR_TRAINING["per_class"],
              "code": code_digest("synth", "detector", "detect")}
    if weights.is_file() and marker.is_file() and json.loads(marker.read_text()) == wanted:
        return weights, f"reused from the cache ({weights})"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(detector_training_config())
    data = cached_cells(cache, DETECTOR_TRAINING["per_class"])
    say(f"training the memory part's detector on {DETECTOR_TRAINING['train_images']} synthetic cells, "
        f"{DETECTOR_TRAINING['train_epochs']} epochs (cached for later runs)")
    started = time.perf_counter()
    command = [*aecfe, "--quiet", "--workdir", str(folder / "work"), "--config", str(folder / "config.yaml"),
               "detect", "--data", str(data)]
    run_checked(command, timeout=3600)
    shutil.copy2(folder / "work" / "detector" / "model.pt", weights)
    marker.write_text(json.dumps(wanted))
    seconds = time.perf_counter() - started
    say(f"  trained in {seconds:.0f} s")
    return weights, f"trained in this run in {seconds:.0f} s"


def bench_memory(settings: dict, cache: Path) -> dict:
    import memory

    from aecfe_cli import synth

    timer = memory.gnu_time()
    tool = memory.tool_description(timer)
    say(f"peak RSS measured with {tool}")
    aecfe = aecfe_command()
    sizes = settings["memory_sizes"]
    per_class = [math.ceil(size / len(synth.CLASSES)) for size in sizes]
    cached_cells(cache, max(per_class))  # the largest first: the pool is generated once
    views = [cached_cells(cache, n) for n in per_class]
    weights, detector_how = cached_detector(cache, aecfe)
    config_text = memory_config(weights, settings["quick"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="aecfe-bench-memory-") as scratch:
        scratch = Path(scratch)
        config = scratch / "memory_config.yaml"
        config.write_text(config_text)
        for size, view in zip(sizes, views):
            workdir = scratch / f"work_{view.name}"
            base = [*aecfe, "--quiet", "--workdir", str(workdir), "--config", str(config)]
            detect = memory.measure([*base, "detect", "--data", str(view)], scratch / f"detect_{size}.log", timer)
            manifest = json.loads((workdir / "detect" / view.name / "manifest.json").read_text())
            # One training epoch is the prerequisite of extract; it is not measured.
            run_checked([*base, "train", "--data", str(view)], timeout=4 * 3600)
            extract = memory.measure([*base, "extract", "--data", str(view)], scratch / f"extract_{size}.log", timer)
            row = {"images": manifest["counts"]["images"], "cells": manifest["counts"]["cells"],
                   "detect_images_per_second": manifest["timings"].get("images_per_second"),
                   "detect": detect, "extract": extract}
            rows.append(row)
            say(f"{row['images']:>6,} images ({row['cells']:,} cells): detect {detect['peak_rss_mb']:7.0f} MB "
                f"(anon {detect['anon_mb']}) in {detect['seconds']:5.0f} s, extract {extract['peak_rss_mb']:7.0f} MB "
                f"(anon {extract['anon_mb']}) in {extract['seconds']:4.0f} s")
    ratios, anon_ratios = {}, {}
    for stage in ("detect", "extract"):
        ratios[stage] = round(rows[-1][stage]["peak_rss_mb"] / rows[0][stage]["peak_rss_mb"], 3)
        if rows[0][stage]["anon_mb"] and rows[-1][stage]["anon_mb"]:
            anon_ratios[stage] = round(rows[-1][stage]["anon_mb"] / rows[0][stage]["anon_mb"], 3)
        say(f"{stage}: peak RSS ratio {ratios[stage]:.3f} "
            f"({'flat' if ratios[stage] <= FLAT_LIMIT else 'NOT flat'}, limit {FLAT_LIMIT})")
    return {"tool": tool, "rows": rows, "ratios": ratios, "anon_ratios": anon_ratios, "config": config_text,
            "detector": detector_how, "detector_training_config": detector_training_config(),
            "command": "aecfe" if len(aecfe) == 1 else "python -m aecfe_cli"}


# ---------------------------------------------------------------------------------------------------
# Command line


def report_path(quick: bool, partial: bool, out: Path | None) -> Path | None:
    """Where the markdown report goes. docs/benchmarks.md is the committed reference: only a full run of
    every part writes it by default, and a --quick or --only run may not overwrite it (it prints its
    report, or writes it to another --out)."""
    if out is not None and (quick or partial) and out.resolve() == DEFAULT_OUT.resolve():
        raise ValueError(f"{out} is the reference of full runs; a --quick or --only run prints its report, or "
                         "writes it to another --out FILE")
    if out is not None:
        return out
    return None if quick or partial else DEFAULT_OUT


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repetitions (< 5 min)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"markdown report (default {DEFAULT_OUT.relative_to(ROOT)}; with --quick or --only: "
                             "none, the report is printed)")
    parser.add_argument("--json", type=Path, default=None, help="also write every number to this JSON file")
    parser.add_argument("--only", default=None, help=f"comma-separated parts to run: {', '.join(SELECTABLE)}")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help="folder for the memory part's synthetic images, reused between runs")
    parser.add_argument("--clock-ghz", type=float, default=None,
                        help="the CPU's maximum clock, for the theoretical peak where cpufreq does not give it")
    args = parser.parse_args()
    selected = list(SELECTABLE)
    if args.only:
        selected = [part.strip() for part in args.only.split(",") if part.strip()]
        unknown = sorted(set(selected) - set(SELECTABLE))
        if unknown:
            parser.error(f"unknown part(s) {unknown}; choose from {', '.join(SELECTABLE)}")
    try:
        out = report_path(args.quick, bool(args.only), args.out)
    except ValueError as exc:
        parser.error(str(exc))
    settings = {**SETTINGS["quick" if args.quick else "full"], "quick": args.quick}

    started = time.perf_counter()
    meta = {"quick": args.quick, "started": now_utc(), "load_start": load_average(),
            "command": "python benchmarks/run.py" + (" --quick" if args.quick else "")
            + (f" --only {','.join(selected)}" if args.only else "")}
    say(f"aecfe benchmarks ({'quick' if args.quick else 'full'}), {meta['started']}, load average "
        f"{', '.join(map(str, meta['load_start']))}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}")
    results: dict = {}
    run_part("machine", machine_info, results, args.clock_ghz)
    run_part("peak", kernel_peak, results, settings["matmul_reps"])
    functions = {"detect": bench_detect, "train": bench_train, "extract": bench_extract, "evaluate": bench_evaluate}
    for name in SELECTABLE:
        if name not in selected:
            continue
        if name == "memory":
            run_part(name, bench_memory, results, settings, args.cache)
        else:
            run_part(name, functions[name], results, settings)
    run_part("peak_end", kernel_peak, results, settings["matmul_reps"])
    meta.update({"finished": now_utc(), "load_end": load_average(), "wall_seconds": time.perf_counter() - started})

    text = markdown(results, meta)
    say("\n" + text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        say(f"wrote {out}")
    else:
        say(f"(report printed above, not written: {DEFAULT_OUT.relative_to(ROOT)} keeps the full run's reference; "
            "--out FILE writes it)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": meta, "settings": settings, "results": results, "derived": derived(results)}
        args.json.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
        say(f"wrote {args.json}")
    say(f"total wall time {meta['wall_seconds']:.0f} s")
    return 0 if all(part.get("ok") for part in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
