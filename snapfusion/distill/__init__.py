"""Step distillation (SnapFusion §4): v-prediction fine-tuning, the two-step DDIM teacher, the vanilla and
CFG-aware distillation losses, and their training tasks and commands (docs/step_distillation.md)."""
