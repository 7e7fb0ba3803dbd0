"""SnapFusion §3.2's efficient image decoder: channel reduction, distillation on generated latents, a TAESD-style
baseline (docs/efficient_decoder.md)."""
