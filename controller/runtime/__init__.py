"""The running controller: MQTT service loop, publishing, replicas and leases, metrics."""
