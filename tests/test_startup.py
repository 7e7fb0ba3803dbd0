"""Start-up: models built on the meta device load the same tensors as built-then-loaded ones, the plain-torch CLIP
text tower equals transformers' bit for bit, and generating imports neither transformers nor torch._dynamo."""

import subprocess
import sys

import pytest
import torch

from snapfusion.errors import WeightsError
from snapfusion.folders import part_folder
from snapfusion.loading import EMBEDDED, model_folder
from snapfusion.decoder.io import load_decoder
from snapfusion.models.autoencoder import AutoencoderConfig, Decoder, Encoder, load_autoencoder
from snapfusion.models.text import TextEncoder, TextEncoderConfig, load_text_encoder
from snapfusion.models.unet import UNet
from snapfusion.models.unet_config import UNetConfig
from snapfusion.pipeline import INDEX, Pipeline
from snapfusion.weights import build_loaded, load_into, load_safetensors, read_config, resolve_weights

PARTS = {"text_encoder": (TextEncoder, TextEncoderConfig, "text-encoder"), "unet": (UNet, UNetConfig, "unet"),
         "vae_decoder": (Decoder, AutoencoderConfig, "vae-decoder"),
         "vae_encoder": (Encoder, AutoencoderConfig, "vae-encoder")}
SHIPPED = [m for m in ("snapfusion", "base") if (EMBEDDED / m / INDEX).is_file()]


def _plain(folder, part: str, dtype=None) -> torch.nn.Module:
    """The part built with its random initialisation, cast, then ``load_into``: the way before ``build_loaded``."""
    cls, config_cls, kind = PARTS[part]
    torch.manual_seed(0)
    model = cls(read_config(folder, config_cls, kind=kind))
    if dtype is not None:
        model = model.to(dtype)
    load_into(model, load_safetensors(resolve_weights(folder, "model")), source=str(folder))
    return model


def _assert_same_module(got: torch.nn.Module, want: torch.nn.Module) -> None:
    g, w = got.state_dict(), want.state_dict()
    assert list(g) == list(w)
    for k in w:
        assert g[k].dtype == w[k].dtype and g[k].device == w[k].device, k
        assert torch.equal(g[k], w[k]), k
    assert [n for n, _ in got.named_parameters()] == [n for n, _ in want.named_parameters()]
    assert all(type(p) is torch.nn.Parameter and not p.is_meta for p in got.parameters())
    assert [p.requires_grad for p in got.parameters()] == [p.requires_grad for p in want.parameters()]
    assert [n for n, _ in got.named_buffers()] == [n for n, _ in want.named_buffers()]


LOADERS = {"text_encoder": load_text_encoder, "unet": UNet.load, "vae_decoder": load_decoder,
           "vae_encoder": lambda folder: load_autoencoder(folder, Encoder)}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_parts_load_the_same_tensors_as_built_then_loaded(name):
    folder = model_folder(name)
    compared = 0
    for part, load in LOADERS.items():
        sub = part_folder(folder, part)
        if not (sub / "config.json").is_file() or f'"{PARTS[part][2]}"' not in (sub / "config.json").read_text():
            continue  # not shipped, or another kind (a tiny decoder loads plainly)
        _assert_same_module(load(sub), _plain(sub, part))
        compared += 1
    assert compared >= 3
    pipe = Pipeline.load(folder)
    ids = pipe.tokenizer(["a red apple to the left of a cat", ""])
    with torch.no_grad():
        assert torch.equal(pipe.text_encoder(ids), _plain(part_folder(folder, "text_encoder"), "text_encoder")(ids))


def test_build_loaded_casts_like_to_then_load():
    folder = part_folder(model_folder(SHIPPED[0]), "unet")
    state = load_safetensors(resolve_weights(folder, "model"))
    config = read_config(folder, UNetConfig, kind="unet")
    for dtype in (torch.bfloat16, torch.float16):
        _assert_same_module(build_loaded(lambda: UNet(config), state, dtype=dtype), _plain(folder, "unet", dtype))


def test_build_loaded_checks_keys_shapes_and_unsaved_buffers():
    def build():
        return torch.nn.Linear(3, 2)

    state = {"weight": torch.ones(2, 3), "bias": torch.zeros(2)}
    model = build_loaded(build, state)
    assert torch.equal(model.weight, state["weight"]) and isinstance(model.weight, torch.nn.Parameter)
    with pytest.raises(WeightsError, match="missing key 'bias'"):
        build_loaded(build, {"weight": torch.ones(2, 3)})
    with pytest.raises(WeightsError, match="shape mismatch for 'weight'"):
        build_loaded(build, {**state, "weight": torch.ones(3, 3)})

    class WithUnsaved(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)
            self.register_buffer("ids", torch.arange(3), persistent=False)

    with pytest.raises(WeightsError, match="'ids' is not among the saved tensors"):
        build_loaded(WithUnsaved, {f"lin.{k}": v for k, v in state.items()})


@pytest.mark.parametrize("act,rows", [("quick_gelu", 0), ("gelu", 0), ("quick_gelu", 40)])
def test_clip_text_tower_equals_transformers(act, rows):
    transformers = pytest.importorskip("transformers")
    from snapfusion.models.text import clip_text_config

    torch.manual_seed(0)
    cfg = TextEncoderConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64, projection_dim=32,
                            hidden_act=act, vocab_rows=rows)
    ours = TextEncoder(cfg).eval()
    after_ours = torch.rand(4)
    torch.manual_seed(0)
    theirs = transformers.CLIPTextModel(clip_text_config(cfg)).eval()
    assert torch.equal(torch.rand(4), after_ours)  # the same random draws, in the same order
    mine, their_state = ours.text_model.state_dict(), theirs.state_dict()
    assert list(their_state) == list(mine) and all(torch.equal(their_state[k], v) for k, v in mine.items())
    bos, eos = (1, rows - 1) if rows else (49406, 49407)  # compact rows: the tower sees rows, not CLIP ids
    ids = torch.randint(2, eos, (3, 77))
    ids[:, 0] = bos
    ids[0, 9:], ids[1, 30:], ids[2, 76] = eos, eos, eos
    with torch.no_grad():
        a = ours.text_model(ids, output_hidden_states=True)
        b = theirs(input_ids=ids, output_hidden_states=True)
    assert torch.equal(a.last_hidden_state, b.last_hidden_state)
    assert torch.equal(a.pooler_output, b.pooler_output)
    assert len(a.hidden_states) == len(b.hidden_states) == 4
    assert all(torch.equal(x, y) for x, y in zip(a.hidden_states, b.hidden_states))


def test_stage_names_without_torch_match_the_recipe():
    from snapfusion.compress import STAGE_NAMES
    from snapfusion.compress.recipe import STAGES

    assert STAGE_NAMES == tuple(s.name for s in STAGES)


def test_generate_path_imports_neither_transformers_nor_dynamo():
    code = ("import sys; from snapfusion.cli.main import build_parser; build_parser(); t = 'torch' in sys.modules; "
            "import snapfusion; snapfusion.load(); "
            "print(t, [n for n in ('transformers', 'torch._dynamo', 'sympy', 'scipy') if n in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False []"
