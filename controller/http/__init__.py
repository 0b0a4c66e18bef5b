"""HTTP API and dashboard served from the controller process."""
