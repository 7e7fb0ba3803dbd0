"""Pipeline folders that share parts with another model (model_index.json "parts")."""

import json

import pytest
import torch

from snapfusion.errors import WeightsError
from snapfusion.pipeline import Pipeline, part_folder


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
