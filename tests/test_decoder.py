"""Efficient decoder: channel reduction and teacher init, the TAESD-style baseline, the distillation task."""

import dataclasses

import pytest
import torch

from snapfusion.decoder.evaluate import psnr
from snapfusion.decoder.io import load_decoder, save_decoder, with_decoder
from snapfusion.decoder.reduce import decoder_spaces, init_from_teacher, reduce_decoder, reduced_config
from snapfusion.decoder.task import (DecoderDistillConfig, DecoderDistillTask, LatentSource, PromptStream,
                                     StudentSpec, collate_prompts, teacher_latents)
from snapfusion.decoder.tiny import TinyDecoder, TinyDecoderConfig, load_tiny_decoder
from snapfusion.errors import ConfigError, WeightsError
from snapfusion.models.autoencoder import AutoencoderConfig, Decoder, load_autoencoder
from snapfusion.models.presets import base_autoencoder

TINY = AutoencoderConfig.tiny()  # decoder widths 8-16-32-32, 4 groups
SRC = LatentSource(steps=1, resolution=64)  # tiny UNet: 64 px images = 8x8 latents (3 downsamplings)


def _perturbed_decoder(cfg=TINY, seed=0) -> Decoder:
    torch.manual_seed(seed)
    dec = Decoder(cfg)
    with torch.no_grad():
        for p in dec.parameters():  # norms and biases away from 1 / 0, so that every tensor matters
            p.add_(0.1 * torch.randn_like(p))
    return dec.eval()


def test_full_width_l1_permutation_computes_the_same_function():
    """At ratio 1 the L1 selection is a pure channel permutation: equal outputs prove the space map consistent."""
    teacher = _perturbed_decoder()
    student = Decoder(TINY)
    index = init_from_teacher(student, teacher, "l1")
    assert any(not torch.equal(i, torch.arange(len(i))) for i in index.values())  # really permuted
    z = torch.randn(2, 4, 6, 6)
    torch.testing.assert_close(student.eval()(z), teacher(z), atol=1e-4, rtol=1e-4)


def test_space_map_covers_every_parameter_of_sd_layouts():
    for cfg in (TINY, base_autoencoder(), dataclasses.replace(TINY, mid_attention=False)):
        assert set(decoder_spaces(cfg)) == set(Decoder(cfg).state_dict())


def test_halved_widths_groups_and_parameter_counts():
    halved = reduced_config(base_autoencoder())
    # 16 groups would leave one channel per group at 16 channels: 8 groups of 2 (and 8 divides the teacher's 16)
    assert halved.decoder_widths == (16, 32, 64, 64) and halved.norm_groups == 8
    assert halved.encoder_widths == base_autoencoder().encoder_widths
    quarter = reduced_config(TINY, 0.25)  # 2-4-8-8: groups of >= 2 channels at width 2 -> one group
    assert quarter.decoder_widths == (2, 4, 8, 8) and quarter.norm_groups == 1
    sd = reduced_config(AutoencoderConfig.sd15())  # 64 channels in 32 groups: 2 per group, SD's count is kept
    assert sd.decoder_widths == (64, 128, 256, 256) and sd.norm_groups == 32
    assert reduced_config(base_autoencoder(), norm_groups=16).norm_groups == 16  # an explicit count is kept
    with pytest.raises(ConfigError, match="ratio"):
        reduced_config(TINY, 1.5)
    with pytest.raises(ConfigError, match="norm_groups"):
        reduced_config(TINY, 0.5, norm_groups=3)


@pytest.mark.slow
def test_sd15_halved_decoder_parameter_count():
    teacher = Decoder(AutoencoderConfig.sd15())
    student = reduce_decoder(teacher, 0.5)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert (count(teacher), count(student)) == (49_490_199, 12_387_479)


def test_first_init_keeps_the_first_channels_of_each_group():
    teacher = _perturbed_decoder()
    student = reduce_decoder(teacher, 0.5, method="first", norm_groups=4)  # the teacher's groups, kept
    # conv_in writes the mid stream: 32 channels in 4 groups of 8 -> channels 0-3, 8-11, 16-19, 24-27
    keep = torch.cat([torch.arange(g * 8, g * 8 + 4) for g in range(4)])
    torch.testing.assert_close(student.conv_in.weight, teacher.conv_in.weight[keep])
    torch.testing.assert_close(student.post_quant_conv.weight, teacher.post_quant_conv.weight)
    assert student.conv_out.weight.shape == (3, 4, 3, 3)
    random_student = reduce_decoder(teacher, 0.5, method="random")
    assert not torch.equal(random_student.conv_in.weight, student.conv_in.weight)


def test_tiny_decoder_shapes_and_round_trip(tmp_path):
    cfg = TinyDecoderConfig(widths=(16, 12, 8, 8), blocks=(1, 1, 1, 0), scaling_factor=0.5)
    model = TinyDecoder(cfg).eval()
    z = torch.randn(2, 4, 5, 7)
    assert model(z).shape == (2, 3, 40, 56) and cfg.downscale == 8
    torch.testing.assert_close(model.images_from_latents(z), model(z / 0.5))
    save_decoder(tmp_path / "tiny", model)
    loaded = load_decoder(tmp_path / "tiny")
    assert isinstance(loaded, TinyDecoder) and loaded.config == cfg
    torch.testing.assert_close(loaded(z), model(z), atol=0, rtol=0)
    with pytest.raises(WeightsError, match="vae-decoder"):
        load_autoencoder(tmp_path / "tiny", Decoder)
    with pytest.raises(ConfigError, match="equal length"):
        TinyDecoderConfig(widths=(8, 8), blocks=(1,))


def test_reduced_decoder_round_trip(tmp_path):
    student = reduce_decoder(_perturbed_decoder(), 0.5)
    save_decoder(tmp_path / "half", student)
    loaded = load_decoder(tmp_path / "half")
    assert isinstance(loaded, Decoder) and loaded.config == student.config
    with pytest.raises(WeightsError, match="tiny-decoder"):
        load_tiny_decoder(tmp_path / "half")


def test_pipeline_runs_with_a_tiny_decoder(tiny_pipeline):
    decoder = TinyDecoder(TinyDecoderConfig(widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1),
                                            scaling_factor=tiny_pipeline.decoder.config.scaling_factor)).eval()
    pipe = with_decoder(tiny_pipeline, decoder)
    images = pipe.generate(["a red circle"], [0], steps=2, height=64, width=64)
    assert images.shape == (1, 3, 64, 64) and 0 <= images.min() and images.max() <= 1
    with pytest.raises(WeightsError, match="scaling factor"):
        with_decoder(tiny_pipeline, TinyDecoder(TinyDecoderConfig(scaling_factor=1.0)))


def test_prompt_stream_and_latents_do_not_depend_on_the_batch(tiny_pipeline):
    stream = PromptStream(SRC, seed=5)
    assert stream[7] == PromptStream(SRC, seed=5)[7] and stream[7] != stream[8]
    g = [stream[i]["guidance"] for i in range(50)]
    assert SRC.guidance_min <= min(g) and max(g) <= SRC.guidance_max and max(g) - min(g) > 4
    batch = collate_prompts([stream[i] for i in range(3)])
    together = teacher_latents(tiny_pipeline, batch["prompt"], batch["seed"], batch["guidance"], SRC)
    alone = teacher_latents(tiny_pipeline, batch["prompt"][1:2], batch["seed"][1:2], batch["guidance"][1:2], SRC)
    assert together.shape == (3, 4, 8, 8)
    torch.testing.assert_close(together[1:2], alone, atol=1e-5, rtol=1e-5)


def test_task_loss_trains_only_the_student(tiny_pipeline):
    src = dataclasses.replace(SRC, pool=2)  # the two latents are generated once, then served from the cache
    task = DecoderDistillTask(DecoderDistillConfig(student=StudentSpec(init="random"), latents=src), tiny_pipeline)
    student = task.build()
    batch = collate_prompts([task.dataset()[i] for i in (4, 7)])  # sample 4 -> latent 0, sample 7 -> latent 1
    assert batch["index"] == [0, 1]
    teacher_before = {k: v.clone() for k, v in tiny_pipeline.decoder.state_dict().items()}
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        per_sample, logs = task.loss(student, batch, torch.Generator().manual_seed(0))
        assert per_sample.shape == (2,) and "psnr" in logs
        per_sample.mean().backward()
        opt.step()
        opt.zero_grad()
        losses.append(per_sample.mean().item())
    assert losses[-1] < 0.5 * losses[0] and sorted(task.cache) == [0, 1]
    for k, v in tiny_pipeline.decoder.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k


def test_psnr_values():
    a = torch.full((2, 3, 4, 4), 0.5)
    torch.testing.assert_close(psnr(a, a + 0.1), torch.full((2,), 20.0))
    assert psnr(a, a).min() >= 99


def test_tiny_decoder_pipeline_round_trips_through_onnxruntime(tiny_pipeline, tmp_path):
    """An ONNX export of a pipeline holding a TAESD-style decoder loads in the onnxruntime backend."""
    pytest.importorskip("onnxruntime")
    from snapfusion.decoder.io import with_decoder
    from snapfusion.decoder.tiny import TinyDecoder, TinyDecoderConfig
    from snapfusion.export.components import ExportConfig
    from snapfusion.export.onnx_export import export_onnx
    from snapfusion.export.ort import OrtPipeline

    tiny = TinyDecoder(TinyDecoderConfig(widths=(8, 8, 8, 8), blocks=(1, 1, 1, 1),
                                         scaling_factor=tiny_pipeline.decoder.config.scaling_factor))
    pipe = with_decoder(tiny_pipeline, tiny)
    export_onnx(pipe, tmp_path / "onnx", ExportConfig(format="onnx"))
    ort_pipe = OrtPipeline.load(tmp_path / "onnx")
    assert isinstance(ort_pipe.decoder.config, TinyDecoderConfig)
    a = ort_pipe.generate(["a cat"], [0], steps=1, guidance=2.0)
    b = pipe.generate(["a cat"], [0], steps=1, guidance=2.0)
    assert (a - b).abs().max() < 1e-3


def test_reduce_decoder_leaves_the_teacher_untouched():
    from snapfusion.decoder.reduce import reduce_decoder

    teacher = Decoder(AutoencoderConfig.tiny()).half()
    reduce_decoder(teacher, 0.5, method="l1")
    assert next(teacher.parameters()).dtype == torch.float16
