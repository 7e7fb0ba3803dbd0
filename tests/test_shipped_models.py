"""The shipped models: the default 8-step student and the size limits of the shipped weights."""

import torch

from snapfusion.cli import main
from snapfusion.pipeline import part_folder
from snapfusion.weights import QSCALE_SUFFIX


def test_the_shipped_default_is_the_8_step_student(tmp_path):
    """`snapfusion generate` without --model runs the SnapFusion student: evolved v-prediction UNet stored as int8,
    8 trailing DDIM steps, the 4-layer text tower and the halved decoder shared, not copied (the base ships the tower's
    1-layer cut: its UNet reads the first layer, the student's the last)."""
    from PIL import Image

    from snapfusion.loading import EMBEDDED, SHIPPED_DECODERS, resolve_model
    from snapfusion.weights import _load_file

    pipe = resolve_model(None)
    base = resolve_model("base")
    assert pipe.config.name == "snapfusion" and pipe.config.steps == 8 and pipe.config.timestep_spacing == "trailing"
    assert pipe.unet.config.prediction_type == "v_prediction"
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(pipe.unet) < 0.8 * n(base.unet)  # evolved: blocks removed
    folder = EMBEDDED / "snapfusion"
    assert part_folder(folder, "text_encoder") == (EMBEDDED / "parts" / "text_encoder").resolve()
    assert (pipe.text_encoder.config.num_layers, base.text_encoder.config.num_layers) == (4, 1)
    assert part_folder(folder, "vae_decoder") == SHIPPED_DECODERS["half"].resolve()
    raw = {}
    for f in sorted((folder / "unet").glob("*.safetensors")):  # the files as stored, before dequantizing
        raw.update(_load_file(f, "cpu"))
    assert any(v.dtype == torch.int8 for v in raw.values()) and any(k.endswith(QSCALE_SUFFIX) for k in raw)
    out = tmp_path / "s.png"
    assert main(["generate", "a red circle on a blue background", "--size", "64", "--steps", "1", "--out", str(out),
                 "--quiet"]) == 0
    assert Image.open(out).size == (64, 64)


def test_shipped_models_fit_the_size_limits():
    """All shipped weights (models and evaluators) under 90 MB, every file under 16 MiB."""
    from snapfusion.loading import EMBEDDED

    assets = EMBEDDED.parent
    files = [f for d in (EMBEDDED, assets / "evaluators") for f in d.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 90e6
    assert max(f.stat().st_size for f in files) < 16 * 1024 * 1024
