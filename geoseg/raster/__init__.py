"""Reading rasters and laying grids over them: inputs found (files, S3 prefixes, STAC Items), tiles
and their windows read, the blending window grid, and masks turned into polygons. Knows neither
Ray nor torch."""
