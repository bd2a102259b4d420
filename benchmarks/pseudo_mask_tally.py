"""Which images the detector's label-free training keeps, tallied by class, on the real triangle.

``aecfe train`` without ``--annotations`` trains the detector on pseudo-masks (``pseudo_labels``): an image
is kept only when its stain segmentation finds cells and every one of them is plausible (solid, not many
times its nucleus), since an unlabelled real cell would teach "background". If irregular cells are
dropped more often, the detector sees fewer of them. This counts, per lab and class, the images kept and
why the others were dropped (the first reason that applies, in this order: no nucleus found, more than
one candidate of which one is implausible, a candidate not solid, a candidate many times its nucleus).
The last column counts the dropped images that every candidate cut to its solid part
(``pseudo_labels.solid_part``, what ``extract.cut_red_cells`` does to the morphology's mask) would make
plausible: what the detector's training would gain if it cut its pseudo-masks the same way.

    python benchmarks/pseudo_mask_tally.py [--scratch /tmp/aecfe-accuracy] [--out docs/pseudo_masks.md]

Skips cleanly (exit 0, one line) when ``../shared/data`` is absent.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from accuracy import DATA, machine_description, prepare_labs  # noqa: E402
from aecfe_cli.images import UnreadableImage, load_rgb  # noqa: E402
from aecfe_cli.pseudo_labels import MAX_CELL_TO_NUCLEUS, MIN_SOLIDITY, segment_cells, solid_candidate, solidity  # noqa: E402

OUTCOMES = ("kept", "unreadable", "no nucleus", "several, one implausible", "not solid", "too large")
RESCUED = "kept if cut to the solid part"


def outcome(path: str) -> tuple[str, bool]:
    """What ``pseudo_labels.pseudo_samples`` does with one image, and why; and whether a dropped image would be
    kept with every candidate cut to its solid part."""
    try:
        image = load_rgb(Path(path))
    except UnreadableImage:
        return "unreadable", False
    candidates = segment_cells(image)
    if not candidates:
        return "no nucleus", False
    if all(c.plausible for c in candidates):
        return "kept", False
    rescued = all(solid_candidate(c).plausible for c in candidates)
    if len(candidates) > 1:
        return "several, one implausible", rescued
    cell = candidates[0]
    if solidity(cell.mask) < MIN_SOLIDITY:
        return "not solid", rescued
    assert cell.mask.sum() > MAX_CELL_TO_NUCLEUS * cell.nucleus.sum()
    return "too large", rescued



def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/aecfe-accuracy"), help="prepared lab lists")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "pseudo_masks.md")
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"skipped: {DATA} is absent")
        return 0
    labs = prepare_labs("real", args.scratch / "data", per_class=0)
    lines = ["# Pseudo-mask training images kept, by class", "",
             f"`python benchmarks/pseudo_mask_tally.py`, {time.strftime('%Y-%m-%d')}, {machine_description()}. "
             "Every image of each lab; an image the detector's label-free training drops is counted under "
             "the first reason that applies (see the script's docstring).", ""]
    for name, settings in labs.items():
        with open(settings["root"], newline="") as handle:
            rows = list(csv.DictReader(handle))
        tally: dict[str, Counter] = defaultdict(Counter)
        for row in rows:
            reason, rescued = outcome(row["path"])
            tally[row["label"]][reason] += 1
            tally[row["label"]][RESCUED] += rescued
        total = sum(tally.values(), Counter())
        lines += [f"## {name} ({len(rows)} images)", "",
                  "| class | images | kept | " + " | ".join(OUTCOMES[1:]) + f" | {RESCUED} |",
                  "|---|---|---|" + "---|" * len(OUTCOMES)]
        for label, counts in sorted(tally.items()) + [("all", total)]:
            images = sum(counts[o] for o in OUTCOMES)
            cut = counts["kept"] + counts[RESCUED]
            lines.append(f"| {label} | {images} | {counts['kept']} ({counts['kept'] / images:.0%}) | "
                         + " | ".join(str(counts[o]) for o in OUTCOMES[1:])
                         + f" | {counts[RESCUED]} (kept then {cut / images:.0%}) |")
        lines.append("")
        print("\n".join(lines[-len(tally) - 5:]), flush=True)
    temporary = args.out.with_suffix(".md.tmp")
    temporary.write_text("\n".join(lines))
    temporary.replace(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
