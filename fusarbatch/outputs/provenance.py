"""Which tiles and anchors a scene's GeoParquet outputs were made from, so that ``tiles.zarr`` and the
GeoParquet never silently disagree (issue 10).

Tiling writes a new ``tiling_id`` into a scene's Zarr group every time it writes the group
(:mod:`fusarbatch.tiling.store`), and anchors a new ``aef_id`` (:mod:`fusarbatch.features.anchors`).
When ``run`` writes a scene's outputs it records both in the group attribute :data:`OUTPUTS_MADE_FROM`.
``fusarbatch tile`` (say with another ``--tile-size``) or ``fusarbatch features`` into a run folder then
leaves groups whose ids differ from the record: the next ``run`` redoes those scenes, and
``fusarbatch status`` lists them until then. Pure functions over the group's ``zarr.json``: no Zarr or
GDAL import.
"""

from __future__ import annotations

from typing import Any

#: Group attribute ``run`` sets when a scene's outputs are written: the ``tiling_id`` and ``aef_id`` (and
#: run id) they were made from.
OUTPUTS_MADE_FROM = "outputs_made_from"


def outputs_out_of_step(attrs: dict[str, Any]) -> str | None:
    """Why a scene group no longer holds what its GeoParquet outputs were made from, or ``None``.

    A group re-tiled or re-anchored since its outputs were made, or replaced by a failed or incomplete
    one, is out of step (see the module). A complete group without a ``tiling_id`` (written before there
    were ids) cannot be checked and counts as in step; so does a missing group (outputs stand on their own
    once written).

    :param attrs: the group's attributes (``{}`` when the group is missing).
    """
    if not attrs:
        return None
    if attrs.get("complete") is not True:
        state = attrs.get("status") or "incomplete"
        return f"its Zarr group was replaced by a {state} one ({attrs.get('error') or 'no error recorded'})"
    tiling_id = attrs.get("tiling_id")
    if tiling_id is None:
        return None
    made = attrs.get(OUTPUTS_MADE_FROM)
    shape = f"tile size {attrs.get('tile_size')}, overlap {attrs.get('overlap')}"
    if not isinstance(made, dict) or made.get("tiling_id") != tiling_id:
        return f"its tiles were rewritten after its outputs were made ({shape}; e.g. by `fusarbatch tile`)"
    if made.get("aef_id") != attrs.get("aef_id"):
        cause = "e.g. by `fusarbatch features`"
        return f"its AlphaEarth anchors were rewritten after its outputs were made ({cause})"
    return None
