"""The `edgefleet` command line: parses options, calls the fleet and runtime layers, renders."""
