"""Calibration-driven quantization algorithms (GPTQ, ...) that pick integer codes for a weight."""
