"""ONNX on models and files the user already has: export_onnx, quantize_onnx, measure (issue 21)."""

from __future__ import annotations
