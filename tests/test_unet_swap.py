"""``eval --unet`` (evaluate a UNet folder inside a pipeline) and the UNet swap it uses."""

import dataclasses

import pytest
import torch

from snapfusion.cli import main
from snapfusion.errors import ConfigError, WeightsError
from snapfusion.loading import swap_unet
from snapfusion.models.unet import UNet


def test_swap_unet_replaces_only_the_unet_and_checks_the_context_width(tiny_pipeline, tmp_path):
    torch.manual_seed(5)
    other = UNet(tiny_pipeline.unet.config)
    other.save(tmp_path / "u")
    swapped = swap_unet(tiny_pipeline, str(tmp_path / "u"))
    assert swapped.text_encoder is tiny_pipeline.text_encoder and swapped.decoder is tiny_pipeline.decoder
    for (name, a), b in zip(swapped.unet.state_dict().items(), other.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    assert swap_unet(tiny_pipeline, None) is tiny_pipeline
    wide = dataclasses.replace(tiny_pipeline.unet.config, context_dim=tiny_pipeline.unet.config.context_dim * 2)
    UNet(wide).save(tmp_path / "wide")
    with pytest.raises(ConfigError, match="context_dim"):
        swap_unet(tiny_pipeline, str(tmp_path / "wide"))
    with pytest.raises(WeightsError, match="--unet"):
        swap_unet(tiny_pipeline, str(tmp_path / "missing"))
    pixels = dataclasses.replace(tiny_pipeline.unet.config, in_channels=3, out_channels=3)
    UNet(pixels).save(tmp_path / "pixels")
    with pytest.raises(ConfigError, match="latent channels"):
        swap_unet(tiny_pipeline, str(tmp_path / "pixels"))


def test_eval_with_a_missing_unet_folder_is_a_one_line_error(tmp_path, capsys):
    code = main(["eval", "--model", "base", "--unet", str(tmp_path / "nope"), "--num-images", "2", "--steps", "1",
                 "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code != 0 and "--unet" in err and "\n" not in err
