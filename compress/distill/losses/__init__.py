"""Distillation loss terms, one file each, discovered by :data:`compress.distill.LOSSES`."""
