"""AlphaEarth Foundations anchors for tiles (DESIGN 3.3): the AEF sampler and the per-tile anchor grid."""

from fusarbatch.features.alphaearth import (
    AEF_ATTRIBUTION,
    AEFUnavailable,
    AnchorSource,
    COGIndexSource,
    NullSource,
    dequantize,
    load_index,
    open_source,
)
from fusarbatch.features.anchors import (
    FeatureResult,
    anchor_positions,
    compute_features,
    read_anchor_npz,
    read_legacy_anchors,
    read_scene_features,
    write_anchor_npz,
    write_scene_features,
    write_scene_features_or_empty,
)

__all__ = [
    "AEF_ATTRIBUTION",
    "AEFUnavailable",
    "AnchorSource",
    "COGIndexSource",
    "FeatureResult",
    "NullSource",
    "anchor_positions",
    "compute_features",
    "dequantize",
    "load_index",
    "open_source",
    "read_anchor_npz",
    "read_legacy_anchors",
    "read_scene_features",
    "write_anchor_npz",
    "write_scene_features",
    "write_scene_features_or_empty",
]
