"""CLIP text side of SD-v1.5: the BPE tokenizer (vocabulary shipped in snapfusion/assets/tokenizer) and the
text tower (transformers' ``CLIPTextModel`` in plain torch, clip_text.py, built from a config, never from a hub).

The encoder's output is ``last_hidden_state`` (B, 77, D), the cross-attention context SD-v1.5 uses. Its state-dict
names are transformers' ``CLIPTextModel`` names (``text_model.encoder.layers.0.self_attn.q_proj.weight`` ...), so
a diffusers/transformers ``text_encoder/`` folder loads without renaming.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from snapfusion.config import load_json
from snapfusion.errors import ConfigError, WeightsError
from snapfusion.models.clip_text import ClipTextModel
from snapfusion.weights import (WEIGHTS_STEM, build_loaded, load_safetensors, read_config, resolve_weights,
                                save_pretrained)

TOKENIZER_DIR = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context length
POSITION_IDS_KEY = "text_model.embeddings.position_ids"  # a buffer some files hold and others do not
EMBEDDING_KEY = "text_model.embeddings.token_embedding.weight"


class Tokenizer:
    """CLIP BPE tokenizer: prompts -> LongTensor (B, 77) = [BOS, tokens..., EOS, EOS-padding] (SD-v1.5)."""

    def __init__(self, folder: str | os.PathLike = TOKENIZER_DIR, *, max_length: int = MAX_LENGTH):
        from tokenizers import processors

        folder = Path(folder)
        self.max_length = max_length
        self.folder = folder  # written back by the diffusers export
        fast = folder / "tokenizer.json"
        if fast.is_file() and not (folder / "vocab.json").is_file():  # transformers >= 5 writes only this file
            backend, source = _load_fast(fast), fast
        else:
            backend, source = _clip_backend(folder), folder / "vocab.json"
        self.bos_id, self.eos_id = backend.token_to_id(BOS), backend.token_to_id(EOS)
        if (self.bos_id, self.eos_id) != (49406, 49407):
            raise WeightsError(f"{source}: expected {BOS}=49406 and {EOS}=49407, got {self.bos_id}, {self.eos_id}")
        if source == fast:  # its added tokens (e.g. textual-inversion "<cat-toy>") come with it
            self.added_tokens = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if i > self.eos_id}
        else:
            self.added_tokens = _add_tokens(backend, folder, self.eos_id)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A {EOS}", special_tokens=[(BOS, self.bos_id), (EOS, self.eos_id)])
        backend.enable_truncation(max_length=max_length)  # keeps BOS and EOS, drops tokens past 75
        backend.enable_padding(length=max_length, pad_id=self.eos_id, pad_token=EOS)  # SD-v1.5 pads with EOS
        self.backend = backend

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size()

    def __call__(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Token ids (B, max_length) for one prompt or a list of prompts."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        encodings = self.backend.encode_batch(prompts)
        return torch.tensor([e.ids for e in encodings], dtype=torch.long)  # (B, 77)

    def is_truncated(self, prompt: str) -> bool:
        """Whether ``prompt`` has more tokens than fit between BOS and EOS (CLIP then drops the rest)."""
        return bool(self.backend.encode(prompt).overflowing)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of a token-id row, special tokens dropped (for logs and tests)."""
        return self.backend.decode(list(ids), skip_special_tokens=True).replace("</w>", " ").strip()


def _clip_backend(folder: Path):
    """CLIP's byte-level BPE from vocab.json and merges.txt, with CLIP's cleaning and word pattern."""
    from tokenizers import Regex, Tokenizer as _Backend, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    vocab, merges = folder / "vocab.json", folder / "merges.txt"
    for path in (vocab, merges):
        if not path.is_file():
            raise WeightsError(f"tokenizer file not found: {path}")
    # words end in "</w>", no continuation prefix; unknown symbols map to EOS.
    bpe = BPE.from_file(str(vocab), str(merges), continuing_subword_prefix="", end_of_word_suffix="</w>",
                        unk_token=EOS, fuse_unk=False)
    backend = _Backend(bpe)
    # CLIP's cleaning: collapse whitespace, lower-case (NFC stands in for ftfy's fix_text).
    backend.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    # CLIP's word pattern (simple_tokenizer.py), then bytes -> printable unicode symbols.
    words = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([BOS, EOS])
    return backend


def _load_fast(path: Path):
    """A transformers ``tokenizer.json`` (a CLIP BPE with its added tokens), truncation and padding left to us."""
    from tokenizers import Tokenizer as _Backend

    try:
        backend = _Backend.from_file(str(path))
    except Exception as err:  # tokenizers raises its own exception type for a malformed file
        raise WeightsError(f"malformed tokenizer file {path}: {err}") from None
    if type(backend.model).__name__ != "BPE":
        raise WeightsError(f"{path}: expected CLIP's BPE tokenizer, found {type(backend.model).__name__}")
    backend.no_truncation()
    backend.no_padding()
    return backend


def _added_token_specs(folder: Path) -> dict[int, dict]:
    """id -> AddedToken fields of the tokens a transformers tokenizer folder adds (tokenizer_config.json's
    ``added_tokens_decoder``, or the older added_tokens.json); empty without those files."""
    specs: dict[int, dict] = {}
    legacy = folder / "added_tokens.json"
    if legacy.is_file():
        data = load_json(legacy)
        if not isinstance(data, dict):
            raise WeightsError(f"{legacy}: expected an object of token -> id")
        specs.update({int(i): {"content": t} for t, i in data.items()})
    config = folder / "tokenizer_config.json"
    decoder = load_json(config).get("added_tokens_decoder", {}) if config.is_file() else {}
    if not isinstance(decoder, dict):
        raise WeightsError(f"{config}: added_tokens_decoder must be an object of id -> token")
    for i, spec in decoder.items():
        if not isinstance(spec, dict) or not isinstance(spec.get("content"), str):
            raise WeightsError(f"{config}: added token {i} has no \"content\" string")
        specs[int(i)] = spec
    return specs


def _add_tokens(backend, folder: Path, eos_id: int) -> dict[str, int]:
    """Add the folder's added tokens past CLIP's vocabulary, each at the id the folder gives it, and return them."""
    from tokenizers import AddedToken

    added = {}
    for i, spec in sorted(_added_token_specs(folder).items()):
        if i <= eos_id:  # CLIP's own <|startoftext|> / <|endoftext|>, already special tokens
            if backend.token_to_id(spec["content"]) != i:
                raise WeightsError(f"{folder}: added token {spec['content']!r} at id {i} is not CLIP's")
            continue
        token = AddedToken(spec["content"], single_word=bool(spec.get("single_word", False)),
                           lstrip=bool(spec.get("lstrip", False)), rstrip=bool(spec.get("rstrip", False)),
                           normalized=bool(spec.get("normalized", True)), special=bool(spec.get("special", False)))
        backend.add_tokens([token])
        if backend.token_to_id(spec["content"]) != i:
            raise WeightsError(f"{folder}: added token {spec['content']!r} should have id {i}, the tokenizer gives it "
                               f"{backend.token_to_id(spec['content'])} (ids must follow the vocabulary without gaps)")
        added[spec["content"]] = i
    return added


@dataclass(frozen=True)
class TextEncoderConfig:
    """The fields of transformers' ``CLIPTextConfig`` that define the text tower."""

    vocab_size: int = 49408
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    max_positions: int = MAX_LENGTH
    hidden_act: Literal["quick_gelu", "gelu"] = "quick_gelu"
    projection_dim: int = 768  # CLIPTextModelWithProjection only; kept so the config round-trips
    layer_norm_eps: float = 1e-5
    # > 0: a compact token embedding of this many rows; the buffer ``token_map`` sends each of the vocab_size CLIP
    # ids to its row, and every id outside the kept vocabulary to row 0 (zeros). 0: CLIP's full embedding.
    vocab_rows: int = 0

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"TextEncoderConfig: hidden_size {self.hidden_size} not divisible by "
                              f"num_heads {self.num_heads}")
        if self.vocab_size < 49408:
            raise ConfigError(f"TextEncoderConfig: vocab_size {self.vocab_size} < 49408 cannot hold CLIP's tokens")
        if self.vocab_rows and not 3 <= self.vocab_rows <= self.vocab_size:
            raise ConfigError(f"TextEncoderConfig: vocab_rows {self.vocab_rows} must be 0 or in [3, {self.vocab_size}]")

    @classmethod
    def sd15(cls) -> "TextEncoderConfig":
        """CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14), SD-v1.5's text encoder: 123M parameters."""
        return cls()

    @classmethod
    def small(cls) -> "TextEncoderConfig":
        """A small tower for our own domain model: width 256, 4 layers, same tokenizer."""
        return cls(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024, projection_dim=256)

    @classmethod
    def tiny(cls) -> "TextEncoderConfig":
        """A toy tower for tests (the token embedding still covers all 49,408 tokens)."""
        return cls(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, projection_dim=32)


def clip_text_config(cfg: TextEncoderConfig):
    """transformers ``CLIPTextConfig`` for ``cfg`` (token ids left at defaults: they only affect the pooled output)."""
    from transformers import CLIPTextConfig

    # compact vocabulary: CLIP's special ids are not rows; eos 2 selects transformers' argmax rule for the pooled
    # output, which this project never reads
    special = dict(bos_token_id=0, eos_token_id=2, pad_token_id=1) if cfg.vocab_rows else {}
    return CLIPTextConfig(
        vocab_size=cfg.vocab_rows or cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        projection_dim=cfg.projection_dim, num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
        max_position_embeddings=cfg.max_positions, hidden_act=cfg.hidden_act, layer_norm_eps=cfg.layer_norm_eps,
        **special)


def config_from_transformers(data: dict, *, where: str = "text_encoder/config.json") -> TextEncoderConfig:
    """Our config from a transformers ``CLIPTextModel`` config.json dict."""
    if data.get("model_type", "clip_text_model") != "clip_text_model":
        raise ConfigError(f"{where}: expected model_type 'clip_text_model', got {data.get('model_type')!r}")
    names = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
             "num_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
             "max_positions": "max_position_embeddings", "hidden_act": "hidden_act",
             "projection_dim": "projection_dim", "layer_norm_eps": "layer_norm_eps"}
    missing = [theirs for theirs in names.values() if theirs not in data and theirs != "layer_norm_eps"]
    if missing:
        raise ConfigError(f"{where}: missing key(s) {missing}")
    from snapfusion.config import from_dict

    return from_dict(TextEncoderConfig, {ours: data[theirs] for ours, theirs in names.items() if theirs in data},
                     where=where)


class TextEncoder(nn.Module):
    """Token ids (B, 77) -> last_hidden_state (B, 77, D), the context of SD's cross-attention."""

    def __init__(self, config: TextEncoderConfig):
        super().__init__()
        self.config = config
        # keys text_model.embeddings.*, text_model.encoder.layers.*: the names in CLIPTextModel files on disk; the
        # tower is ours (clip_text.py), equal to transformers' bit for bit, so loading a model does not import it
        self.text_model = ClipTextModel(
            vocab=config.vocab_rows or config.vocab_size, width=config.hidden_size, layers=config.num_layers,
            heads=config.num_heads, hidden=config.intermediate_size, positions=config.max_positions,
            act=config.hidden_act, eps=config.layer_norm_eps, eos_token_id=2 if config.vocab_rows else 49407)
        if config.vocab_rows:
            self.register_buffer("token_map", torch.zeros(config.vocab_size, dtype=torch.int32))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.config.vocab_rows:  # CLIP ids -> rows of the compact embedding (the pooled output is not used)
            input_ids = self.token_map[input_ids].long()
        return self.text_model(input_ids=input_ids).last_hidden_state  # (B, 77, D)

    def unknown_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Mask (like ``input_ids``) of ids outside a compact vocabulary (all False for the full embedding)."""
        if not self.config.vocab_rows:
            return torch.zeros_like(input_ids, dtype=torch.bool)
        return (self.token_map[input_ids.to(self.token_map.device)] == 0).to(input_ids.device)  # ids from the CPU


def compact_vocabulary(model: TextEncoder, keep: Sequence[int]) -> TextEncoder:
    """A copy of ``model`` whose token embedding holds only the rows of ``keep`` (plus a zero row for the rest).

    For every id in ``keep`` the output is bit-identical; other ids all read the zero row. A small domain model
    uses a few hundred of CLIP's 49,408 tokens: its embedding shrinks from 49,408 rows to that many.
    """
    if model.config.vocab_rows:
        raise ConfigError("compact_vocabulary: the model's vocabulary is already compact")
    ids = sorted({int(i) for i in keep} | {49406, 49407})  # BOS and EOS (padding) are always kept
    if ids[0] < 0 or ids[-1] >= model.config.vocab_size:
        raise ConfigError(f"compact_vocabulary: ids must be in [0, {model.config.vocab_size}), got {len(ids)} ids")
    cfg = dataclasses.replace(model.config, vocab_rows=len(ids) + 1)
    out = TextEncoder(cfg)
    state = model.state_dict()
    table = state[EMBEDDING_KEY]
    rows = torch.zeros(len(ids) + 1, table.shape[1], dtype=table.dtype)
    rows[1:] = table[ids]
    state[EMBEDDING_KEY] = rows
    token_map = torch.zeros(model.config.vocab_size, dtype=torch.int32)
    token_map[ids] = torch.arange(1, len(ids) + 1, dtype=torch.int32)
    state["token_map"] = token_map
    out.load_state_dict(state)
    return out


def skip_layers(model: TextEncoder, skip: int) -> TextEncoder:
    """A copy of ``model`` without its last ``skip`` transformer layers, the final layer norm kept.

    Its ``last_hidden_state`` is the ``skip``-th layer from the end of ``model`` through the final layer norm, bit for
    bit: diffusers' ``clip_skip``, stored as a plain, shorter CLIP text tower that any CLIPTextModel loader reads, and
    cheaper to run. SD 2 conditions its UNet on the penultimate layer of a frozen CLIP tower (``skip`` = 1).
    ``skip`` = 0 returns the model itself.
    """
    if isinstance(skip, bool) or not isinstance(skip, int) or not 0 <= skip < model.config.num_layers:
        raise ConfigError(f"clip skip must be an integer in 0..{model.config.num_layers - 1} for a tower of "
                          f"{model.config.num_layers} layers, got {skip!r}")
    if skip == 0:
        return model
    out = TextEncoder(dataclasses.replace(model.config, num_layers=model.config.num_layers - skip))
    dropped = tuple(f".layers.{i}." for i in range(out.config.num_layers, model.config.num_layers))
    out.load_state_dict({k: v for k, v in model.state_dict().items() if not any(d in k for d in dropped)})
    return out.train(model.training).requires_grad_(any(p.requires_grad for p in model.parameters()))


KIND = "text-encoder"


def save_text_encoder(folder: str | os.PathLike, model: TextEncoder, *, dtype: torch.dtype | None = None) -> None:
    """Save as ``folder/{config.json, model.safetensors}`` (kind "text-encoder")."""
    save_pretrained(folder, model, model.config, kind=KIND, dtype=dtype)


def load_text_encoder(folder: str | os.PathLike, *, device: str | torch.device = "cpu") -> TextEncoder:
    """Load a folder written by ``save_text_encoder``."""
    config = read_config(folder, TextEncoderConfig, kind=KIND)
    path = resolve_weights(folder, WEIGHTS_STEM)
    return _build(config, load_safetensors(path), str(path)).to(device)


def load_transformers_text_encoder(folder: str | os.PathLike, *, device: str | torch.device = "cpu") -> TextEncoder:
    """Load a diffusers/transformers ``text_encoder/`` folder (config.json + model.safetensors, maybe sharded)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"text encoder folder not found: {folder}")
    config = config_from_transformers(load_json(folder / "config.json"), where=str(folder / "config.json"))
    path = resolve_weights(folder, "model", variants=("fp16",))
    state = load_safetensors(path)
    if not any(k.startswith("text_model.") for k in state):  # transformers >= 5 saves without the prefix
        state = {f"text_model.{k}": v for k, v in state.items()}
    return _build(config, state, str(path)).to(device)


def _build(config: TextEncoderConfig, state: dict[str, torch.Tensor], source: str) -> TextEncoder:
    state = dict(state)
    position_ids = state.pop(POSITION_IDS_KEY, None)  # non-persistent buffer in current transformers
    if position_ids is not None and not torch.equal(position_ids.long().flatten(),
                                                    torch.arange(config.max_positions)):
        raise WeightsError(f"{source}: '{POSITION_IDS_KEY}' is not 0..{config.max_positions - 1}")
    return build_loaded(lambda: TextEncoder(config), state, source=source)
