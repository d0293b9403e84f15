"""ONNX Runtime quantization: calibration data, static/dynamic INT8 and FP16 conversion of an
exported ONNX file, and the accuracy-aware choice of nodes kept in float."""
