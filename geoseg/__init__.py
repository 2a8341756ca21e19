"""geoseg: large GeoTIFFs -> seam-free land-use masks, object polygons and counts, on Ray."""

__version__ = "0.1.0"
