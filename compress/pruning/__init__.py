"""Pruning: structured (channels really removed, torch-pruning DepGraph), unstructured (magnitude
masks, one-shot or AGP), and per-layer sensitivity analysis."""
