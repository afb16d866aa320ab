"""Task prompts, answer formats and tolerant parsers for FUSAR-GPT (DESIGN 3.4, PAPER 1.3 and 1.6).

Every task is asked on the model's square input image: ``image_size`` of its ``tlm_config.json``
(:attr:`fusarbatch.model.FusarGPT.image_size`; :data:`GRID` = 504, FUSAR-GPT's, when a model does not say).
Boxes are absolute pixel ``bbox_2d`` ``[x1, y1, x2, y2]`` on that grid (Qwen2.5-VL's grounding format, which
FUSAR-GPT trains on): every function here that reads or writes boxes takes the ``grid``.

Tasks and answers:

- **detection** -- the official FUSAR-GPT prompt, byte for byte as in the released examples
  (``examples/detection.jsonl`` of the official repository); answer: a JSON list
  ``[{"bbox_2d": [x1, y1, x2, y2], "label": "plane"}, ...]`` or ``None``.
- **counting** -- answer: one non-negative integer, e.g. ``3``.
- **grounding** -- the image is cut into a 3 x 3 grid of equal cells numbered 1..9 row-major from the top left
  (``1 2 3`` top row, ``4 5 6`` middle row, ``7 8 9`` bottom row). A target is in the cell holding its box
  centre. Answer: a JSON list of cell numbers, the cell with the most targets first (ties: lower number
  first), e.g. ``[5, 1]``; ``[]`` when there is no target. See :func:`grounding_cells`.
- **classification** -- the class of the target in a given box; answer: the category name only.
- **caption** (stage 1) -- free text.

Only the detection prompt comes from the official release; the other four prompts and answer formats are
fusarbatch's (the paper does not publish them).

The parsers never raise on model output: whatever the text, they return a :class:`ParseResult` whose
``value`` is well typed (an empty value when nothing could be read), ``ok`` says whether the text was
understood, ``error`` why not, and ``notes`` lists the repairs applied (fence removed, truncated list, box
clipped, degenerate box dropped, ...).
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

__all__ = [
    "GRID",
    "Box",
    "ParseResult",
    "caption_prompt",
    "classification_prompt",
    "counting_prompt",
    "detection_prompt",
    "format_class_answer",
    "format_count_answer",
    "format_detection_answer",
    "format_grounding_answer",
    "grounding_cell",
    "grounding_cells",
    "grounding_prompt",
    "parse_class",
    "parse_count",
    "parse_detection",
    "parse_grounding",
    "regrid_classification_prompt",
    "scale_box_to_tile",
]

GRID = 504
"""FUSAR-GPT's square input side in pixels (36 x 36 patches of 14 px -> 18 x 18 = 324 visual tokens): the
default ``grid`` only. A model trained at another size says so in ``tlm_config.json`` (``image_size``) and
every caller passes that instead (:attr:`fusarbatch.model.FusarGPT.image_size`)."""

T = TypeVar("T")

# The official detection prompt, verbatim (note the typographic apostrophe and the doubled spaces).
_DETECTION_TEMPLATE = (
    "This is a SAR image. Please carefully check the image and detect the following object: {label}. "
    "Output each detected target\u2019s bbox coordinates in JSON format. "
    "The format of the bbox coordinates is:  "
    '\'\'\'json [ {{  "bbox_2d": [x1, y1, x2, y2], "label": "category name" }}, '
    '{{  "bbox_2d": [x1, y1, x2, y2], "label": "category name" }} ]  \'\'\'  '
    "If there are no such targets in the image, simply respond with None."
)
_COUNTING_TEMPLATE = (
    "This is a SAR image. Please carefully check the image and count the {label} targets in it. "
    "Answer with a single integer only, for example 3. If there are no such targets, answer 0."
)
_GROUNDING_TEMPLATE = (
    "This is a SAR image. The image is divided into a 3x3 grid of equal cells, numbered 1 to 9 row by row "
    "from the top left: 1 2 3 is the top row, 4 5 6 the middle row and 7 8 9 the bottom row. "
    "Which cells contain a {label}? Answer with a JSON list of cell numbers, the cell with the most targets "
    "first, for example [5, 1]. If there are no such targets, answer []."
)
_CLASSIFICATION_TEMPLATE = (
    "This is a SAR image. What is the category of the target in the box [{x1}, {y1}, {x2}, {y2}] "
    "(bbox_2d pixel coordinates [x1, y1, x2, y2] on the {grid}x{grid} image)?{choices} "
    "Answer with the category name only."
)
_CAPTION_PROMPT = (
    "This is a SAR image. Please describe it in detail: the terrain, the spatial layout and the targets "
    "it contains."
)


# --------------------------------------------------------------------------------------------- prompts
def detection_prompt(label: str) -> str:
    """The official FUSAR-GPT detection prompt for one category (e.g. ``"plane"``, ``"ship"``)."""
    return _DETECTION_TEMPLATE.format(label=label)


def counting_prompt(label: str) -> str:
    """Counting prompt; the expected answer is one integer (:func:`format_count_answer`)."""
    return _COUNTING_TEMPLATE.format(label=label)


def grounding_prompt(label: str) -> str:
    """3 x 3 grid grounding prompt; the expected answer is a JSON list of cells 1..9 (module docstring)."""
    return _GROUNDING_TEMPLATE.format(label=label)


def classification_prompt(
    box: Box | Sequence[float], choices: Sequence[str] | None = None, *, grid: int = GRID
) -> str:
    """Classification prompt for the target in ``box`` (pixels on the ``grid`` x ``grid`` model input;
    rounded to integers in the text, which also names the grid).

    :param box: a :class:`Box` or ``[x1, y1, x2, y2]``.
    :param choices: optional category names listed in the prompt ("Choose one of: a, b.").
    :param grid: the model's input side (``image_size`` of its ``tlm_config.json``).
    """
    x1, y1, x2, y2 = (box.x1, box.y1, box.x2, box.y2) if isinstance(box, Box) else tuple(box)
    extra = f" Choose one of: {', '.join(choices)}." if choices else ""
    return _CLASSIFICATION_TEMPLATE.format(
        x1=round(x1), y1=round(y1), x2=round(x2), y2=round(y2), grid=int(grid), choices=extra
    )


_CLASSIFICATION_BOX_RE = re.compile(
    r"in the box \[(?P<x1>-?\d+), (?P<y1>-?\d+), (?P<x2>-?\d+), (?P<y2>-?\d+)\] "
    r"\(bbox_2d pixel coordinates \[x1, y1, x2, y2\] on the (?P<g>\d+)x(?P=g) image\)"
)


def regrid_classification_prompt(question: str, grid: int, *, from_grid: int | None = None) -> str:
    """``question`` (a :func:`classification_prompt`) with its box and grid size moved to ``grid``.

    The box is scaled per axis by ``grid / from_grid`` and rounded as :func:`classification_prompt` rounds;
    ``from_grid`` is the grid the box is on (a manifest record's ``coordinate_size``, which is
    authoritative), by default the one the question names. A question that is not fusarbatch's
    classification prompt, or whose box is already on ``grid``, is returned as it is.
    """
    m = _CLASSIFICATION_BOX_RE.search(question)
    old = int(from_grid) if from_grid is not None else int(m["g"]) if m is not None else int(grid)
    if m is None or old == int(grid):
        return question
    f = int(grid) / old
    box = [round(int(m[k]) * f) for k in ("x1", "y1", "x2", "y2")]
    text = (
        f"in the box [{box[0]}, {box[1]}, {box[2]}, {box[3]}] "
        f"(bbox_2d pixel coordinates [x1, y1, x2, y2] on the {int(grid)}x{int(grid)} image)"
    )
    return question[: m.start()] + text + question[m.end() :]


def caption_prompt() -> str:
    """Stage-1 caption prompt (free-text answer)."""
    return _CAPTION_PROMPT


# --------------------------------------------------------------------------------------------- data
@dataclass(frozen=True)
class Box:
    """One labelled box in pixels, ``x1 <= x2`` and ``y1 <= y2`` (on the 504 grid unless scaled)."""

    label: str
    x1: float
    y1: float
    x2: float
    y2: float

    def as_list(self) -> list[float]:
        """``[x1, y1, x2, y2]``."""
        return [self.x1, self.y1, self.x2, self.y2]

    @property
    def center(self) -> tuple[float, float]:
        """``(x, y)`` centre in pixels."""
        return ((self.x1 + self.x2) / 2.0, (self.y1 + self.y2) / 2.0)


@dataclass(frozen=True)
class ParseResult(Generic[T]):
    """What a parser read from one model answer.

    :ivar value: the parsed value, always of the task's type (detection: ``tuple[Box, ...]``; counting:
        ``int | None``; grounding: ``tuple[int, ...]``; classification: ``str | None``). On failure it is the
        empty value (``()`` or ``None``).
    :ivar ok: True when the text was understood (possibly after the repairs listed in ``notes``).
    :ivar error: why ``ok`` is False; None when ok.
    :ivar notes: repairs applied, in order (e.g. "code fence removed", "truncated list: kept 2 object(s)").
    :ivar raw: the text as given.
    :ivar spans: detection only: per box of ``value``, the ``(start, end)`` character ranges in ``raw`` of
        the text its coordinates were read from (the four numbers of its ``bbox_2d``; the whole object's
        text when they cannot be told apart). Empty for the other parsers. Per-box confidences are read from
        the tokens over these ranges (:func:`fusarbatch.model.confidence.box_confidences`).
    """

    value: T
    ok: bool
    error: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)
    raw: str = ""
    spans: tuple[tuple[tuple[int, int], ...], ...] = ()


# --------------------------------------------------------------------------------------------- helpers
_FENCE_RE = re.compile(r"(?:```|''')[ \t]*([A-Za-z0-9_-]*)[ \t]*\r?\n?(.*?)(?:```|'''|\Z)", re.DOTALL)
_NONE_RE = re.compile(r"^\W*(?:none|null|nothing|no)\b[\W_]*$", re.IGNORECASE)
_NONE_START_RE = re.compile(r"^\W*(?:none|null)\b", re.IGNORECASE)
_NUM = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUM_RE = re.compile(_NUM)
_FLAT_OBJ_RE = re.compile(r"\{[^{}]*\}")
_BBOX_RE = re.compile(
    r"""['"]?bbox(?:_2d)?['"]?\s*[:=]\s*\[?\s*['"]?("""
    + _NUM
    + r""")['"]?\s*,\s*['"]?("""
    + _NUM
    + r""")['"]?"""
    r"""\s*,\s*['"]?(""" + _NUM + r""")['"]?\s*,\s*['"]?(""" + _NUM + r""")['"]?""",
    re.IGNORECASE,
)
_LABEL_RE = re.compile(r"""['"]?label['"]?\s*[:=]\s*(?:"([^"]*)"|'([^']*)')""", re.IGNORECASE)
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
    "sixteen seventeen eighteen nineteen twenty"
)
_INT_WORDS = {w: i for i, w in enumerate(_NUMBER_WORDS.split())}
_MAX_COUNT = 100_000
_DIMS_RE = re.compile(r"\d+\s*[x\u00d7]\s*\d+")
_MAX_JSON_TRIES = 64  # decode attempts per answer: bounds the time spent on pathological text
_NO_TARGET_RE = re.compile(r"\b(?:there\s+(?:are|is)\s+no|no\s+such)\b", re.IGNORECASE)


def _as_text(text: object) -> str | None:
    return text if isinstance(text, str) else None


def _unfence(text: str, notes: list[str]) -> str:
    """The body of the first ```/''' code fence when there is one (an unclosed fence runs to the end)."""
    return _unfence_at(text, notes)[0]


def _unfence_at(text: str, notes: list[str]) -> tuple[str, int]:
    """:func:`_unfence` and where the body starts in ``text``."""
    m = _FENCE_RE.search(text)
    if m is None:
        return text, 0
    body = m.group(2)
    if not body.strip():
        return text, 0
    notes.append("code fence removed")
    return body, m.start(2)


_JSON_WS = re.compile(r"[ \t\n\r]*")


def _list_item_spans(text: str, start: int) -> list[tuple[int, int]]:
    """``(start, end)`` of each item of the JSON list that :func:`_first_json` decoded at ``text[start]``.

    The list is known to decode, so walking it item by item with the same decoder cannot fail.
    """
    decoder = json.JSONDecoder()
    i = _JSON_WS.match(text, start + 1).end()  # type: ignore[union-attr]
    spans: list[tuple[int, int]] = []
    while text[i] != "]":
        _, end = decoder.raw_decode(text, i)
        spans.append((i, end))
        i = _JSON_WS.match(text, end).end()  # type: ignore[union-attr]
        if text[i] == ",":
            i = _JSON_WS.match(text, i + 1).end()  # type: ignore[union-attr]
    return spans


def _coordinate_spans(text: str, start: int, end: int) -> tuple[tuple[int, int], ...]:
    """Character ranges of the four ``bbox_2d`` numbers inside ``text[start:end]`` (one object's text);
    the whole range when the pattern does not find them."""
    m = _BBOX_RE.search(text, start, end)
    if m is None:
        return ((start, end),)
    return tuple(m.span(k) for k in range(1, 5))


def _to_float(v: object) -> float | None:
    """A finite float from a JSON number or a numeric string; None otherwise (bools are not numbers)."""
    if isinstance(v, bool):
        return None
    if isinstance(v, int | float):
        f = float(v)
    elif isinstance(v, str):
        s = v.strip()
        if not re.fullmatch(_NUM, s):
            return None
        try:
            f = float(s)
        except (ValueError, OverflowError):
            return None
    else:
        return None
    return f if math.isfinite(f) else None


def _clean_label(v: object) -> str | None:
    if not isinstance(v, str):
        return None
    s = " ".join(v.split())
    return s or None


def _box_from_values(
    coords: Sequence[object], label: str | None, grid: int, notes: list[str], index: int
) -> Box | None:
    if label is None:
        notes.append(f"object {index}: no label, dropped")
        return None
    if len(coords) != 4:
        notes.append(f"object {index}: bbox_2d has {len(coords)} values, dropped")
        return None
    vals = [_to_float(c) for c in coords]
    if any(v is None for v in vals):
        notes.append(f"object {index}: non-numeric or non-finite coordinate, dropped")
        return None
    x1, y1, x2, y2 = (float(v) for v in vals)  # type: ignore[arg-type]
    if x1 > x2 or y1 > y2:
        x1, x2 = min(x1, x2), max(x1, x2)
        y1, y2 = min(y1, y2), max(y1, y2)
        notes.append(f"object {index}: corners swapped")
    cx1, cy1, cx2, cy2 = (min(max(v, 0.0), float(grid)) for v in (x1, y1, x2, y2))
    if (cx1, cy1, cx2, cy2) != (x1, y1, x2, y2):
        notes.append(f"object {index}: clipped to [0, {grid}]")
    if cx2 <= cx1 or cy2 <= cy1:
        notes.append(f"object {index}: degenerate box, dropped")
        return None
    return Box(label, cx1, cy1, cx2, cy2)


def _box_from_obj(
    obj: object, default_label: str | None, grid: int, notes: list[str], index: int
) -> Box | None:
    if not isinstance(obj, dict):
        notes.append(f"object {index}: not an object, dropped")
        return None
    coords = obj.get("bbox_2d", obj.get("bbox"))
    if isinstance(coords, str):
        coords = _NUM_RE.findall(coords)
    if not isinstance(coords, list | tuple):
        notes.append(f"object {index}: no bbox_2d list, dropped")
        return None
    label = _clean_label(obj.get("label")) if "label" in obj else default_label
    return _box_from_values(coords, label, grid, notes, index)


def _lenient_obj(text: str, default_label: str | None, grid: int, notes: list[str], index: int) -> Box | None:
    """A box from one flat ``{...}`` that is not valid JSON (single quotes, trailing commas, ...)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        m = _BBOX_RE.search(text)
        if m is None:
            notes.append(f"object {index}: no bbox_2d, dropped")
            return None
        lm = _LABEL_RE.search(text)
        label = _clean_label(lm.group(1) if lm.group(1) is not None else lm.group(2)) if lm else default_label
        return _box_from_values(list(m.groups()), label, grid, notes, index)
    return _box_from_obj(obj, default_label, grid, notes, index)


def _first_json(text: str, opener: str) -> tuple[Any, bool]:
    """The first JSON value starting at an ``opener`` character that decodes; (None, False) if none does."""
    value, found, _ = _first_json_at(text, opener)
    return value, found


def _first_json_at(text: str, opener: str) -> tuple[Any, bool, int]:
    """:func:`_first_json` and where the value starts (-1 when none decodes)."""
    decoder = json.JSONDecoder()
    start = text.find(opener)
    for _ in range(_MAX_JSON_TRIES):
        if start == -1:
            break
        try:
            value, _ = decoder.raw_decode(text, start)
        except (ValueError, RecursionError):
            start = text.find(opener, start + 1)
            continue
        return value, True, start
    return None, False, -1


def _fail(raw: str, value: T, error: str, notes: list[str]) -> ParseResult[T]:
    return ParseResult(value=value, ok=False, error=error, notes=tuple(notes), raw=raw)


# --------------------------------------------------------------------------------------------- detection
def parse_detection(
    text: str, *, default_label: str | None = None, grid: int = GRID
) -> ParseResult[tuple[Box, ...]]:
    """Parse a detection answer into boxes on the ``grid`` x ``grid`` image. Never raises.

    Accepted: a JSON list of ``{"bbox_2d": [x1, y1, x2, y2], "label": ...}`` (also a single object), inside a
    ```json (or ''') fence anywhere and with prose around it; ``None`` / ``none.`` / ``None!`` / ``null`` /
    ``[]`` for no target; a truncated list (the complete objects are kept); objects that are not strict JSON
    (single quotes, trailing commas: read by pattern); coordinates as numeric strings; ``bbox`` for
    ``bbox_2d``. Corners are swapped into ``x1 <= x2``, ``y1 <= y2``, boxes are clipped to ``[0, grid]`` (the
    training ground truth itself runs past the edge), then boxes with zero width or height after clipping,
    non-finite coordinates or no label are dropped (each noted).

    :param text: the model's answer.
    :param default_label: label for objects that have none (e.g. the category asked for); None drops them.
    :param grid: side of the square coordinate grid in pixels.
    :returns: ``value`` = the boxes in answer order, ``spans`` = per box the character ranges in ``text``
        of its four coordinates; ``ok`` False (and ``value == ()``) when the text holds neither a None
        answer nor any readable object.
    """
    raw = _as_text(text)
    if raw is None:
        return _fail("", (), f"answer is {type(text).__name__}, not str", [])
    notes: list[str] = []
    fenced, at = _unfence_at(raw, notes)
    body = fenced.strip()
    at += len(fenced) - len(fenced.lstrip())  # raw[at + i] == body[i]
    if _NONE_RE.match(body) or (_NONE_START_RE.match(body) and "{" not in body):
        return ParseResult(value=(), ok=True, notes=tuple(notes), raw=raw)
    if "{" not in body and _NO_TARGET_RE.search(body):
        notes.append("no-target prose read as None")
        return ParseResult(value=(), ok=True, notes=tuple(notes), raw=raw)

    boxes: list[Box] = []
    spans: list[tuple[tuple[int, int], ...]] = []
    value, found, start = _first_json_at(body, "[")
    if found and isinstance(value, list) and (not value or any(isinstance(v, dict) for v in value)):
        for i, (obj, (s, e)) in enumerate(zip(value, _list_item_spans(body, start), strict=True)):
            box = _box_from_obj(obj, default_label, grid, notes, i)
            if box is not None:
                boxes.append(box)
                spans.append(_shift(_coordinate_spans(body, s, e), at))
        if value and not boxes:
            return _fail(raw, (), "no usable box in the JSON list", notes)
        return ParseResult(value=tuple(boxes), ok=True, notes=tuple(notes), raw=raw, spans=tuple(spans))

    # Not a decodable list: a lone object, a truncated list or loose JSON. Keep each complete flat object.
    objects = list(_FLAT_OBJ_RE.finditer(body))
    for i, m in enumerate(objects):
        box = _lenient_obj(m.group(0), default_label, grid, notes, i)
        if box is not None:
            boxes.append(box)
            spans.append(_shift(_coordinate_spans(body, *m.span()), at))
    if boxes:
        opened = re.search(r"\[\s*\{", body) is not None
        closed = re.match(r"\}\s*\]", body[body.rfind("}") :]) is not None
        if opened and not closed:
            notes.append(f"truncated list: kept {len(boxes)} complete object(s)")
        elif opened or len(objects) > 1:
            notes.append(f"malformed JSON: recovered {len(boxes)} object(s)")
        return ParseResult(value=tuple(boxes), ok=True, notes=tuple(notes), raw=raw, spans=tuple(spans))
    if re.search(r"\[\s*\]", body) and not objects:
        return ParseResult(value=(), ok=True, notes=tuple(notes), raw=raw)
    if objects:
        return _fail(raw, (), "no usable box in the answer", notes)
    if "[" in body or "{" in body:
        return _fail(raw, (), "truncated or malformed JSON with no complete object", notes)
    return _fail(raw, (), "neither a JSON list of boxes nor None", notes)


def _shift(spans: tuple[tuple[int, int], ...], by: int) -> tuple[tuple[int, int], ...]:
    return tuple((s + by, e + by) for s, e in spans)


def format_detection_answer(boxes: Iterable[Box]) -> str:
    """The training answer for a detection: compact JSON list with integer coordinates, or ``None``.

    Matches the official answers (``[{"bbox_2d": [102, 267, 161, 328], "label": "plane"}, ...]``); coordinates
    are rounded, not clipped (the official ground truth runs past the edge).
    """
    items = [{"bbox_2d": [round(v) for v in b.as_list()], "label": b.label} for b in boxes]
    return json.dumps(items, ensure_ascii=False) if items else "None"


# --------------------------------------------------------------------------------------------- counting
def parse_count(text: str) -> ParseResult[int | None]:
    """Parse a counting answer into a non-negative integer. Never raises.

    Accepted: ``3``, ``3.``, ``"3"``, ``{"count": 3}``, a fence, prose (the first number that is not part of
    an image size such as ``504x504`` is taken, and noted),
    number words zero..twenty, and ``None`` / ``no`` (read as 0, noted). Negative, fractional and absurd
    (> 100000) numbers fail.
    """
    raw = _as_text(text)
    if raw is None:
        return _fail("", None, f"answer is {type(text).__name__}, not str", [])
    notes: list[str] = []
    body = _unfence(raw, notes).strip()
    value, found = _first_json(body, "{")
    if found and isinstance(value, dict):
        for key in ("count", "number", "answer"):
            if key in value:
                body = str(value[key])
                notes.append(f"read from JSON key {key!r}")
                break
    stripped = body.strip().strip("\"'`.!;: \t\r\n")
    m = _NUM_RE.search(_DIMS_RE.sub(" ", body))  # "504x504" is an image size, not a count
    if re.fullmatch(_NUM, stripped):
        num_text = stripped
    elif m is not None:
        num_text = m.group(0)
        notes.append("number taken from prose")
    else:
        words = re.findall(r"[a-z]+", body.lower())
        for w in words:
            if w in _INT_WORDS:
                notes.append(f"number word {w!r}")
                return ParseResult(value=_INT_WORDS[w], ok=True, notes=tuple(notes), raw=raw)
        if _NONE_RE.match(body) or (words and words[0] in ("none", "no")):
            notes.append("None read as 0")
            return ParseResult(value=0, ok=True, notes=tuple(notes), raw=raw)
        return _fail(raw, None, "no number in the answer", notes)
    f = _to_float(num_text)
    if f is None or f != int(f) or f < 0 or f > _MAX_COUNT:
        return _fail(raw, None, f"not a non-negative integer count: {num_text!r}", notes)
    return ParseResult(value=int(f), ok=True, notes=tuple(notes), raw=raw)


def format_count_answer(count: int) -> str:
    """The training answer for counting: the integer as text."""
    return str(int(count))


# --------------------------------------------------------------------------------------------- grounding
def grounding_cell(x: float, y: float, *, grid: int = GRID) -> int:
    """The 3 x 3 cell (1..9, row-major from the top left) holding pixel ``(x, y)``; clamped to the image."""
    col = min(max(int(x * 3 // grid), 0), 2)
    row = min(max(int(y * 3 // grid), 0), 2)
    return row * 3 + col + 1


def grounding_cells(boxes: Iterable[Box], *, grid: int = GRID) -> list[int]:
    """Cells holding the boxes' centres: the cell with the most boxes first, ties by lower cell number."""
    counts = Counter(grounding_cell(*b.center, grid=grid) for b in boxes)
    return sorted(counts, key=lambda c: (-counts[c], c))


def format_grounding_answer(cells: Iterable[int]) -> str:
    """The training answer for grounding: a JSON list such as ``[5, 1]`` (``[]`` when empty)."""
    return json.dumps([int(c) for c in cells])


def parse_grounding(text: str) -> ParseResult[tuple[int, ...]]:
    """Parse a grounding answer into distinct cells 1..9 in answer order. Never raises.

    Accepted: a JSON list of ints or numeric strings (``[5, 1]``, ``["5"]``), a fence, prose with the numbers
    (``cells 1 and 5``), ``[]`` / ``None`` for no target. Numbers outside 1..9 and repeats are dropped
    (noted).
    """
    raw = _as_text(text)
    if raw is None:
        return _fail("", (), f"answer is {type(text).__name__}, not str", [])
    notes: list[str] = []
    body = _unfence(raw, notes).strip()
    if _NONE_RE.match(body):
        return ParseResult(value=(), ok=True, notes=tuple(notes), raw=raw)
    value, found = _first_json(body, "[")
    if found and isinstance(value, list):
        items: list[object] = value
    else:
        items = list(_NUM_RE.findall(body))
        if not items:
            return _fail(raw, (), "no cell numbers in the answer", notes)
        notes.append("cells taken from prose")
    cells: list[int] = []
    for item in items:
        f = _to_float(item)
        if f is None or f != int(f) or not 1 <= f <= 9:
            notes.append(f"dropped {str(item)[:20]!r}: not a cell 1..9")
            continue
        if int(f) in cells:
            notes.append(f"dropped repeated cell {int(f)}")
            continue
        cells.append(int(f))
    if items and not cells:
        return _fail(raw, (), "no valid cell number 1..9", notes)
    return ParseResult(value=tuple(cells), ok=True, notes=tuple(notes), raw=raw)


# --------------------------------------------------------------------------------------------- classification
def format_class_answer(label: str) -> str:
    """The training answer for classification: the category name."""
    return label


def parse_class(text: str, choices: Sequence[str] | None = None) -> ParseResult[str | None]:
    """Parse a classification answer into a category name. Never raises.

    With ``choices``, the answer must name one of them (case-insensitive, the longest name found first; the
    returned value is spelled as in ``choices``). Without, the first line is normalised (fence, quotes,
    a leading "The category is", trailing punctuation removed; lower-cased). ``{"label": ...}`` is accepted.
    """
    raw = _as_text(text)
    if raw is None:
        return _fail("", None, f"answer is {type(text).__name__}, not str", [])
    notes: list[str] = []
    body = _unfence(raw, notes).strip()
    value, found = _first_json(body, "{")
    if found and isinstance(value, dict):
        for key in ("label", "category", "class", "answer"):
            if isinstance(value.get(key), str):
                body = value[key]
                notes.append(f"read from JSON key {key!r}")
                break
    if choices:
        low = body.lower()
        for choice in sorted(choices, key=len, reverse=True):
            if re.search(r"(?<![a-z0-9])" + re.escape(choice.lower()) + r"(?![a-z0-9])", low):
                return ParseResult(value=choice, ok=True, notes=tuple(notes), raw=raw)
        return _fail(raw, None, "the answer names none of the choices", notes)
    line = next((s for s in body.splitlines() if s.strip()), "")
    line = re.sub(r"^\W*(?:the\s+)?(?:category|class|target)\s*(?:is\b|:)\s*", "", line, flags=re.IGNORECASE)
    label = " ".join(line.strip().strip("\"'`.!?,;:*()[]{} \t").split()).lower()
    if not label:
        return _fail(raw, None, "empty answer", notes)
    return ParseResult(value=label, ok=True, notes=tuple(notes), raw=raw)


# --------------------------------------------------------------------------------------------- scaling
def scale_box_to_tile(box: Box, width: float, height: float, grid: int = GRID) -> Box:
    """Scale a box from the ``grid`` x ``grid`` model input to a ``width`` x ``height`` pixel tile.

    Per axis: ``x * width / grid``, ``y * height / grid`` (DESIGN 3.4). Units: pixels in, pixels out.
    """
    sx, sy = width / grid, height / grid
    return Box(box.label, box.x1 * sx, box.y1 * sy, box.x2 * sx, box.y2 * sy)
