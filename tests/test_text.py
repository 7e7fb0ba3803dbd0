"""CLIP tokenizer (shipped vocabulary) and text encoder: parity, padding, truncation, save/load, key conversion."""

import functools
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import regex
import torch
from safetensors.torch import save_file

from snapfusion.convert.text_keys import load_ldm_text_encoder, text_from_ldm, text_to_ldm
from snapfusion.errors import ConfigError, WeightsError
from snapfusion.models.text import (POSITION_IDS_KEY, TOKENIZER_DIR, TextEncoder, TextEncoderConfig, Tokenizer,
                                    clip_text_config, config_from_transformers, load_text_encoder,
                                    load_transformers_text_encoder, save_text_encoder, skip_layers)

transformers = pytest.importorskip("transformers")

WORDS = ["a", "photo", "of", "cat", "dog", "astronaut", "riding", "horse", "on", "mars", "oil", "painting",
         "by", "greg", "rutkowski", "trending", "artstation", "8k", "ultra-detailed", "cyberpunk", "city", "night",
         "portrait", "woman", "Van", "Gogh", "STARRY", "sky", "isn't", "we'll", "they're", "I'm", "you've",
         "it's", "he'd", "don't", "café", "naïve", "Ünïcödé", "東京", "タワー", "Москва", "🐱", "🚀✨", "&amp;",
         "(masterpiece:1.2)", "[best quality]", "f/1.8", "50mm", "#hashtag", "@user", "3.14159", "1920x1080",
         "well-lit", "e-mail", "C++", "über", "façade", "œuvre", "ß", "x" * 40]
SEPARATORS = [" ", "  ", ", ", " , ", "\t", "\n", "! ", "... ", " - ", "; "]


def _prompts(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 30))]
        text = "".join(w + rng.choice(SEPARATORS) for w in words)
        out.append(text.upper() if rng.random() < 0.1 else text)
    return out


@pytest.fixture(scope="module")
def tok():
    return Tokenizer()


def test_parity_with_transformers_clip_tokenizer(tok):
    ref = transformers.CLIPTokenizer.from_pretrained(str(TOKENIZER_DIR))
    prompts = _prompts() + ["", " ", "a photo of a cat", "<|endoftext|> x <|startoftext|>", "🐱" * 60]
    ours = tok(prompts)
    theirs = ref(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ours.shape == (len(prompts), 77) and ours.dtype == torch.long
    assert torch.equal(ours, theirs)


@functools.cache
def _vocab_and_ranks() -> tuple[dict[str, int], dict[tuple[str, str], int]]:
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").split("\n")[1:]
    return vocab, {tuple(line.split()): i for i, line in enumerate(lines) if line}


def _reference_bpe_ids(text: str) -> list[int]:
    """CLIP's original algorithm (simple_tokenizer.py) in plain Python, on the shipped files: no tokenizers lib."""
    vocab, ranks = _vocab_and_ranks()
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    byte_char = {b: chr(b) for b in printable}
    byte_char.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in printable)})
    pattern = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    ids = [49406]
    for word in regex.findall(pattern, " ".join(text.split()).lower()):
        symbols = [byte_char[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        while len(symbols) > 1:
            pairs = [(ranks.get(p, 1 << 30), i) for i, p in enumerate(zip(symbols, symbols[1:]))]
            rank, i = min(pairs)
            if rank == 1 << 30:
                break
            symbols[i:i + 2] = [symbols[i] + symbols[i + 1]]
        ids += [vocab[s] for s in symbols]
    return ids + [49407]


def test_against_plain_python_clip_bpe(tok):
    for prompt in _prompts(40, seed=1):
        ref = _reference_bpe_ids(prompt)[:76] + [49407]  # CLIP truncation keeps the end token
        assert tok(prompt)[0, :len(ref)].tolist() == ref[:77], prompt


def test_known_ids_and_vocab(tok):
    assert tok("a photo of a cat")[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407, 49407]
    assert tok("A  Photo of a CAT")[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.vocab_size == 49408 and (tok.bos_id, tok.eos_id) == (49406, 49407)
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["!"] == 0 and vocab["!</w>"] == 256 and vocab["in"] == 512 and vocab["<|endoftext|>"] == 49407
    assert (TOKENIZER_DIR / "LICENSE").read_text().count("MIT") >= 1


def test_empty_prompt_truncation_and_non_ascii(tok):
    empty = tok([""])[0]
    assert empty[0] == 49406 and (empty[1:] == 49407).all()  # SD-v1.5: the unconditional prompt
    long = tok("cat " * 200)[0]
    assert long.shape == (77,) and long[0] == 49406 and long[-1] == 49407 and (long[1:76] == 2368).all()
    ids = tok("Ünïcödé café 東京 🐱")[0]
    assert tok.decode(ids) == "ünïcödé café 東京 🐱"
    assert (ids != 49407).sum() > 6  # multi-byte characters become several byte-level tokens


def test_missing_tokenizer_file(tmp_path):
    (tmp_path / "vocab.json").write_text("{}")
    with pytest.raises(WeightsError, match=str(tmp_path / "merges.txt")):
        Tokenizer(tmp_path)


def _tiny_encoder(seed=0) -> TextEncoder:
    torch.manual_seed(seed)
    return TextEncoder(TextEncoderConfig.tiny()).eval()


def test_text_encoder_save_load_round_trip(tmp_path, tok):
    model, ids = _tiny_encoder(), tok(["a photo of a cat", ""])
    with torch.no_grad():
        out = model(ids)
        assert out.shape == (2, 77, 32)
        save_text_encoder(tmp_path / "te", model)
        assert torch.equal(load_text_encoder(tmp_path / "te")(ids), out)
    with pytest.raises(WeightsError, match=str(tmp_path / "missing")):
        load_text_encoder(tmp_path / "missing")
    (tmp_path / "te" / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_text_encoder(tmp_path / "te")


def test_load_transformers_folders(tmp_path, tok):
    model, ids = _tiny_encoder(1), tok(["an astronaut riding a horse"])
    theirs = transformers.CLIPTextModel(clip_text_config(model.config))
    theirs.load_state_dict(model.text_model.state_dict())
    theirs.save_pretrained(tmp_path / "v5")  # transformers 5 writes keys without "text_model."
    old = tmp_path / "old"  # the layout of SD-v1.5's text_encoder/: "text_model." prefix and position_ids
    old.mkdir()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({**state, POSITION_IDS_KEY: torch.arange(77)[None]}, str(old / "model.safetensors"))
    (old / "config.json").write_text((tmp_path / "v5" / "config.json").read_text())
    with torch.no_grad():
        ref = model(ids)
        for folder in ("v5", "old"):
            assert torch.equal(load_transformers_text_encoder(tmp_path / folder)(ids), ref)
    save_file({**state, "text_model.extra.weight": torch.zeros(1)}, str(old / "model.safetensors"))
    with pytest.raises(WeightsError, match="text_model.extra.weight"):
        load_transformers_text_encoder(old)


def test_ldm_keys(tmp_path):
    model = _tiny_encoder(2)
    state = model.state_dict()
    ldm = {**text_to_ldm(state), "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77),
           "model.diffusion_model.out.0.weight": torch.zeros(1)}
    assert "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight" in ldm
    back = text_from_ldm(ldm)
    assert back.keys() == state.keys() and all(torch.equal(back[k], v) for k, v in state.items())
    legacy = {k.replace("transformer.text_model.", "transformer."): v for k, v in ldm.items()}  # old transformers
    assert text_from_ldm(legacy).keys() == state.keys()
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "sd.safetensors"))
    loaded = load_ldm_text_encoder(tmp_path / "sd.safetensors", TextEncoderConfig.tiny())
    assert torch.equal(loaded.text_model.final_layer_norm.weight, state["text_model.final_layer_norm.weight"])
    with pytest.raises(WeightsError, match="cond_stage_model.transformer.pooler.weight"):
        text_from_ldm({**ldm, "cond_stage_model.transformer.pooler.weight": torch.zeros(1)})


def test_configs():
    # openai/clip-vit-large-patch14 text config as in SD-v1.5's text_encoder/config.json
    sd15_json = {"architectures": ["CLIPTextModel"], "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0,
                 "eos_token_id": 2, "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
                 "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
                 "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
                 "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "vocab_size": 49408}
    assert config_from_transformers(sd15_json) == TextEncoderConfig.sd15()
    with pytest.raises(ConfigError, match="num_hidden_layers"):
        config_from_transformers({k: v for k, v in sd15_json.items() if k != "num_hidden_layers"})
    with torch.device("meta"):
        assert sum(p.numel() for p in TextEncoder(TextEncoderConfig.sd15()).parameters()) == 123_060_480
    small = TextEncoder(TextEncoderConfig.small()).eval()  # our domain model's tower: same 49,408-token vocab
    with torch.no_grad():
        assert small(Tokenizer()(["a red car"])).shape == (1, 77, 256)


def test_is_truncated_boundary():
    tok = Tokenizer()
    assert not tok.is_truncated("a cat")
    assert not tok.is_truncated("cat " * 75)  # exactly fills the 75 slots between BOS and EOS
    assert tok.is_truncated("cat " * 76)


def test_compact_vocabulary_is_exact_on_kept_tokens_and_blank_elsewhere(tmp_path, tok):
    from snapfusion.models.text import compact_vocabulary

    model = _tiny_encoder().eval()
    kept = tok(["a red circle on a blue background", "two cats"])
    compact = compact_vocabulary(model, kept.unique().tolist()).eval()
    assert compact.config.vocab_rows == len(set(kept.unique().tolist()) | {49406, 49407}) + 1
    other = tok(["a zebra riding a horse"])
    with torch.no_grad():
        assert torch.equal(compact(kept), model(kept))
        assert not compact.unknown_tokens(kept).any()
        unknown = compact.unknown_tokens(other)
        assert unknown.any() and not unknown[0, 0] and not unknown[0, -1]  # BOS and EOS padding are kept
        blanked = model.text_model.embeddings.token_embedding.weight.clone()
        model.text_model.embeddings.token_embedding.weight.data[other[0][unknown[0]]] = 0.0  # what "blank" means
        assert torch.allclose(compact(other), model(other), atol=1e-6)
        model.text_model.embeddings.token_embedding.weight.data.copy_(blanked)
        save_text_encoder(tmp_path / "c", compact, dtype=torch.float16)  # the int32 map survives an fp16 save
        loaded = load_text_encoder(tmp_path / "c")
        assert loaded.token_map.dtype == torch.int32 and torch.equal(loaded.token_map, compact.token_map)
    with pytest.raises(ConfigError, match="already compact"):
        compact_vocabulary(compact, [1, 2])
    with pytest.raises(ConfigError, match="vocab_rows"):
        TextEncoderConfig.tiny().__class__(**{**TextEncoderConfig.tiny().__dict__, "vocab_rows": 2})


def test_shipped_base_text_encoder_is_compact_and_knows_every_test_prompt(tok):
    from snapfusion.loading import EMBEDDED
    from snapfusion.data import load_prompt_set

    text = load_text_encoder(EMBEDDED / "base" / "text_encoder")
    assert 300 < text.config.vocab_rows < 1000
    for name in ("test", "train200"):
        ids = tok([r["prompt"] for r in load_prompt_set(name)])
        assert not text.unknown_tokens(ids).any(), name


def test_skip_layers_is_diffusers_clip_skip_as_a_shorter_tower(tmp_path, tok):
    """skip_layers(model, k) is the tower without its last k layers and keeps the final layer norm: its output is
    the k-th layer from the end through that norm (diffusers' clip_skip), and it saves and loads as a plain tower."""
    torch.manual_seed(0)
    model = TextEncoder(TextEncoderConfig(hidden_size=32, num_layers=3, num_heads=2, intermediate_size=64,
                                          projection_dim=32)).eval()
    ids = tok(["a red star to the left of a cat", ""])
    with torch.no_grad():
        hidden = model.text_model(input_ids=ids, output_hidden_states=True).hidden_states  # embeddings + 3 layers
        inner = getattr(model.text_model, "text_model", model.text_model)
        for k in (1, 2):
            short = skip_layers(model, k)
            assert short.config.num_layers == 3 - k
            want = inner.final_layer_norm(hidden[-(k + 1)])
            torch.testing.assert_close(short(ids), want, atol=0, rtol=0)
            assert not torch.allclose(short(ids), model(ids))  # it is a different context
        save_text_encoder(tmp_path / "t", skip_layers(model, 1))
        torch.testing.assert_close(load_text_encoder(tmp_path / "t")(ids), skip_layers(model, 1)(ids), atol=0, rtol=0)
    assert skip_layers(model, 0) is model
    for bad in (3, -1, 1.0, True):
        with pytest.raises(ConfigError, match="clip skip"):
            skip_layers(model, bad)
