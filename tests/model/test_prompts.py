"""Prompts and answer parsers: real-looking answers, then arbitrary text (hypothesis)."""

from __future__ import annotations

import itertools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fusarbatch.model.prompts import (
    GRID,
    Box,
    ParseResult,
    classification_prompt,
    counting_prompt,
    detection_prompt,
    format_count_answer,
    format_detection_answer,
    format_grounding_answer,
    grounding_cell,
    grounding_cells,
    grounding_prompt,
    parse_class,
    parse_count,
    parse_detection,
    parse_grounding,
    regrid_classification_prompt,
    scale_box_to_tile,
)

# The question of the official examples/detection.jsonl (kklvyyhadr/FUSAR-GPT @ 2079a37), verbatim.
OFFICIAL_PLANE_QUESTION = (
    "This is a SAR image. Please carefully check the image and detect the following object: plane. "
    "Output each detected target\u2019s bbox coordinates in JSON format. "
    "The format of the bbox coordinates is:  '''json [ {  "
    '"bbox_2d": [x1, y1, x2, y2], "label": "category name" }, {  "bbox_2d": [x1, y1, x2, y2], "label": '
    "\"category name\" } ]  '''  If there are no such targets in the image, simply respond with None."
)


def coords(result: ParseResult) -> list[tuple[str, float, float, float, float]]:
    return [(b.label, b.x1, b.y1, b.x2, b.y2) for b in result.value]


# ------------------------------------------------------------ prompts
def test_detection_prompt_is_the_official_text() -> None:
    assert detection_prompt("plane") == OFFICIAL_PLANE_QUESTION
    assert "object: ship." in detection_prompt("ship")


def test_other_prompts_name_the_task() -> None:
    assert "ship" in counting_prompt("ship") and "integer" in counting_prompt("ship")
    g = grounding_prompt("plane")
    assert "3x3" in g and "1 2 3 is the top row" in g and "[]" in g
    c = classification_prompt(Box("x", 10.4, 20.6, 30, 40), choices=["plane", "ship"])
    assert "[10, 21, 30, 40]" in c and "Choose one of: plane, ship." in c and "504x504" in c
    on_336 = classification_prompt([0, 0, 336, 336], ["ship"], grid=336)
    assert "[0, 0, 336, 336]" in on_336 and "on the 336x336 image" in on_336


def test_classification_question_moves_to_the_models_grid() -> None:
    q = classification_prompt([0, 0, 504, 504], ["ship", "background"])
    assert regrid_classification_prompt(q, 336) == classification_prompt(
        [0, 0, 336, 336], ["ship", "background"], grid=336
    )
    q = classification_prompt([100, 51, 251, 503], None, grid=504)  # 100 * 2/3 = 66.67 -> 67, 51 -> 34
    assert "[67, 34, 167, 335]" in regrid_classification_prompt(q, 336)
    assert regrid_classification_prompt(q, 504) == q
    assert regrid_classification_prompt("What is it?", 336) == "What is it?"  # not ours: left as it is
    # the record's grid wins over the one the text names (manifests whose text said 504 for a 336 box)
    said_504 = classification_prompt([0, 0, 336, 336], ["ship"], grid=504)
    assert "[0, 0, 224, 224]" in regrid_classification_prompt(said_504, 224, from_grid=336)
    assert regrid_classification_prompt(said_504, 336, from_grid=336) == said_504


def test_detection_spans_point_at_each_boxs_numbers_in_every_answer_form() -> None:
    forms = [
        'Sure.\n```json\n  [{"bbox_2d": [1, 2, 30, 40], "label": "ship"}, '
        '{"label": "x", "bbox_2d": ["5", 6.5, 70, 80]}]\n```',
        '[{"bbox_2d": [1, 2, 30, 40], "label": "ship"}, {"bbox_2d": [5, 6.5, 70, 80], "label": "x"}, '
        '{"bbox_2d": [9,',
        "[{'bbox_2d': [1, 2, 30, 40], 'label': 'ship',}, {'bbox_2d': [5, 6.5, 70, 80], 'label': 'x'}]",
        '[{"bbox_2d": [0, 0, 0, 9], "label": "dropped"}, {"bbox_2d": "1,2,30,40", "label": "a"}, '
        '{"bbox_2d": [5, 6.5, 70, 80], "label": "b"}]',
    ]
    for text in forms:
        r = parse_detection(text)
        assert len(r.value) == 2, text
        assert [[text[s:e] for s, e in spans] for spans in r.spans] == [
            ["1", "2", "30", "40"],
            ["5", "6.5", "70", "80"],
        ]


# ------------------------------------------------------------ detection examples
def test_official_answer_parses_exactly() -> None:
    text = (
        '[{"bbox_2d": [102, 267, 161, 328], "label": "plane"}, {"bbox_2d": [149, 365, 207, 425], "label": '
        '"plane"}, {"bbox_2d": [202, 468, 260, 529], "label": "plane"}]'
    )
    r = parse_detection(text)
    assert r.ok and r.error is None
    # the third box runs past the edge (as in the official ground truth): clipped to 504
    assert coords(r) == [
        ("plane", 102, 267, 161, 328),
        ("plane", 149, 365, 207, 425),
        ("plane", 202, 468, 260, 504),
    ]
    assert any("clipped" in n for n in r.notes)


@pytest.mark.parametrize(
    "text",
    [
        '```json\n[\n\t{"bbox_2d": [-35, 134, 95, 246], "label": "plane"}\n]\n```',
        'Sure! Here they are:\n```json\n[{"bbox_2d": [-35, 134, 95, 246], "label": "plane"}]\n```\nDone.',
        "'''json [ {  \"bbox_2d\": [-35, 134, 95, 246], \"label\": \"plane\" } ]  '''",
        'The detections are [{"bbox_2d": [-35, 134, 95, 246], "label": "plane"}] as requested.',
        '{"bbox_2d": [-35, 134, 95, 246], "label": "plane"}',
        '[{"bbox_2d": ["-35", "134", "95.0", "246"], "label": "plane"}]',
        '[{"bbox_2d": "[-35, 134, 95, 246]", "label": " plane "}]',
        "[{'bbox_2d': [-35, 134, 95, 246], 'label': 'plane'}]",
        '[{"bbox_2d": [95, 246, -35, 134], "label": "plane"}]',
        '[{"bbox_2d": [-35, 134, 95, 246], "label": "plane"},]',
    ],
)
def test_detection_variants(text: str) -> None:
    r = parse_detection(text)
    assert r.ok, r.error
    assert coords(r) == [("plane", 0, 134, 95, 246)]
    assert r.raw == text


@pytest.mark.parametrize(
    "text", ["None", "none.", "None!", "  NONE  ", "```\nNone\n```", "null", "[]", "```json\n[]\n```",
             "None of the targets are present.", "There are no such targets in the image."]
)  # fmt: skip
def test_detection_none_variants(text: str) -> None:
    r = parse_detection(text)
    assert r.ok and r.value == () and r.error is None


def test_truncated_list_keeps_complete_objects() -> None:
    text = (
        '[{"bbox_2d": [10, 20, 30, 40], "label": "ship"}, {"bbox_2d": [50, 60, 70, 80], "label": "ship"}, '
        '{"bbox_2d": [90, 100, 1'
    )
    r = parse_detection(text)
    assert r.ok and coords(r) == [("ship", 10, 20, 30, 40), ("ship", 50, 60, 70, 80)]
    assert any("truncated list: kept 2" in n for n in r.notes)
    r = parse_detection(
        '```json\n[{"bbox_2d": [10, 20, 30, 40], "label": "ship"}, {"bbox_2d": [50, 60, 70, 80], "la'
    )
    assert r.ok and coords(r) == [("ship", 10, 20, 30, 40)]
    r = parse_detection('[{"bbox_2d": [10, 20')
    assert not r.ok and r.value == () and "truncated" in (r.error or "")


def test_bad_boxes_are_dropped_with_notes() -> None:
    text = json.dumps(
        [
            {"bbox_2d": [10, 10, 10, 50], "label": "ship"},  # zero width
            {"bbox_2d": [600, 10, 700, 50], "label": "ship"},  # outside: zero width after clipping
            {"bbox_2d": [1, 2, 3], "label": "ship"},  # three values
            {"bbox_2d": [1, 2, 3, "x"], "label": "ship"},  # not a number
            {"bbox_2d": [1, 2, 30, 40]},  # no label
            {"bbox_2d": [True, 2, 30, 40], "label": "ship"},  # bools are not numbers
            {"bbox_2d": [5, 6, 70, 80], "label": "ship"},  # fine
        ]
    )
    r = parse_detection(text)
    assert r.ok and coords(r) == [("ship", 5, 6, 70, 80)]
    assert len(r.notes) >= 6
    r = parse_detection(text, default_label="ship")
    assert coords(r) == [("ship", 1, 2, 30, 40), ("ship", 5, 6, 70, 80)]
    r = parse_detection('[{"bbox_2d": [NaN, 2, Infinity, 40], "label": "ship"}]')
    assert not r.ok and r.value == () and r.error == "no usable box in the JSON list"


@pytest.mark.parametrize(
    "text", ["I cannot tell.", "", "```json\n```", "{", "[1, 2, 3, 4]", "{'label': 'ship'}"]
)
def test_detection_failures_are_results_not_exceptions(text: str) -> None:
    r = parse_detection(text)
    assert not r.ok and r.value == () and isinstance(r.error, str) and r.error


def test_non_string_answers() -> None:
    for parse in (parse_detection, parse_count, parse_grounding, parse_class):
        r = parse(None)  # type: ignore[arg-type]
        assert not r.ok and "NoneType" in (r.error or "")


def test_detection_answer_round_trip() -> None:
    boxes = [Box("plane", 1, 2, 30, 40), Box("ship", 100.4, 200.6, 300, 400)]
    text = format_detection_answer(boxes)
    assert (
        text == '[{"bbox_2d": [1, 2, 30, 40], "label": "plane"}, '
        '{"bbox_2d": [100, 201, 300, 400], "label": "ship"}]'
    )
    assert coords(parse_detection(text)) == [("plane", 1, 2, 30, 40), ("ship", 100, 201, 300, 400)]
    assert format_detection_answer([]) == "None"


# ------------------------------------------------------------ counting / grounding / class
@pytest.mark.parametrize(
    ("text", "value"),
    [("3", 3), ("3.", 3), ("12\n", 12), ('"7"', 7), ("There are 3 ships.", 3),
     ('```json\n{"count": 4}\n```', 4),
     ("three", 3), ("Zero.", 0), ("None", 0), ("0", 0), ("5.0", 5), ("The 504x504 image holds 3 ships.", 3)],
)  # fmt: skip
def test_count_examples(text: str, value: int) -> None:
    r = parse_count(text)
    assert r.ok and r.value == value


@pytest.mark.parametrize("text", ["-2", "2.5", "", "many", "1e9", "```json\n{}\n```"])
def test_count_failures(text: str) -> None:
    r = parse_count(text)
    assert not r.ok and r.value is None and r.error


@pytest.mark.parametrize(
    ("text", "cells"),
    [("[5, 1]", (5, 1)), ('["3", 7]', (3, 7)), ("[]", ()), ("None", ()), ("Cells 2 and 8.", (2, 8)),
     ("```json\n[9]\n```", (9,)), ("[4, 4, 0, 10]", (4,))],
)  # fmt: skip
def test_grounding_examples(text: str, cells: tuple[int, ...]) -> None:
    r = parse_grounding(text)
    assert r.ok and r.value == cells


@pytest.mark.parametrize("text", ["[12]", "no idea", "[0]"])
def test_grounding_failures(text: str) -> None:
    r = parse_grounding(text)
    assert not r.ok and r.value == ()


def test_grounding_cells_numbering_and_order() -> None:
    assert [grounding_cell(x, y) for x, y in [(0, 0), (503, 0), (252, 252), (0, 503), (504, 504)]] == [
        1,
        3,
        5,
        7,
        9,
    ]
    assert grounding_cell(167.9, 0) == 1 and grounding_cell(168, 0) == 2  # 504 / 3 = 168 px per cell
    boxes = [
        Box("s", 200, 200, 260, 260),
        Box("s", 240, 240, 300, 300),
        Box("s", 0, 0, 20, 20),
        Box("s", 480, 480, 504, 504),
    ]
    assert grounding_cells(boxes) == [5, 1, 9]  # most targets first, ties by cell number
    assert format_grounding_answer(grounding_cells(boxes)) == "[5, 1, 9]"
    assert parse_grounding(format_grounding_answer([5, 1, 9])).value == (5, 1, 9)


@pytest.mark.parametrize(
    ("text", "choices", "value"),
    [("Ship.", None, "ship"), ("The category is Boeing737.", None, "boeing737"),
     ("  oil tank\n", None, "oil tank"),
     ("It is a boeing737 aircraft", ["plane", "ship", "boeing737"], "boeing737"),
     ("a321", ["A220", "A321"], "A321"),
     ('```json\n{"label": "tanker"}\n```', None, "tanker"), ("Category: Ship", None, "ship"),
     ("cargo ship", ["ship", "cargo ship"], "cargo ship")],
)  # fmt: skip
def test_class_examples(text: str, choices: list[str] | None, value: str) -> None:
    r = parse_class(text, choices)
    assert r.ok and r.value == value


def test_class_failures() -> None:
    assert not parse_class("").ok
    r = parse_class("a helicopter", ["plane", "ship"])
    assert not r.ok and r.value is None and "none of the choices" in (r.error or "")
    assert not parse_class("airship", ["ship"]).ok  # whole words only


def test_scale_box_to_tile() -> None:
    b = scale_box_to_tile(Box("ship", 10, 20, 30, 40), width=1008, height=252)
    assert (b.label, b.x1, b.y1, b.x2, b.y2) == ("ship", 20, 10, 60, 20)
    same = scale_box_to_tile(Box("ship", 10, 20, 30, 40), width=GRID, height=GRID)
    assert same == Box("ship", 10, 20, 30, 40)


def test_count_round_trip() -> None:
    assert parse_count(format_count_answer(17)).value == 17


# ------------------------------------------------------------ properties
PROP = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def check_detection(r: ParseResult) -> None:
    assert isinstance(r, ParseResult) and isinstance(r.value, tuple) and isinstance(r.notes, tuple)
    assert (r.error is None) == r.ok
    if not r.ok:
        assert r.value == () and isinstance(r.error, str)
    for b in r.value:
        assert isinstance(b, Box) and isinstance(b.label, str) and b.label
        assert 0 <= b.x1 < b.x2 <= GRID and 0 <= b.y1 < b.y2 <= GRID
        assert all(isinstance(v, float) for v in (b.x1, b.y1, b.x2, b.y2))
    # one set of character ranges per box, inside the text, in answer order, never overlapping another box's
    assert len(r.spans) == len(r.value)
    flat = [span for spans in r.spans for span in spans]
    assert all(0 <= s < e <= len(r.raw) for s, e in flat)
    assert flat == sorted(flat) and all(a[1] <= b[0] for a, b in itertools.pairwise(flat))


def check_others(text: str) -> None:
    c = parse_count(text)
    assert (c.error is None) == c.ok and (c.value is not None) == c.ok
    assert c.value is None or (isinstance(c.value, int) and 0 <= c.value <= 100_000)
    g = parse_grounding(text)
    assert (g.error is None) == g.ok and isinstance(g.value, tuple)
    assert all(isinstance(v, int) and 1 <= v <= 9 for v in g.value) and len(set(g.value)) == len(g.value)
    k = parse_class(text)
    assert (k.error is None) == k.ok and (k.value is None or (isinstance(k.value, str) and k.value))
    k2 = parse_class(text, ["plane", "ship"])
    assert k2.value in (None, "plane", "ship")


@PROP
@given(st.text())
def test_parsers_never_raise_on_arbitrary_text(text: str) -> None:
    check_detection(parse_detection(text))
    check_detection(parse_detection(text, default_label="ship"))
    check_others(text)


JSONISH = st.text(alphabet="[]{}\",:0123456789 -.eE'`\nNnoeabdlxt_", max_size=200)


@PROP
@given(JSONISH)
def test_parsers_never_raise_on_json_like_noise(text: str) -> None:
    check_detection(parse_detection(text))
    check_others(text)


coord = st.one_of(
    st.integers(-1000, 2000),
    st.floats(allow_nan=True, allow_infinity=True),
    st.integers(-100, 600).map(str),
    st.text(max_size=5),
    st.none(),
    st.booleans(),
)
obj = st.fixed_dictionaries(
    {"bbox_2d": st.one_of(st.lists(coord, min_size=0, max_size=6), coord)},
    optional={"label": st.one_of(st.text(max_size=12), st.integers())},
)


@st.composite
def near_json(draw: st.DrawFn) -> str:
    items = draw(st.lists(obj, max_size=6))
    text = (
        json.dumps(items, allow_nan=True)
        if draw(st.booleans())
        else json.dumps(items, allow_nan=True, indent=2)
    )
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]  # truncated answer
    if draw(st.booleans()):
        text = text.replace('"', "'")
    if draw(st.booleans()):
        text = "```json\n" + text + ("\n```" if draw(st.booleans()) else "")
    return draw(st.text(max_size=20)) + text + draw(st.text(max_size=20))


@PROP
@given(near_json())
def test_parsers_never_raise_on_near_json(text: str) -> None:
    check_detection(parse_detection(text))
    check_others(text)


valid_box = st.tuples(
    st.sampled_from(["plane", "ship", "oil tank", "A321"]),
    st.integers(0, 503),
    st.integers(0, 503),
    st.integers(1, 504),
    st.integers(1, 504),
).filter(lambda t: t[1] < t[3] and t[2] < t[4])


@PROP
@given(st.lists(valid_box, max_size=8), st.data())
def test_valid_answers_round_trip_and_truncation_keeps_a_prefix(boxes, data) -> None:
    expected = [(lab, float(x1), float(y1), float(x2), float(y2)) for lab, x1, y1, x2, y2 in boxes]
    text = format_detection_answer([Box(*b) for b in boxes])
    r = parse_detection(text)
    assert r.ok and coords(r) == expected and r.notes == ()
    # each box's ranges are its four numbers
    assert [[float(text[s:e]) for s, e in spans] for spans in r.spans] == [list(b[1:]) for b in expected]
    cut = text[: data.draw(st.integers(0, len(text)))]
    got = parse_detection(cut)
    assert coords(got) == expected[: len(got.value)]
    assert [[float(cut[s:e]) for s, e in spans] for spans in got.spans] == [
        list(b[1:]) for b in expected[: len(got.value)]
    ]


@PROP
@given(st.integers(0, 100_000), st.lists(st.integers(1, 9), unique=True))
def test_count_and_grounding_round_trip(n: int, cells: list[int]) -> None:
    assert parse_count(format_count_answer(n)).value == n
    assert parse_grounding(format_grounding_answer(cells)).value == tuple(cells)
