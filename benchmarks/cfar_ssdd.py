"""The CFAR engine on SSDD (issue 9): tune on the train split, report on the test split.

Data: ``../shared/data/ssdd`` (VOC layout; ``ImageSets/Main/train.txt``: 913 images, ``test.txt``: 222
images; see its SOURCE.txt). It may not be committed: this script reads it in place.

What is measured (:mod:`fusarbatch.engines.cfar`, scored by the product's own detection scorer,
:func:`training.metrics.detection_metrics`: greedy one-to-one matching, precision/recall/F1 over all
boxes of the split, at IoU 0.5 and 0.25):

1. **Tuning, train split only.** A small grid over the guard / background windows, the threshold ``k``,
   the closing size and the minimum area (the statistic is computed once per window set; thresholds,
   closings and areas are swept on it), on the chips at their own pixel size, intensity = grey value
   (:func:`image_to_linear`). The parameters with the best train F1 at IoU 0.5 are chosen. Single-factor
   checks on train go with them: grey value squared as intensity, no morphology, other pre-filters.
2. **Test split, once, with the chosen parameters and with the reference ones** (guard 61, background
   121, k 6, min area 20; SSDD's SOURCE.txt measured F1 0.479 with them on the original 232-image
   split), on three inputs: ``native`` (the chip at its own size), ``grid`` (the chip rendered to the
   504 x 504 model input, as ``fusarbatch eval`` reads its records, :func:`training.builders.render_chip`,
   then resampled back to its own size by ``detect_chip(native_size=...)``: the call ``eval`` makes) and
   ``grid-as-is`` (the rendered chip, not resampled).

Boxes of both sides are clipped to the chip and scaled per axis to the 504 grid before scoring
(:func:`training.builders._clip_scale`, as the dataset builder does; IoU does not change under the
scaling), so the numbers are on the footing of ``fusarbatch eval``'s detection scores.

Usage: ``OMP_NUM_THREADS=1 python benchmarks/cfar_ssdd.py [--data DIR] [--quick] [--no-write]``.
``--quick`` tunes on every 4th train image. Results go to stdout and to ``benchmarks/RESULTS.md``,
section "CFAR on SSDD" (other sections are left as they are).
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))
from results_md import write_section  # noqa: E402  (benchmarks/results_md.py)

from fusarbatch.engines.cfar import (  # noqa: E402
    CHIP_PARAMS,
    SCORE_HALF,
    CfarBox,
    CfarParams,
    boxes_from_statistic,
    cfar_statistic,
    detect_chip,
    image_to_linear,
)
from fusarbatch.model.prompts import GRID, Box  # noqa: E402
from training.builders import Chip, _clip_scale, read_voc, render_chip  # noqa: E402
from training.metrics import detection_metrics  # noqa: E402

RESULTS = HERE / "RESULTS.md"
SECTION = "## CFAR on SSDD"
#: ``shared/data/ssdd`` beside the repository (or beside a folder above it: git worktrees)
DEFAULT_DATA = next(
    (d for p in HERE.parent.parents if (d := p / "shared" / "data" / "ssdd").is_dir()),
    HERE.parent.parent / "shared" / "data" / "ssdd",
)
REFERENCE = CfarParams(guard=61, background=121, k=6.0, prefilter=3, min_area=20, open_size=3, close_size=3)

#: The tuning grid: (guard, background, prefilter) window sets x thresholds x closing sizes x minimum areas
#: (opening 3 x 3 throughout). The minimum area is the last step, so it is applied to one set of boxes.
WINDOWS = [(61, 121, 3), (81, 161, 3), (101, 201, 3), (121, 241, 3)]
KS = (3.0, 4.0, 5.0)
CLOSES = (3, 7)
MIN_AREAS = (20, 40, 80, 120)


@dataclasses.dataclass
class Sample:
    id: str
    grey: np.ndarray
    """(y, x) uint8, the chip as PIL's convert("L") gives it."""
    truth: tuple[Box, ...]
    """Ground truth on the 504 grid."""
    path: Path
    boxes: tuple[Box, ...]
    """Ground truth in chip pixels."""


def load_split(data: Path, split: str, every: int = 1) -> list[Sample]:
    ids = (data / "ImageSets" / "Main" / f"{split}.txt").read_text().split()[::every]
    out = []
    for i in ids:
        width, height, boxes = read_voc(data / "Annotations" / f"{i}.xml")
        path = data / "JPEGImages" / f"{i}.jpg"
        with Image.open(path) as im:
            grey = np.asarray(im.convert("L"))
        if grey.shape != (height, width):
            width, height = grey.shape[1], grey.shape[0]
        out.append(Sample(i, grey, _clip_scale(boxes, width, height, GRID), path, tuple(boxes)))
    return out


def to_grid(boxes: Sequence[CfarBox], width: int, height: int) -> tuple[Box, ...]:
    return _clip_scale([Box("ship", b.x1, b.y1, b.x2, b.y2) for b in boxes], width, height, GRID)


def score(preds: Sequence[Sequence[Box]], samples: Sequence[Sample]) -> dict[str, dict[str, float]]:
    m = detection_metrics(list(preds), [s.truth for s in samples], (0.25, 0.5), GRID)
    return {thr: m[f"iou_{thr}"]["overall"] for thr in ("0.5", "0.25")}


def sweep(
    samples: Sequence[Sample],
    windows: Sequence[tuple[int, int, int]],
    ks: Sequence[float],
    closes: Sequence[int] = CLOSES,
    areas: Sequence[int] = MIN_AREAS,
    square: bool = False,
) -> list[tuple[CfarParams, dict[str, dict[str, float]]]]:
    """Every combination on ``samples`` (native chips); ``square``: grey value squared as intensity."""
    rows = []
    for guard, background, prefilter in windows:
        base = CfarParams(guard=guard, background=background, prefilter=prefilter)
        t0 = time.perf_counter()
        stats = []
        for s in samples:
            x = image_to_linear(s.grey)
            stats.append(cfar_statistic(x * x if square else x, base))
        done = []
        for k in ks:
            for close in closes:
                p = dataclasses.replace(base, k=k, close_size=close, min_area=1)
                found = [boxes_from_statistic(t, p) for t in stats]
                for area in areas:
                    preds = [
                        to_grid([b for b in bs if b.area >= area], s.grey.shape[1], s.grey.shape[0])
                        for bs, s in zip(found, samples, strict=True)
                    ]
                    done.append((dataclasses.replace(p, min_area=area), score(preds, samples)))
        best = max(done, key=lambda r: r[1]["0.5"]["f1"])
        print(
            f"  windows {guard}/{background} prefilter {prefilter}: best train F1@0.5 "
            f"{best[1]['0.5']['f1']:.3f} at k {best[0].k:g}, close {best[0].close_size}, "
            f"min area {best[0].min_area} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
        rows += done
    return rows


def predict(samples: Sequence[Sample], params: CfarParams, how: str) -> tuple[list[tuple[Box, ...]], float]:
    """Boxes on the grid per sample and seconds per image. ``how``: ``native`` (the chip at its own size),
    ``grid`` (the chip rendered to the 504 model input, as ``eval`` reads it, resampled back to its own
    size by ``detect_chip(native_size=...)``) or ``grid-as-is`` (the rendered chip, not resampled)."""
    t0 = time.perf_counter()
    preds = []
    for s in samples:
        height, width = s.grey.shape
        if how == "native":
            preds.append(to_grid(detect_chip(s.grey, params), width, height))
            continue
        image, _ = render_chip(Chip(id=s.id, path=s.path, split="test", coarse="ship", boxes=s.boxes), GRID)
        native = (width, height) if how == "grid" else None
        preds.append(to_grid(detect_chip(image, params, native_size=native), GRID, GRID))
    return preds, (time.perf_counter() - t0) / max(1, len(samples))


def fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.3f}"


def row(name: str, m: dict[str, dict[str, float]], extra: str = "") -> str:
    a, b = m["0.5"], m["0.25"]
    return (
        f"| {name} | {fmt(a['precision'])} | {fmt(a['recall'])} | {fmt(a['f1'])} "
        f"| {fmt(b['precision'])} | {fmt(b['recall'])} | {fmt(b['f1'])} | {a['tp'] + a['fp']} |{extra}"
    )


def describe(p: CfarParams) -> str:
    return (
        f"guard {p.guard} px, background {p.background} px, k {p.k:g}, {p.prefilter}x{p.prefilter} mean "
        f"pre-filter, open {p.open_size} / close {p.close_size}, min area {p.min_area} px"
    )


def write_results(section: str) -> None:
    write_section(SECTION, section, RESULTS)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--quick", action="store_true", help="tune on every 4th train image")
    ap.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = ap.parse_args(argv)
    if not (args.data / "ImageSets" / "Main" / "test.txt").is_file():
        print(f"--data {args.data}: no ImageSets/Main/test.txt; give the SSDD folder", file=sys.stderr)
        return 2
    t_start = time.perf_counter()
    train = load_split(args.data, "train", 4 if args.quick else 1)
    test = load_split(args.data, "test")
    n_train_boxes = sum(len(s.truth) for s in train)
    print(f"train: {len(train)} images, {n_train_boxes} boxes; test: {len(test)} images", flush=True)

    print("tuning on train (native chips, intensity = grey value):", flush=True)
    rows = sweep(train, WINDOWS, KS)
    best, best_m = max(rows, key=lambda r: (r[1]["0.5"]["f1"], r[1]["0.25"]["f1"]))
    print(f"chosen on train: {describe(best)} -> F1@0.5 {best_m['0.5']['f1']:.3f}", flush=True)
    checks = []
    windows = [(best.guard, best.background, best.prefilter)]
    sq = sweep(train, windows, [best.k], [best.close_size], [best.min_area], square=True)[0][1]
    checks.append(("grey value squared as intensity", sq))
    nomorph = dataclasses.replace(best, open_size=0, close_size=0)
    preds, _ = predict(train, nomorph, "native")
    checks.append(("no opening / closing", score(preds, train)))
    for prefilter in (1, 5):
        if prefilter != best.prefilter:
            other = dataclasses.replace(best, prefilter=prefilter)
            preds, _ = predict(train, other, "native")
            checks.append((f"{prefilter}x{prefilter} pre-filter", score(preds, train)))
    t_max = np.array([b.t_max for s in train for b in detect_chip(s.grey, best)])
    t_quart = np.quantile(t_max, [0.25, 0.5, 0.75]) if t_max.size else np.zeros(3)
    print(f"t_max of the train boxes: quartiles {t_quart.round(1).tolist()}", flush=True)

    results = []
    for name, params in (("chosen", best), ("reference", REFERENCE)):
        for how in ("native", "grid", "grid-as-is"):
            preds, per_image = predict(test, params, how)
            m = score(preds, test)
            results.append((f"{name} ({how})", params, m, per_image))
            print(row(f"{name} ({how})", m), flush=True)
    total = time.perf_counter() - t_start

    lines = [
        SECTION,
        "",
        f"`python benchmarks/cfar_ssdd.py{' --quick' if args.quick else ''}` "
        f"({platform.processor() or platform.machine()}, 1 thread, {total:.0f} s in all). "
        "Two-parameter CA-CFAR (`fusarbatch.engines.cfar`) on SSDD (`../shared/data/ssdd`, de-duplicated "
        "split, SOURCE.txt there), scored by `training.metrics.detection_metrics` (the scorer of "
        "`fusarbatch eval`) with both sides' boxes clipped and scaled to the 504 grid.",
        "",
        f"Tuned on the train split only ({len(train)} images, {n_train_boxes} boxes; "
        f"{len(WINDOWS)} window sets x {len(KS)} thresholds x {len(CLOSES)} closing sizes x "
        f"{len(MIN_AREAS)} minimum areas, intensity = grey value): chosen **{describe(best)}**; train F1 "
        f"at IoU 0.5 {best_m['0.5']['f1']:.3f}. Single-factor checks on train at those parameters: "
        + "; ".join(f"{n}: F1 {m['0.5']['f1']:.3f}" for n, m in checks)
        + f". The largest CFAR statistic of the train boxes has quartiles {t_quart[0]:.0f} / "
        f"{t_quart[1]:.0f} / {t_quart[2]:.0f} (a box scores 0.5 at `SCORE_HALF` = {SCORE_HALF:g}).",
        "",
        f"SSDD **test** ({len(test)} images, {sum(len(s.truth) for s in test)} boxes). Inputs: `native`, "
        "the chip at its own size; `grid`, the chip rendered to the 504 x 504 model input as "
        "`fusarbatch eval` reads its records, resampled back to its own size "
        "(`detect_chip(image, native_size=(w, h))`, the call `eval` makes); `grid-as-is`, the rendered "
        "chip without resampling (windows then span other distances and speckle is correlated):",
        "",
        "| parameters (input) | P@0.5 | R@0.5 | F1@0.5 | P@0.25 | R@0.25 | F1@0.25 | boxes | ms/image |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(name, m, f" {per * 1000:.0f} |") for name, _, m, per in results]
    lines += [
        "",
        "Reference parameters: " + describe(REFERENCE) + " (SSDD's SOURCE.txt: F1 0.479 at IoU 0.5 on the "
        "original 232-image test split, before de-duplication, with an implementation of its own). "
        "Train grid, best F1 at IoU 0.5 over the closing sizes and minimum areas (which, in brackets):",
        "",
        "| guard / background / pre-filter | " + " | ".join(f"k={k:g}" for k in KS) + " |",
        "|---|" + "---|" * len(KS),
    ]
    for g, b, pf in WINDOWS:
        cells = []
        for k in KS:
            p, m = max(
                ((p, m) for p, m in rows if (p.guard, p.background, p.prefilter, p.k) == (g, b, pf, k)),
                key=lambda r: r[1]["0.5"]["f1"],
            )
            cells.append(f"{m['0.5']['f1']:.3f} (close {p.close_size}, area {p.min_area})")
        lines.append(f"| {g} / {b} / {pf} | " + " | ".join(cells) + " |")
    section = "\n".join(lines) + "\n"
    print(section)
    if best != CHIP_PARAMS:
        print(f"note: CHIP_PARAMS in fusarbatch/engines/cfar.py differ from the chosen {best}")
    if not args.no_write:
        write_results(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
