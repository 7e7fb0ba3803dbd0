"""Export of a pipeline's networks (text encoder, UNet, decoder, layout prior) to ONNX and Core ML, parity checks,
and the ONNX Runtime backend; and of whole pipelines to a diffusers folder or an LDM single-file checkpoint."""
