"""Calibration sets, range calibrators, sensitivity analysis, calibration-cache I/O (numpy; no torch)."""
