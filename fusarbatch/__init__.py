"""fusarbatch: batch FUSAR-GPT inference over SAR archives.

Stages (DESIGN.md): catalog search -> tiling into Zarr -> AlphaEarth anchors -> model inference -> GeoParquet.
"""

__version__ = "0.1.0"
