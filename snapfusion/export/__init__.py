"""Export of a pipeline's networks (text encoder, UNet, decoder, layout prior) to ONNX and Core ML, parity checks,
and the ONNX Runtime backend."""
