"""Stage 2: export to ONNX / TensorRT / Triton and check retrieval parity against the PyTorch reference."""
