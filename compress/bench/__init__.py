"""Measuring artifacts (accuracy, size, params, MACs, latency) and writing reports."""
