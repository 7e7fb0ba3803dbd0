"""The SnapFusion recipe as one resumable chain: a teacher pipeline folder -> an assembled SnapFusion pipeline."""

from snapfusion.compress.names import STAGE_NAMES

__all__ = ["RecipeConfig", "STAGES", "STAGE_NAMES", "check", "recipe_config", "run_recipe"]


def __getattr__(name: str):
    """The recipe (and torch) load on first use: building the command line's help needs only ``STAGE_NAMES``."""
    if name in __all__:
        from snapfusion.compress import recipe

        return getattr(recipe, name)
    raise AttributeError(f"module 'snapfusion.compress' has no attribute {name!r}")
