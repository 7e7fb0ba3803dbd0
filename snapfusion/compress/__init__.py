"""The SnapFusion recipe as one resumable chain: a teacher pipeline folder -> an assembled SnapFusion pipeline."""

from snapfusion.compress.recipe import STAGE_NAMES, STAGES, RecipeConfig, check, recipe_config, run_recipe

__all__ = ["RecipeConfig", "STAGES", "STAGE_NAMES", "check", "recipe_config", "run_recipe"]
