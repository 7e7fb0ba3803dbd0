"""Int8 weight storage, shared pipeline parts, offset noise and the latent pool in v fine-tuning and distillation,
and the drop-one-block probe (block-importance)."""

import json

import pytest
import torch

from snapfusion.cli import main
from snapfusion.distill.tasks import DistillConfig, DistillTask, ModelSource, VFinetuneConfig, VFinetuneTask
from snapfusion.errors import WeightsError
from snapfusion.evolve.actions import EvalConfig
from snapfusion.evolve.evolution import block_importance, plot_importance
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline, part_folder
from snapfusion.weights import QSCALE_SUFFIX, load_safetensors, quantize_int8, save_safetensors


def test_int8_roundtrip_error_is_at_most_half_a_step_per_output_channel(tmp_path):
    torch.manual_seed(0)
    state = {"conv.weight": torch.randn(32, 16, 3, 3) * torch.linspace(0.01, 3, 32)[:, None, None, None],
             "norm.weight": torch.randn(64), "tiny.weight": torch.randn(4, 4), "ids": torch.arange(10)}
    q = quantize_int8(state)
    assert q["conv.weight"].dtype == torch.int8 and q["conv.weight" + QSCALE_SUFFIX].shape == (32, 1, 1, 1)
    assert q["norm.weight"] is state["norm.weight"] and q["tiny.weight"] is state["tiny.weight"]  # left in float
    files = save_safetensors(state, tmp_path / "m.safetensors", int8=True, max_shard_bytes=3000)  # several shards
    assert len(files) > 2
    back = load_safetensors(files[-1])
    assert set(back) == set(state) and back["ids"].dtype == torch.int64
    w, r = state["conv.weight"], back["conv.weight"].float()
    step = w.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    assert bool(((w - r).abs() <= step / 2 * (1 + 1e-4)).all())
    assert float((w - r).abs().max()) > 0  # it is lossy: the test would notice a no-op


def test_int8_scale_without_weight_is_a_clear_error(tmp_path):
    save_safetensors({"a" + QSCALE_SUFFIX: torch.ones(2, 1)}, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match="without its int8 weight"):
        load_safetensors(tmp_path / "bad.safetensors")


def test_unet_int8_output_stays_close_and_file_is_smaller(tiny_pipeline, tmp_path):
    unet = tiny_pipeline.unet
    unet.save(tmp_path / "fp16", dtype=torch.float16)
    unet.save(tmp_path / "int8", dtype=torch.float16, int8=True)
    size = {k: sum(f.stat().st_size for f in (tmp_path / k).glob("*.safetensors")) for k in ("fp16", "int8")}
    assert size["int8"] < 0.7 * size["fp16"]
    z, t, c = torch.randn(2, 4, 8, 8), torch.tensor([10, 900]), torch.randn(2, 77, 32)
    a, b = (UNet.load(tmp_path / k)(z, t, c) for k in ("fp16", "int8"))
    rel = float((a - b).norm() / a.norm())
    assert 0 < rel < 0.05


def test_shared_parts_load_and_stay_inside_the_models_root(tiny_pipeline, tmp_path):
    tiny_pipeline.save(tmp_path / "base", dtype=None)
    tiny_pipeline.save(tmp_path / "student", dtype=None, unet_int8=True,
                       shared={"text_encoder": "../base/text_encoder", "vae_decoder": "../base/vae_decoder",
                               "vae_encoder": "../base/vae_encoder"})
    assert not (tmp_path / "student" / "text_encoder").exists() and (tmp_path / "student" / "unet").is_dir()
    assert part_folder(tmp_path / "student", "text_encoder") == (tmp_path / "base" / "text_encoder").resolve()
    pipe = Pipeline.load(tmp_path / "student", with_encoder=True)
    ids = pipe.tokenizer(["a cat"])
    torch.testing.assert_close(pipe.text_encoder(ids), tiny_pipeline.text_encoder(ids))
    index = tmp_path / "student" / "model_index.json"
    data = json.loads(index.read_text())
    for bad in ("/etc/passwd", "../../elsewhere/text_encoder"):
        index.write_text(json.dumps({**data, "parts": {"text_encoder": bad}}))
        with pytest.raises(WeightsError, match="relative path next to the pipeline"):
            Pipeline.load(tmp_path / "student")


@pytest.fixture(scope="module")
def source(tiny_pipeline, tmp_path_factory) -> ModelSource:
    folder = tmp_path_factory.mktemp("teacher3") / "pipe"
    tiny_pipeline.save(folder, dtype=None)
    return ModelSource(pipeline=str(folder))


@pytest.mark.parametrize("task_cls", ["v", "distill"])
def test_offset_noise_and_latent_pool_reach_v_finetuning_and_distillation(source, task_cls):
    def make(**kw):
        if task_cls == "v":
            return VFinetuneTask(VFinetuneConfig(source=source, image_size=64, **kw))
        return DistillTask(DistillConfig(source=source, student_steps=2, cfg_prob=0.0, image_size=64, **kw))

    plain, pooled = make(), make(latent_pool=4, offset_noise=0.5)
    assert pooled.data.cfg.latent_pool == 4 and pooled.data.cfg.offset_noise == 0.5
    items = [pooled.dataset()[i] for i in range(6)]
    assert {it["index"] for it in items} == {0, 1, 2, 3}  # the pool's scenes, cycled
    batch = pooled.collate(items[:2])
    loss, _ = pooled.loss(pooled.build(), batch, torch.Generator().manual_seed(0))
    assert loss.shape == (2,) and bool(torch.isfinite(loss).all())
    # offset noise: the per-sample channel means of eps spread far more than N(0, 1) noise allows
    x0 = torch.zeros(256, 4, 8, 8)
    spread = {k: float(t.noising.noise(x0, torch.Generator().manual_seed(1)).mean((2, 3)).std())
              for k, t in (("plain", plain), ("offset", pooled))}
    assert spread["plain"] == pytest.approx(1 / 8, rel=0.2) and spread["offset"] == pytest.approx(0.5, rel=0.2)


def test_negative_offset_or_pool_is_a_one_line_error(source, tmp_path, capsys):
    for flag in (["--offset-noise", "-0.1"], ["--latent-pool", "-1"]):
        assert main(["distill", "--run-dir", str(tmp_path / "d"), "--model", source.pipeline, *flag]) == 2
        err = capsys.readouterr().err
        assert "must be >= 0" in err and err.count("\n") == 1
    assert not (tmp_path / "d").exists()  # refused before any run folder is made


def test_block_importance_drops_each_valid_block_once(tiny_pipeline, tmp_path):
    records = [{"prompt": "a red cat", "seed": 0}, {"prompt": "two blue stars", "seed": 1}]
    ev = EvalConfig(num_prompts=2, steps=2, guidance=3.0, size=64, batch=2)

    def scorer(images, prompts):
        return images.mean((1, 2, 3)) * 100

    unet = tiny_pipeline.unet
    report = block_importance(tiny_pipeline, unet, records, scorer, ev, label="tiny")
    names = [r["block"] for r in report["blocks"]]
    assert len(names) == len(set(names)) and names and set(names) <= {n for n, _ in unet.named_blocks()}
    assert any(r["delta_clip"] != 0 for r in report["blocks"])  # dropping a block changes the images
    assert report["clip"] == pytest.approx(float(scorer(tiny_pipeline.generate(
        [r["prompt"] for r in records], [0, 1], steps=2, guidance=3.0, height=64, width=64),
        None).mean()), rel=1e-5)
    out = plot_importance([report, {**report, "label": "again"}], tmp_path / "imp.png")
    assert out.stat().st_size > 1000


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
    """All shipped weights (models and evaluators) under 90 MB, every file under 16 MiB (issue 4, item 3)."""
    from snapfusion.loading import EMBEDDED

    assets = EMBEDDED.parent
    files = [f for d in (EMBEDDED, assets / "evaluators") for f in d.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) < 90e6
    assert max(f.stat().st_size for f in files) < 16 * 1024 * 1024


def test_corrupt_int8_files_are_clear_errors(tmp_path):
    from snapfusion.weights import load_into

    save_safetensors({"w": torch.ones(4, 3, dtype=torch.int8), "w" + QSCALE_SUFFIX: torch.ones(1, 4)},
                     tmp_path / "shape.safetensors")
    with pytest.raises(WeightsError, match="expected a float tensor of shape"):  # would broadcast to (4, 4, 3)
        load_safetensors(tmp_path / "shape.safetensors")
    module = torch.nn.Linear(3, 4, bias=False)
    with pytest.raises(WeightsError, match="int8 without its scale"):
        load_into(module, {"weight": torch.ones(4, 3, dtype=torch.int8)})
    (tmp_path / "m.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "../elsewhere.safetensors"}}))
    with pytest.raises(WeightsError, match="not a file name"):
        load_safetensors(tmp_path / "m.safetensors.index.json")


def test_malformed_or_dangling_shared_parts_are_refused(tiny_pipeline, tmp_path):
    from snapfusion.errors import ConfigError

    tiny_pipeline.save(tmp_path / "base", dtype=None)
    with pytest.raises(WeightsError, match="holds no model"):
        tiny_pipeline.save(tmp_path / "s", shared={"text_encoder": "../nowhere/text_encoder"})
    with pytest.raises(ConfigError, match="shared unet"):
        tiny_pipeline.save(tmp_path / "s", shared={"unet": "../base/unet"}, unet_int8=True)
    tiny_pipeline.save(tmp_path / "s", dtype=None)  # a full copy first, then re-saved sharing: the copy goes
    tiny_pipeline.save(tmp_path / "s", dtype=None, shared={"text_encoder": "../base/text_encoder"})
    assert not (tmp_path / "s" / "text_encoder").exists()
    index = tmp_path / "s" / "model_index.json"
    data = json.loads(index.read_text())
    for bad in ([1], {"text_encoder": None}, {"text_encoder": ""}):
        index.write_text(json.dumps({**data, "parts": bad}))
        with pytest.raises(WeightsError, match="parts|relative folder path"):
            Pipeline.load(tmp_path / "s")


def test_unet_stages_train_eps_and_v_unets_and_refuse_other_types(tiny_pipeline):
    import dataclasses

    from snapfusion.errors import ConfigError
    from snapfusion.train.tasks import require_known_prediction

    require_known_prediction(tiny_pipeline.unet.config, "train-unet")
    require_known_prediction(dataclasses.replace(tiny_pipeline.unet.config, prediction_type="v_prediction"), "x")
    with pytest.raises(ConfigError, match="epsilon or v_prediction"):
        require_known_prediction(dataclasses.replace(tiny_pipeline.unet.config, prediction_type="sample"), "x")
