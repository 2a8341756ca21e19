"""What a scene becomes: tiles stitched into masks and seam-exact objects, written as COG, GeoPackage
and GeoParquet with styles, STAC Items, quicklooks, the report page, and the run's records in the
output folder. Knows neither Ray nor torch."""
