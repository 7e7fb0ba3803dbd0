"""Model resolution, in one place for the Python API, the CLI and the server: an embedded model name ('snapfusion',
'snapfusion-cfg', 'base'), one of our pipeline folders, a diffusers SD-v1.x folder or a single-file SD checkpoint ->
a ``Pipeline``.

Nothing is downloaded: every name resolves to local files, and a missing file is a one-line ``WeightsError``.
"""

from __future__ import annotations

from pathlib import Path

from snapfusion.errors import ConfigError, InputError, WeightsError

EMBEDDED = Path(__file__).parent / "assets" / "models"
DEFAULT_MODELS = ("snapfusion", "snapfusion-cfg", "base")  # the first one shipped is the default
SHIPPED_DECODERS = {"half": EMBEDDED / "parts" / "vae_decoder_half"}  # distilled from base's decoder


def resolve_device(name: str | None, *, option: str = "device") -> str:
    """"auto" or None: CUDA when there is one, else the CPU; "cpu", "cuda[:N]" and "mps" (Apple GPUs) as given
    (checked)."""
    import torch

    if name is None or name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError(f"{option} cuda was asked for, but no CUDA device is available")
    if name == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise InputError(f"{option} mps was asked for, but this torch has no MPS device (Apple silicon and a "
                             "macOS build of torch are needed)")
        return name
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise InputError(f"{option} must be auto, cpu, cuda[:N] or mps, got {name!r}")
    return name


def resolve_dtype(name, *, option: str = "dtype"):
    """None (keep the weights' dtype), fp32 / fp16 / bf16 or a torch dtype -> a torch dtype or None."""
    import torch

    if name is None or isinstance(name, torch.dtype):
        return name
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
              "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    if name not in dtypes:
        raise InputError(f"{option} must be one of fp32, fp16, bf16, got {name!r}")
    return dtypes[name]


def model_folder(name: str) -> Path:
    """The folder of an embedded model name (``DEFAULT_MODELS``), else ``name`` as a path."""
    return EMBEDDED / name if name in DEFAULT_MODELS else Path(name)


def check_model(name: str | None) -> str:
    """The model a name resolves to, checked without loading it: an embedded name that is shipped, or an existing
    path (its files are read, and checked, when it loads)."""
    from snapfusion.folders import INDEX as index
    if name is None:
        shipped = [m for m in DEFAULT_MODELS if (EMBEDDED / m / index).is_file()]
        if not shipped:
            raise WeightsError(f"no embedded model found under {EMBEDDED} (the package is incomplete)")
        return shipped[0]
    if name in DEFAULT_MODELS:
        if not (model_folder(name) / index).is_file():
            raise WeightsError(f"embedded model '{name}' is not shipped in this version ({model_folder(name)})")
        return name
    if not Path(name).exists():
        from snapfusion.sd15 import hub_id_error, looks_like_hub_id

        if looks_like_hub_id(name):
            raise hub_id_error(name)
        raise WeightsError(f"model not found: {name} (expected {', '.join(repr(m) for m in DEFAULT_MODELS)} or a "
                           "path)")
    return name


def check_decoder(name: str | None) -> Path | None:
    """The decoder folder of a shipped name ('half') or a path, checked without loading it; None stays None."""
    if name is None:
        return None
    folder = SHIPPED_DECODERS.get(name, Path(name))
    if not (folder / "config.json").is_file():
        raise WeightsError(f"decoder not found: {folder} (expected 'half' or a decoder folder)")
    return folder


def check_unet_folder(folder: str | None, *, option: str = "--unet") -> str | None:
    """A UNet folder (with config.json), checked without loading it; None stays None."""
    if folder is not None and not (Path(folder) / "config.json").is_file():
        raise WeightsError(f"{option}: no UNet folder at {folder} (expected a folder with config.json)")
    return folder


def resolve_model(name: str | None, *, device: str = "cpu"):
    """An embedded model name (``DEFAULT_MODELS``), our pipeline folder, a diffusers SD folder or an SD .safetensors."""
    from snapfusion.config import load_json
    from snapfusion.pipeline import INDEX, Pipeline

    name = check_model(name)
    if name in DEFAULT_MODELS:
        return Pipeline.load(model_folder(name), device=device)
    path = Path(name)
    if (path / INDEX).is_file() and load_json(path / INDEX).get("kind") == "pipeline":
        return Pipeline.load(path, device=device)
    from snapfusion.sd15 import load_sd  # the diffusers and single-file converters load only when needed

    return load_sd(path, device=device)


def swap_decoder(pipe, name: str | None, *, device: str = "cpu"):
    """``pipe`` with its decoder replaced by a shipped one ('half') or a decoder folder; unchanged if ``name`` is None."""
    if name is None:
        return pipe
    from snapfusion.decoder.io import load_decoder, with_decoder

    folder = check_decoder(name)
    return with_decoder(pipe, load_decoder(folder, device=device, dtype=pipe.dtype))


def swap_unet(pipe, folder: str | None, *, device: str = "cpu"):
    """``pipe`` with its UNet replaced by the UNet folder ``folder`` (e.g. a training checkpoint's model/); unchanged
    if None. The text encoder, decoder and sampling defaults stay the pipeline's."""
    if folder is None:
        return pipe
    from snapfusion.models.unet import UNet
    from snapfusion.pipeline import Pipeline

    check_unet_folder(folder)
    unet = UNet.load(folder, device=device, dtype=pipe.dtype).eval()
    got, want = unet.config, pipe.unet.config
    if (got.in_channels, got.out_channels) != (want.in_channels, want.out_channels):
        raise ConfigError(f"--unet {folder}: latent channels in/out {(got.in_channels, got.out_channels)}, the "
                          f"pipeline's UNet has {(want.in_channels, want.out_channels)}")
    return Pipeline(pipe.text_encoder, unet, pipe.decoder, pipe.config, tokenizer=pipe.tokenizer,
                    encoder=pipe.encoder, prior=pipe.prior)  # checks the context width against the text encoder




def load(name_or_path: str | Path | None = None, device: str | None = None, dtype=None):
    """A ready-to-use pipeline: ``load()`` is the embedded SnapFusion model, ``load("base")`` its teacher, or a path
    to a pipeline folder, a diffusers SD folder or an SD .safetensors file. ``device``: None picks CUDA when there
    is one; ``dtype``: None keeps fp32, else fp32 / fp16 / bf16 or a torch dtype.

    >>> pipe = snapfusion.load()
    >>> pipe("a blue circle above a dog", seed=0).images[0].save("out.png")
    """
    dev = resolve_device(device)
    pipe = resolve_model(None if name_or_path is None else str(name_or_path), device=dev)
    torch_dtype = resolve_dtype(dtype)
    if torch_dtype is not None:
        pipe.to(dev, torch_dtype)
    return pipe.eval()
