"""Export of a pipeline's three networks to ONNX and Core ML, parity checks, and the ONNX Runtime backend."""
