"""SnapFusion: fast text-to-image latent diffusion.

>>> import snapfusion
>>> pipe = snapfusion.load()                      # the embedded 8-step SnapFusion model; "base" is its teacher
>>> pipe("a red apple to the left of a cat", seed=0).images[0].save("apple.png")
"""

__version__ = "0.1.0"
__all__ = ["load", "__version__"]


def load(name_or_path=None, device=None, dtype=None):
    """A ready-to-use ``Pipeline``; see ``snapfusion.loading.load``."""
    from snapfusion.loading import load as _load

    return _load(name_or_path, device=device, dtype=dtype)
