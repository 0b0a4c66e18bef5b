"""The fleet's domain: registry of devices and models, artifacts, rollouts and telemetry."""
