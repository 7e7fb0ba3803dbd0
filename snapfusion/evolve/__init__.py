"""Efficient UNet (SnapFusion §3.1): robust training, per-block latency table, architecture evolution."""
