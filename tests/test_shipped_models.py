"""The shipped models: the default 8-step student and the size limits of the shipped weights."""

import torch

from snapfusion.cli import main
from snapfusion.pipeline import part_folder
from snapfusion.weights import QSCALE_SUFFIX


def test_the_shipped_default_is_the_8_step_student(tmp_path):
    """`snapfusion generate` without --model runs the guidance-embedded SnapFusion student: evolved v-prediction UNet
    stored as int8, 8 trailing DDIM steps, one UNet call per step; the base's text tower and prior and the halved
    decoder shared, not copied. `snapfusion-cfg` is the same student with classifier-free guidance."""
    from PIL import Image

    from snapfusion.loading import EMBEDDED, SHIPPED_DECODERS, resolve_model
    from snapfusion.weights import _load_file

    pipe = resolve_model(None)
    base = resolve_model("base")
    assert pipe.config.name == "snapfusion" and pipe.config.steps == 8 and pipe.config.timestep_spacing == "trailing"
    assert pipe.unet.config.prediction_type == "v_prediction"
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(pipe.unet) < 0.85 * n(base.unet)  # evolved: blocks removed
    from snapfusion.evolve.latency import load_table, predict_ms

    table = load_table(EMBEDDED.parent / "latency" / "base_cpu_torch.json")  # the table the evolution searched on
    fraction = predict_ms(pipe.unet.config, table)[0] / predict_ms(base.unet.config, table)[0]
    assert 0.2 < fraction < 0.35, fraction  # the 0.35 budget's architecture (28.3 %)
    folder = EMBEDDED / "snapfusion"
    assert pipe.unet.config.guidance_embed and not base.unet.config.guidance_embed
    for name in ("snapfusion", "snapfusion-cfg"):
        assert part_folder(EMBEDDED / name, "text_encoder") == (EMBEDDED / "base" / "text_encoder").resolve()
        assert part_folder(EMBEDDED / name, "prior") == (EMBEDDED / "base" / "prior").resolve()
        assert part_folder(EMBEDDED / name, "vae_decoder") == SHIPPED_DECODERS["half"].resolve()
    cfg = resolve_model("snapfusion-cfg")
    assert cfg.config.steps == 8 and not cfg.unet.config.guidance_embed and cfg.unet.config.down == pipe.unet.config.down
    raw = {}
    for f in sorted((folder / "unet").glob("*.safetensors")):  # the files as stored, before dequantizing
        raw.update(_load_file(f, "cpu"))
    assert any(v.dtype == torch.int8 for v in raw.values()) and any(k.endswith(QSCALE_SUFFIX) for k in raw)
    out = tmp_path / "s.png"
    assert main(["generate", "a red circle on a blue background", "--size", "64", "--steps", "1", "--out", str(out),
                 "--quiet"]) == 0
    assert Image.open(out).size == (64, 64)


def test_shipped_models_fit_the_size_limits():
    """All shipped weights (three models, the shared decoder and the evaluators) under 105 MB, every file under
    16 MiB."""
    from snapfusion.loading import EMBEDDED

    assets = EMBEDDED.parent
    files = [f for d in (EMBEDDED, assets / "evaluators") for f in d.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 105e6
    assert max(f.stat().st_size for f in files) < 16 * 1024 * 1024
