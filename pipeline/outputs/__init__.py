"""What people open and see: polygons (GeoJSON), previews (PNG) and the run page (index.html)."""
