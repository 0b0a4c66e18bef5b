"""edgefleet controller package."""
