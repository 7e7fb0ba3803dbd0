"""The recipe's stage names in order, importable without torch (``snapfusion --help`` lists them); recipe.STAGES
holds the stages themselves, and a test checks that the two agree."""

STAGE_NAMES = ("bench-blocks", "robust-train", "evolve", "evolve-apply", "kd-finetune", "v-teacher", "v-student",
               "distill", "distill-guidance", "distill-half", "reduce-decoder", "decoder-latents", "distill-decoder",
               "train-prior", "assemble", "eval")
