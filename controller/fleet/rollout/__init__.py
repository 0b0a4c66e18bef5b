"""Rollouts: policy, waves, gates, device states, candidate selection on the fleet."""
