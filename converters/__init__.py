"""edgefleet converters package."""
