"""Labelled SAR chips -> triplet manifests for every task (DESIGN 4, issue 4).

Sources (``/work/shared/data`` layout, see its README):

- ``voc``: Pascal VOC boxes -- ``ship_chips`` (``images/*.jpg`` + ``*.xml`` side by side, one class ``ship``,
  no official split) and ``mstar_composite_detection`` (``JPEGImages/``, ``Annotations/``,
  ``ImageSets/{train,val}.txt``; ``<name>`` is a class index mapped by ``classes.json``);
- ``folders``: class folders -- ``mstar_soc10`` (``{train,val}/<k>/*.jpeg``, ``classes.json`` maps ``k`` to
  the class name; ``val`` is the standard SOC test set at 15 degrees depression).

Every chip is rendered by :func:`fusarbatch.render.render` -- the function that renders tiles at inference --
with ``units="dn"`` (8-bit magnitude chips), resized to ``grid`` x ``grid`` (``--grid``, default 504;
bicubic). Boxes are clipped to the chip (some ground-truth boxes run past the edge) and scaled per axis to
that grid. Rendered images are stored as lossless PNG (grey ``L`` when the three channels are equal, which
is always the case for grey rendering).

Tasks (prompts and answer formats: :mod:`fusarbatch.model.prompts`):

- ``caption`` (stage 1): generated from the labels by templates (:func:`caption_for`) -- there is no SAR
  caption corpus for these chips; every caption record says so in ``meta.caption``;
- ``counting``, ``grounding`` (3 x 3 cells), ``detection`` of the coarse category (``ship``, ``vehicle``): on
  box-labelled chips;
- ``classification`` of a given box among the dataset's fine classes: each box of a multi-class VOC scene,
  and the whole chip (box ``[0, 0, 504, 504]``, as ``fusarbatch run`` asks it) for class folders.

Splits are deterministic: the dataset's own (ImageSets, train/val folders) or, without one, the chips sorted
by the SHA-1 of their id with the first ``round(n * val_fraction)`` going to ``val``. Augmentation
(``dihedral``: the 8 flips/rotations, boxes transformed with the pixels) applies to the train split only.

The chips carry no geolocation, so records have no AlphaEarth anchors (``aef: null``: the TLM then leaves the
tokens unmodulated).

Outputs in ``out``: ``images/*.png``, ``stage1_<split>.jsonl`` (captions), ``stage2_<split>.jsonl`` (tasks),
``README.md`` (what was built, from what, and that captions are template-generated). A build is staged
(images in a ``.build.partial-<pid>-*`` folder, manifests and README under ``.<name>.partial-<pid>`` names)
and switched in only when every chip rendered and every file was written: a failed or killed build leaves an
existing one as it was (a later build removes the staging of a dead process). Manifests of an earlier build
that this build does not write again (another ``--split`` or ``--task`` set) are removed, since the images
they name were rendered again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fusarbatch.errors import FusarbatchError, UsageError, disk_full
from fusarbatch.files import check_regular, read_capped
from fusarbatch.model.prompts import (
    GRID,
    Box,
    caption_prompt,
    classification_prompt,
    counting_prompt,
    detection_prompt,
    format_class_answer,
    format_count_answer,
    format_detection_answer,
    format_grounding_answer,
    grounding_cell,
    grounding_cells,
    grounding_prompt,
)
from fusarbatch.model.tiny import MSTAR_KINDS as _MSTAR_KINDS
from fusarbatch.render import render
from training.manifest import Triplet, write_manifest
from training.staging import process_alive

__all__ = [
    "CELL_NAMES",
    "MSTAR_KINDS",
    "Chip",
    "build_dataset",
    "caption_for",
    "chip_records",
    "dihedral",
    "load_class_map",
    "read_voc",
    "render_chip",
    "scan_class_folders",
    "scan_voc",
]

log = logging.getLogger(f"fusarbatch.{__name__}")  # shown by the fusarbatch CLI

CELL_NAMES = {
    1: "top left",
    2: "top centre",
    3: "top right",
    4: "centre left",
    5: "centre",
    6: "centre right",
    7: "bottom left",
    8: "bottom centre",
    9: "bottom right",
}
"""Names of the 3 x 3 grounding cells, used by the caption templates."""

MSTAR_KINDS = _MSTAR_KINDS
"""What each MSTAR SOC class is (for captions)."""

_NUMBER_WORDS = ("no", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
TASK_NAMES = ("counting", "grounding", "classification", "detection")
_SPLIT_ORDER = {"train": 0, "val": 1, "test": 2}


# --------------------------------------------------------------------------------------------- chips
@dataclass(frozen=True)
class Chip:
    """One labelled chip before rendering.

    :ivar id: unique id within the build (``<source>/<name>``, plus ``~<aug>`` for augmented copies).
    :ivar path: the image file.
    :ivar split: the split name (``train``, ``val``, ``test``, ... as the dataset names it).
    :ivar coarse: the coarse category asked in detection/counting/grounding (``ship``, ``vehicle``).
    :ivar boxes: labelled boxes in chip pixels (fine class names), before clipping; empty for class folders.
    :ivar label: the chip's class for class-folder data (classification of the whole chip), else None.
    :ivar pol: polarisation name passed to the renderer.
    :ivar meta: provenance (source, sensor, depression angle, ...).
    :ivar aug: dihedral transform index 0..7 (0 = as is), applied when the chip is loaded.
    """

    id: str
    path: Path
    split: str
    coarse: str
    boxes: tuple[Box, ...] = ()
    label: str | None = None
    pol: str = "HH"
    meta: dict[str, Any] = field(default_factory=dict)
    aug: int = 0


def load_class_map(path: str | Path) -> dict[str, str]:
    """Folder index / VOC ``<name>`` -> class name, from a ``classes.json`` (``{"folder_to_class": {...}}``
    or a plain mapping)."""
    p = Path(path)
    try:
        # a FIFO would block and /dev/zero would fill the memory
        raw = read_capped(p, "class map", UsageError, 1 << 20, "give the classes.json file")
        data = json.loads(raw.decode("utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"class map {p}: unreadable ({exc})") from None
    mapping = data.get("folder_to_class", data) if isinstance(data, dict) else None
    if not isinstance(mapping, dict) or not all(isinstance(v, str) for v in mapping.values()):
        raise UsageError(f"class map {p}: expected {{'folder_to_class': {{'0': 'name', ...}}}}")
    return {str(k): v for k, v in mapping.items()}


def read_voc(path: str | Path, class_map: dict[str, str] | None = None) -> tuple[int, int, list[Box]]:
    """Read a Pascal VOC annotation: ``(width, height, boxes)`` in pixels, unclipped, names mapped through
    ``class_map`` when given (unknown names kept as they are).

    :raises UsageError: unreadable XML or missing size/box fields.
    """
    p = Path(path)
    try:
        # a FIFO would block the XML parser forever
        check_regular(p, "VOC annotation", UsageError, "remove it or replace it with the XML file")
        root = ET.parse(p).getroot()
        width = int(_voc_number(root.findtext("size/width", "")))
        height = int(_voc_number(root.findtext("size/height", "")))
        boxes = []
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            bb = obj.find("bndbox")
            if bb is None or not name:
                raise ValueError("object without name or bndbox")
            x1, y1, x2, y2 = (_voc_number(bb.findtext(k, "")) for k in ("xmin", "ymin", "xmax", "ymax"))
            label = class_map.get(name, name) if class_map else name
            boxes.append(Box(label, min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)))
    except (OSError, ET.ParseError, ValueError, OverflowError) as exc:
        raise UsageError(f"VOC annotation {p}: unreadable ({exc})") from None
    if width <= 0 or height <= 0:
        raise UsageError(f"VOC annotation {p}: bad size {width}x{height}")
    return width, height, boxes


_VOC_NUMBER = re.compile(r"\s*[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?\s*")


def _voc_number(text: str) -> float:
    """A VOC size or box value: a plain finite decimal (``nan``, ``inf``, ``1_0``, ``1e400`` are refused)."""
    if not _VOC_NUMBER.fullmatch(text or ""):
        raise ValueError(f"{text!r} is not a number")
    value = float(text)
    if not math.isfinite(value) or abs(value) > 1e9:
        raise ValueError(f"{text!r} is out of range")
    return value


def _stable_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


def _hash_split(ids: Sequence[str], val_fraction: float) -> dict[str, str]:
    order = sorted(ids, key=_stable_key)
    n_val = round(len(order) * val_fraction)
    return {i: ("val" if k < n_val else "train") for k, i in enumerate(order)}


def _pol_from_name(name: str) -> str:
    for pol in ("hh", "hv", "vh", "vv"):
        if f"_{pol}_" in name.lower():
            return pol.upper()
    return "HH"


def _sensor_from_name(name: str) -> str | None:
    if name.startswith("Gao_"):
        return "Gaofen-3"
    if name.startswith("Sen_"):
        return "Sentinel-1"
    return None


def scan_voc(
    root: str | Path,
    *,
    source: str | None = None,
    coarse: str | None = None,
    class_map: dict[str, str] | None = None,
    val_fraction: float = 0.2,
) -> list[Chip]:
    """Find the chips of a VOC-labelled folder.

    Layouts: ``JPEGImages/`` + ``Annotations/`` (+ ``ImageSets/{train,val}.txt`` or
    ``ImageSets/Main/{train,val}.txt``: the split), or images and XMLs side by side in ``root`` or
    ``root/images``. Without an ImageSets split, the deterministic hash split (module docstring).

    :param source: name used in record ids (default: the folder name).
    :param coarse: coarse category (default: ``ship`` when every box is a ship, else ``vehicle``).
    :param class_map: VOC ``<name>`` -> class name.
    :raises UsageError: no annotated image found.
    """
    r = Path(root)
    source = source or r.name
    if (r / "Annotations").is_dir():
        ann_dir, img_dir = r / "Annotations", r / "JPEGImages"
    elif (r / "images").is_dir():
        ann_dir = img_dir = r / "images"
    else:
        ann_dir = img_dir = r
    pairs: dict[str, tuple[Path, Path]] = {}
    for xml in sorted(ann_dir.glob("*.xml")):
        candidates = [img_dir / f"{xml.stem}{ext}" for ext in (".jpg", ".jpeg", ".png", ".tif")]
        for c in candidates:
            if c.exists() and not c.is_file():  # a FIFO would hang the reader; a folder is not an image
                check_regular(c, "chip image", UsageError, "remove it or replace it with the image file")
        img = next((c for c in candidates if c.is_file()), None)
        if img is None:
            log.warning("VOC %s: no image for %s, skipped", r, xml.name)
            continue
        pairs[xml.stem] = (img, xml)
    if not pairs:
        raise UsageError(f"VOC folder {r}: no annotated image found (expected *.xml with images beside them)")
    split_of: dict[str, str] = {}
    for base in (r / "ImageSets", r / "ImageSets" / "Main"):
        # every split file the dataset ships (train, val, test, trainval, ...); an id listed in several keeps
        # the first in the order train, val, test, then the others by name (trainval never hides val)
        files = sorted(base.glob("*.txt"), key=lambda f: (_SPLIT_ORDER.get(f.stem, 9), f.stem))
        for f in files:
            if f.is_dir() or not f.stem:  # a folder named like a split file; ".txt"
                continue
            try:
                # a FIFO would hang, a device never end: one line instead of a split silently missing
                text = read_capped(f, "split file", UsageError, 64 << 20, "give ids, one per line").decode()
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(
                    f"split file {f}: unreadable ({type(exc).__name__}); give ids, one per line"
                ) from None
            for line in text.split():
                split_of.setdefault(line.strip(), f.stem)
    if not split_of:
        split_of = _hash_split(list(pairs), val_fraction)
    chips = []
    labels: Counter[str] = Counter()
    for name, (img, xml) in pairs.items():
        if name not in split_of:
            continue
        width, height, boxes = read_voc(xml, class_map)
        labels.update(b.label for b in boxes)
        meta: dict[str, Any] = {"source": source, "file": img.name, "width": width, "height": height}
        sensor = _sensor_from_name(name)
        if sensor:
            meta["sensor"] = sensor
        chips.append(
            Chip(
                id=f"{source}/{name}",
                path=img,
                split=split_of[name],
                coarse="",
                boxes=tuple(boxes),
                pol=_pol_from_name(name),
                meta=meta,
            )
        )
    if coarse is None:
        coarse = "ship" if set(labels) <= {"ship"} else "vehicle"
    return [replace(c, coarse=coarse) for c in chips]


def scan_class_folders(
    root: str | Path,
    *,
    source: str | None = None,
    coarse: str = "vehicle",
    class_map: dict[str, str] | None = None,
    max_per_class: int | None = None,
) -> list[Chip]:
    """Find the chips of a class-folder dataset: ``root/<split>/<class>/*.{jpeg,jpg,png}``.

    :param class_map: folder name -> class name (default: ``root/classes.json`` when present, else the folder
        names themselves).
    :param max_per_class: keep at most this many chips per class and split, chosen deterministically by the
        SHA-1 of their id (not the first files: MSTAR numbers chips by aspect angle).
    :raises UsageError: no split folder or no image.
    """
    r = Path(root)
    source = source or r.name
    if class_map is None and (r / "classes.json").is_file():
        class_map = load_class_map(r / "classes.json")
    chips = []
    for split in ("train", "val"):
        sdir = r / split
        if not sdir.is_dir():
            continue
        for cdir in sorted(p for p in sdir.iterdir() if p.is_dir()):
            label = (class_map or {}).get(cdir.name, cdir.name)
            files = sorted(f for f in cdir.iterdir() if f.suffix.lower() in (".jpeg", ".jpg", ".png", ".tif"))
            ids = [f"{source}/{split}/{cdir.name}/{f.stem}" for f in files]
            keep = sorted(range(len(files)), key=lambda k: _stable_key(ids[k]))
            if max_per_class is not None:
                keep = keep[:max_per_class]
            for k in sorted(keep):
                meta = {"source": source, "file": f"{split}/{cdir.name}/{files[k].name}"}
                if source.startswith("mstar"):
                    meta["depression_deg"] = 17 if split == "train" else 15
                chips.append(
                    Chip(id=ids[k], path=files[k], split=split, coarse=coarse, label=label, meta=meta)
                )
    if not chips:
        raise UsageError(f"class folders {r}: no images under {r}/{{train,val}}/<class>/")
    return chips


# --------------------------------------------------------------------------------------------- geometry
def dihedral(values: np.ndarray, boxes: Sequence[Box], k: int) -> tuple[np.ndarray, tuple[Box, ...]]:
    """Apply dihedral transform ``k`` (0..7: ``k % 4`` quarter turns counter-clockwise, then a left-right
    flip when ``k >= 4``) to a ``(y, x)`` array and its pixel boxes (corners on pixel edges)."""
    arr = np.asarray(values)
    out_boxes = list(boxes)
    for _ in range(k % 4):
        w = arr.shape[1]
        arr = np.rot90(arr)  # counter-clockwise: new (row, col) = (w - 1 - col, row) for pixels
        out_boxes = [Box(b.label, b.y1, w - b.x2, b.y2, w - b.x1) for b in out_boxes]
    if k >= 4:
        w = arr.shape[1]
        arr = arr[:, ::-1]
        out_boxes = [Box(b.label, w - b.x2, b.y1, w - b.x1, b.y2) for b in out_boxes]
    return np.ascontiguousarray(arr), tuple(out_boxes)


def _clip_scale(boxes: Sequence[Box], width: int, height: int, grid: int) -> tuple[Box, ...]:
    """Clip to the chip, scale per axis to ``grid`` and snap the corners to whole grid pixels (the answers
    hold integers); boxes with no area on the chip are dropped.

    A box that is less than one grid pixel wide or tall after scaling (a 2 px ship on a 1,000 px chip scaled
    to 336) keeps one whole pixel around its centre instead of rounding to zero width: the answers, counts and
    the scorer then all see the same, non-degenerate box.
    """
    out = []
    sx, sy = grid / width, grid / height
    for b in boxes:
        x1, x2 = (min(max(v, 0.0), float(width)) for v in (b.x1, b.x2))
        y1, y2 = (min(max(v, 0.0), float(height)) for v in (b.y1, b.y2))
        if x2 <= x1 or y2 <= y1:
            continue
        gx1, gx2 = _snap(x1 * sx, x2 * sx, grid)
        gy1, gy2 = _snap(y1 * sy, y2 * sy, grid)
        out.append(Box(b.label, gx1, gy1, gx2, gy2))
    return tuple(out)


def _snap(lo: float, hi: float, grid: int) -> tuple[float, float]:
    """Integer edges ``a < b`` in ``[0, grid]`` for the interval ``[lo, hi]``: rounded, or the one grid pixel
    holding the interval's centre when rounding leaves no width."""
    a, b = round(lo), round(hi)
    if b <= a:
        a = min(max(math.floor((lo + hi) / 2), 0), grid - 1)
        b = a + 1
    return float(a), float(b)


def load_chip(chip: Chip) -> tuple[np.ndarray, tuple[Box, ...]]:
    """The chip's grey DN values ``(y, x)`` (RGB-stored grey is converted to luminance) and its boxes, with
    the chip's dihedral augmentation applied."""
    try:
        # a FIFO would block the image reader forever
        check_regular(chip.path, "chip image", UsageError, "remove it or replace it with the image file")
        with Image.open(chip.path) as im:
            values = np.asarray(im.convert("L"), dtype=np.float32)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise UsageError(f"chip image {chip.path}: unreadable ({exc}); fix or remove it") from None
    return dihedral(values, chip.boxes, chip.aug)


def render_chip(chip: Chip, grid: int = GRID) -> tuple[Image.Image, tuple[Box, ...]]:
    """Render a chip as the model sees it (:func:`fusarbatch.render.render`, ``units="dn"``, ``grid`` x
    ``grid``) and its boxes clipped to the chip and scaled to that grid."""
    values, boxes = load_chip(chip)
    height, width = values.shape
    image = render(values, [chip.pol], units="dn", mode="grey", size=grid)
    return image, _clip_scale(boxes, width, height, grid)


# --------------------------------------------------------------------------------------------- captions
def _count_phrase(n: int, noun: str) -> str:
    word = _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)
    return f"{word} {noun}{'' if n == 1 else 's'}"


def _where(boxes: Sequence[Box], grid: int) -> str:
    cells = Counter(grounding_cell(*b.center, grid=grid) for b in boxes)
    parts = []
    for cell in grounding_cells(boxes, grid=grid):
        n = cells[cell]
        parts.append(f"{_NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else n} in the {CELL_NAMES[cell]}")
    return ", ".join(parts)


def caption_for(chip: Chip, boxes: Sequence[Box], grid: int = GRID) -> str:
    """A caption generated from the labels by a template (which of 3 variants: the SHA-1 of the chip id).

    It states what the labels say -- the sensor when known, the number of targets, their classes and which
    3 x 3 cell they are in -- and nothing else.
    """
    variant = int(_stable_key(chip.id)[:8], 16) % 3
    if chip.label is not None:  # class-folder chip: one target in the centre
        kind = MSTAR_KINDS.get(chip.label, "target")
        dep = chip.meta.get("depression_deg")
        angle = f", imaged at {dep} degrees depression" if dep else ""
        return (
            f"An X-band SAR chip of a single {chip.label}, a {kind}, in the centre of the image on flat "
            f"ground{angle}.",
            f"This SAR image shows one {kind}, a {chip.label}, in the centre, surrounded by ground clutter"
            f"{angle}.",
            f"A single target in the centre of the SAR chip: a {chip.label} {kind}{angle}.",
        )[variant]
    n = len(boxes)
    if chip.coarse == "ship":
        sensor = chip.meta.get("sensor")
        what = f"A {sensor} SAR image" if sensor else "A SAR image"
        pol = f" in {chip.pol} polarisation" if chip.meta.get("sensor") else ""
        if n == 0:
            return f"{what}{pol} of open sea with no ship."
        return (
            f"{what}{pol} of the sea with {_count_phrase(n, 'ship')}, bright points on dark water: "
            f"{_where(boxes, grid)}.",
            f"{what}{pol} showing {_count_phrase(n, 'ship')} at sea ({_where(boxes, grid)}).",
            f"Dark sea with {_count_phrase(n, 'bright ship')}: {_where(boxes, grid)}. {what}{pol}.",
        )[variant]
    if n == 0:
        return "An X-band SAR scene of ground clutter with no vehicle."
    items = []
    for b in sorted(boxes, key=lambda b: (grounding_cell(*b.center, grid=grid), b.label)):
        kind = MSTAR_KINDS.get(b.label, "vehicle")
        items.append(f"a {b.label} {kind} in the {CELL_NAMES[grounding_cell(*b.center, grid=grid)]}")
    listing = "; ".join(items)
    return (
        f"An X-band SAR scene of ground clutter with {_count_phrase(n, 'vehicle')}: {listing}.",
        f"This SAR image shows {_count_phrase(n, 'vehicle')} on open terrain: {listing}.",
        f"Ground clutter with {_count_phrase(n, 'military vehicle')} in this X-band SAR image: {listing}.",
    )[variant]


# --------------------------------------------------------------------------------------------- records
def chip_records(
    chip: Chip,
    image_path: Path,
    boxes: Sequence[Box],
    *,
    classes: Sequence[str],
    tasks: Sequence[str],
    grid: int = GRID,
) -> list[Triplet]:
    """The triplets of one rendered chip (``boxes`` already on the ``grid``).

    :param classes: the dataset's fine classes (the choices of classification prompts).
    :param tasks: which of ``caption``, ``counting``, ``grounding``, ``classification``, ``detection``.
    """
    meta = {**chip.meta, "split": chip.split, "aug": chip.aug}
    out: list[Triplet] = []
    # every target's box on the grid (class folders: none known), for stage 0's dense target loss
    grid_boxes = None if chip.label is not None else [[round(v) for v in b.as_list()] for b in boxes]

    def add(task: str, suffix: str, question: str, answer: str, extra: dict[str, Any] | None = None) -> None:
        out.append(
            Triplet(
                id=f"{chip.id}/{suffix}",
                image=image_path,
                question=question,
                answer=answer,
                aef=None,
                coordinate_size=grid,
                task=task,
                meta={**meta, "label": chip.coarse, "boxes": grid_boxes, **(extra or {})},
            )
        )

    fine = [b.label for b in boxes]
    if "caption" in tasks:
        add("caption", "caption", caption_prompt(), caption_for(chip, boxes, grid), {"caption": "template"})
    if chip.label is not None:  # class folders: the whole chip is the box
        if "classification" in tasks:
            whole = [0, 0, grid, grid]
            add(
                "classification",
                "class",
                classification_prompt(whole, classes, grid=grid),
                format_class_answer(chip.label),
                {"class": chip.label, "box": whole},
            )
        return out
    coarse_boxes = [Box(chip.coarse, b.x1, b.y1, b.x2, b.y2) for b in boxes]
    if "counting" in tasks:
        add(
            "counting",
            "count",
            counting_prompt(chip.coarse),
            format_count_answer(len(boxes)),
            {"classes": fine},
        )
    if "grounding" in tasks:
        add(
            "grounding",
            "ground",
            grounding_prompt(chip.coarse),
            format_grounding_answer(grounding_cells(coarse_boxes, grid=grid)),
            {"classes": fine},
        )
    if "detection" in tasks:
        add(
            "detection",
            "detect",
            detection_prompt(chip.coarse),
            # reading order (top to bottom, then left to right, by centre): the first box is always the
            # top-most target, so a model is never trained toward the average of two ships' places
            format_detection_answer(
                sorted(coarse_boxes, key=lambda b: (b.center[1], b.center[0], b.as_list(), b.label))
            ),
            {"classes": fine},
        )
    if "classification" in tasks and len(classes) > 1:
        for k, b in enumerate(boxes):
            if b.label not in classes:
                continue
            add(
                "classification",
                f"class{k}",
                classification_prompt(b, classes, grid=grid),
                format_class_answer(b.label),
                {"class": b.label, "box": [round(v) for v in b.as_list()]},
            )
    return out


def _augmented(chips: Sequence[Chip], augment: str) -> Iterator[Chip]:
    for chip in chips:
        yield chip
        if augment == "dihedral" and chip.split == "train":
            for k in range(1, 8):
                yield replace(chip, id=f"{chip.id}~d{k}", aug=k)


@dataclass
class BuildSummary:
    """What :func:`build_dataset` wrote: record counts per manifest file and task, images rendered."""

    out: Path
    images: int = 0
    manifests: dict[str, dict[str, int]] = field(default_factory=dict)


def build_dataset(
    source: str | Path,
    out: str | Path,
    *,
    kind: str = "auto",
    name: str | None = None,
    tasks: Sequence[str] = ("caption", *TASK_NAMES),
    class_map: str | Path | None = None,
    coarse: str | None = None,
    val_fraction: float = 0.2,
    augment: str = "none",
    max_per_class: int | None = None,
    splits: Sequence[str] | None = None,
    grid: int = GRID,
    progress: Callable[[int, int], None] | None = None,
) -> BuildSummary:
    """Render the chips of ``source`` and write the triplet manifests to ``out`` (module docstring).

    :param kind: ``voc``, ``folders`` or ``auto`` (``folders`` when ``source/train`` holds class folders).
    :param name: source name used in ids and file names (default: the folder name).
    :param tasks: tasks to write; ``caption`` goes to ``stage1_<split>.jsonl``, the others to
        ``stage2_<split>.jsonl``.
    :param class_map: ``classes.json`` mapping VOC names / folder names to class names (class folders: default
        ``source/classes.json``).
    :param coarse: coarse category for detection/counting/grounding (default: ``ship`` or ``vehicle``).
    :param val_fraction: hash-split share of ``val`` when the data has no split of its own.
    :param augment: ``none`` or ``dihedral`` (train split only).
    :param max_per_class: class folders: at most this many chips per class and split.
    :param splits: the splits to write (None: every split the source has: its ImageSets files, its split
        folders, or the hash split's ``train`` and ``val``).
    :param grid: side of the square model input and box grid in pixels (``coordinate_size``; a multiple of
        28, the Qwen2.5-VL patch x merge size).
    :raises UsageError: unknown kind/task/augment/split, a bad grid, or a source with no chips.
    """
    src, dst = Path(source), Path(out)
    unknown = set(tasks) - {"caption", *TASK_NAMES}
    if unknown:
        raise UsageError(f"unknown task(s) {sorted(unknown)}; choose from caption, {', '.join(TASK_NAMES)}")
    if augment not in ("none", "dihedral"):
        raise UsageError(f"--augment {augment!r}: choose none or dihedral")
    if not src.is_dir():
        raise UsageError(f"source {src}: folder missing")
    if kind == "auto":
        kind = (
            "folders"
            if (src / "train").is_dir() and any(p.is_dir() for p in (src / "train").iterdir())
            else "voc"
        )
    cmap = load_class_map(class_map) if class_map else None
    if kind == "voc":
        chips = scan_voc(src, source=name, coarse=coarse, class_map=cmap, val_fraction=val_fraction)
    elif kind == "folders":
        chips = scan_class_folders(
            src, source=name, coarse=coarse or "vehicle", class_map=cmap, max_per_class=max_per_class
        )
    else:
        raise UsageError(f"--kind {kind!r}: choose voc, folders or auto")
    if grid < 28 or grid % 28 or grid > 8176:
        raise UsageError(
            f"--grid {grid}: use a multiple of 28 (patch 14 x merge 2) up to 8176, e.g. 336 or 504"
        )
    found = sorted({c.split for c in chips}, key=lambda s: (_SPLIT_ORDER.get(s, 9), s))
    if splits is not None:
        missing = sorted(set(splits) - set(found))
        if missing:
            raise UsageError(f"--split {', '.join(missing)}: {src} has the splits {', '.join(found)}")
        chips = [c for c in chips if c.split in splits]
    if not chips:
        raise UsageError(f"source {src}: no chip in the split(s) {', '.join(splits or found) or '(none)'}")
    if cmap:
        classes = sorted(set(cmap.values()))
    else:
        classes = sorted({c.label for c in chips if c.label} | {b.label for c in chips for b in c.boxes})
    all_chips = list(_augmented(chips, augment))
    images_dir = dst / "images"
    _prepare_out(dst)
    by_file: dict[str, list[Triplet]] = {}
    summary = BuildSummary(out=dst)
    pid = os.getpid()
    staged: dict[Path, Path] = {}  # final path -> staged path (manifests, README)
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".build.partial-{pid}-", dir=dst))
    except OSError as exc:
        raise _write_error(exc, dst) from None
    try:
        for i, chip in enumerate(all_chips):
            image, boxes = render_chip(chip, grid)
            rgb = np.asarray(image)
            stored = Image.fromarray(rgb[..., 0]) if (rgb == rgb[..., :1]).all() else image
            file_name = chip.id.replace("/", "__").replace("~", "_") + ".png"
            stored.save(staging / file_name, optimize=False, compress_level=6)
            summary.images += 1
            recs = chip_records(chip, images_dir / file_name, boxes, classes=classes, tasks=tasks, grid=grid)
            for rec in recs:
                stage = "stage1" if rec.task == "caption" else "stage2"
                by_file.setdefault(f"{stage}_{chip.split}.jsonl", []).append(rec)
            if progress is not None:
                progress(i + 1, len(all_chips))
        # manifests and README under temporary names in dst (manifest paths are relative to their folder)
        for fname, records in sorted(by_file.items()):
            staged[dst / fname] = dst / f".{fname}.partial-{pid}"
            write_manifest(staged[dst / fname], records)
            summary.manifests[fname] = dict(Counter(r.task for r in records))
        staged[dst / "README.md"] = dst / f".README.md.partial-{pid}"
        _write_readme(staged[dst / "README.md"], src, kind, chips, all_chips, classes, augment, summary, grid)
        # switch: check every target first, so that the moves below cannot stop half way
        images = sorted(staging.iterdir())
        _check_targets([images_dir / f.name for f in images] + list(staged), images_dir)
        images_dir.mkdir(exist_ok=True)
        for f in images:
            os.replace(f, images_dir / f.name)
        for final, tmp in staged.items():
            os.replace(tmp, final)
        staged.clear()
        for old in sorted(dst.glob("stage[12]_*.jsonl")):
            if old.name not in by_file and old.is_file():
                log.info("removed %s: an earlier build's manifest, its images were rendered again", old)
                old.unlink()
    except OSError as exc:
        raise _write_error(exc, dst) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        for tmp in staged.values():
            tmp.unlink(missing_ok=True)
    log.info("built %d image(s) and %s in %s", summary.images, summary.manifests, dst)
    return summary


def _write_error(exc: OSError, dst: Path) -> FusarbatchError:
    """One line for an ``OSError`` while writing a build into ``dst`` (a full disk says so)."""
    full = disk_full(exc, f"the dataset in {dst}")
    if full is not None:
        return FusarbatchError(full)
    where = f" ({exc.filename})" if exc.filename else ""
    return UsageError(
        f"--out {dst}: cannot write{where}: {exc.strerror or exc}; choose another --out or fix it"
    )


def _prepare_out(dst: Path) -> None:
    """Create ``dst`` and remove the staging that a killed build (its process gone) left in it.

    :raises UsageError: ``dst`` is not a folder or cannot be created.
    """
    if dst.exists() and not dst.is_dir():
        raise UsageError(f"--out {dst}: exists and is not a folder; choose another --out")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(exc, dst) from None
    for stale in dst.glob(".*.partial-*"):
        # only this builder's own names (a user's .photos.partial-2023 stays)
        m = _STAGING_NAME.fullmatch(stale.name)
        if m is None or process_alive(int(m.group(1) or m.group(2))):
            continue
        log.info("removing %s, left by a build that did not finish", stale)
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


_STAGING_NAME = re.compile(
    r"\.build\.partial-(\d+)-\w+|\.(?:stage[12]_[^/]+\.jsonl|README\.md)\.partial-(\d+)"
)
"""The staging names of :func:`build_dataset`: ``.build.partial-PID-*``, ``.stage1_x.jsonl.partial-PID``,
``.README.md.partial-PID``."""


def _check_targets(targets: Sequence[Path], images_dir: Path) -> None:
    """Refuse to switch a build in when ``images/`` or one of the files it replaces is in the way (a folder,
    or ``images/`` a file or dangling link), before anything is moved.

    :raises UsageError: names the path in the way.
    """
    if images_dir.is_symlink() or (images_dir.exists() and not images_dir.is_dir()):
        raise UsageError(f"{images_dir}: not a folder; remove it and build again")
    for t in targets:
        if t.is_dir() and not t.is_symlink():
            raise UsageError(f"{t}: a folder where the build writes a file; remove it and build again")
    for d in (images_dir if images_dir.is_dir() else images_dir.parent, images_dir.parent):
        if not os.access(d, os.W_OK | os.X_OK):
            raise UsageError(f"{d}: not writable; fix its permissions or choose another --out")


def _write_readme(
    path: Path,
    src: Path,
    kind: str,
    chips: Sequence[Chip],
    all_chips: Sequence[Chip],
    classes: Sequence[str],
    augment: str,
    summary: BuildSummary,
    grid: int,
) -> None:
    lines = [
        f"# Triplets built from {src}",
        "",
        f"Built by `python -m training build` (training/builders.py) from the {kind} data in `{src}`",
        f"({len(chips)} chips, {len(all_chips)} rendered images with augmentation `{augment}`).",
        "",
        "- Images: rendered by `fusarbatch.render.render(units='dn')` (the inference renderer), "
        f"{grid} x {grid} PNG.",
        f"- Boxes: clipped to the chip, then scaled per axis to the {grid} grid.",
        "- **Captions are generated from the labels by templates** (training/builders.py `caption_for`);",
        "  they say only what the labels say (sensor, number, class and 3 x 3 cell of the targets).",
        "- No AlphaEarth anchors: the chips carry no geolocation (`aef: null`, empty TLM mask).",
        f"- Classes: {', '.join(classes)}.",
        "",
        "| manifest | " + " | ".join(("caption", *TASK_NAMES)) + " |",
        "|---|" + "---|" * (len(TASK_NAMES) + 1),
    ]
    for fname, counts in sorted(summary.manifests.items()):
        lines.append(
            f"| {fname} | " + " | ".join(str(counts.get(t, 0)) for t in ("caption", *TASK_NAMES)) + " |"
        )
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
