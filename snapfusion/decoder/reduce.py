"""Channel reduction of the KL-f8 decoder (SnapFusion §3.2) and its initialisation from the teacher's weights.

Every decoder tensor dimension that carries feature channels belongs to a named *channel space*: the residual
stream of a stage (``stream.up.1``), the hidden width inside one ResNet block (``hidden.up.1.res.2``), the
attention's query/key and value widths. Reducing the decoder keeps, per space, a subset of the teacher's
channels; the same index set is used wherever that space appears, so residual sums, GroupNorm groups and
attention products stay consistent (``tests/test_decoder.py``: a full-width permutation computes the
same function as the teacher).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Literal

import torch

from snapfusion.errors import ConfigError
from snapfusion.models.autoencoder import AutoencoderConfig, Decoder

InitMethod = Literal["first", "l1", "random"]
Space = str | None  # None: a dimension that is not reduced (latent, RGB, kernel)


def reduced_config(config: AutoencoderConfig, ratio: float = 0.5, *, norm_groups: int | None = None
                   ) -> AutoencoderConfig:
    """``config`` with every decoder width times ``ratio``; GroupNorm groups kept where they still hold at least
    2 channels each, else reduced.

    The group count is shared with the encoder (one ``norm_groups`` field), so the new count always divides the
    old one: the largest divisor of gcd(old groups, every new width) that leaves >= 2 channels per group in the
    narrowest stage. Groups of one channel (the base decoder halved with its 16 groups at 16 channels) normalise
    each channel alone over the whole image; distilled that way the decoder drew frames along the borders and
    halos around objects, and reached 23.5 dB where 8 groups reached 29.5 dB at equal steps (docs/efficient_decoder.md).
    ``norm_groups`` overrides it (it must divide every width).
    """
    if not 0 < ratio <= 1:
        raise ConfigError(f"decoder width ratio must be in (0, 1], got {ratio}")
    widths = tuple(max(1, round(w * ratio)) for w in config.decoder_widths)
    if norm_groups is None:
        common = math.gcd(config.norm_groups, *widths)
        norm_groups = max((g for g in range(1, common + 1) if common % g == 0 and min(widths) // g >= 2), default=1)
    if norm_groups < 1 or config.norm_groups % norm_groups:
        raise ConfigError(f"norm_groups {norm_groups} must divide the teacher's {config.norm_groups} "
                          f"(the encoder shares it)")
    return dataclasses.replace(config, decoder_widths=widths, norm_groups=norm_groups)


def decoder_spaces(config: AutoencoderConfig) -> dict[str, tuple[Space, ...]]:
    """Parameter name -> the channel space of each of its dimensions, following ``Decoder``'s data flow."""
    spaces: dict[str, tuple[Space, ...]] = {}

    def conv(name: str, out: Space, inp: Space) -> None:
        spaces[f"{name}.weight"] = (out, inp, None, None)
        spaces[f"{name}.bias"] = (out,)

    def norm(name: str, space: Space) -> None:
        spaces[f"{name}.weight"] = spaces[f"{name}.bias"] = (space,)

    def resnet(name: str, inp: Space, out: Space, has_shortcut: bool) -> None:
        hidden = f"hidden.{name}"
        norm(f"{name}.norm1", inp)
        conv(f"{name}.conv1", hidden, inp)
        norm(f"{name}.norm2", hidden)
        conv(f"{name}.conv2", out, hidden)
        if has_shortcut:
            conv(f"{name}.conv_shortcut", out, inp)

    widths = tuple(reversed(config.decoder_widths))  # lowest resolution first, as Decoder
    conv("post_quant_conv", None, None)
    stream = "stream.mid"
    conv("conv_in", stream, None)
    resnet("mid.res.0", stream, stream, False)
    if config.mid_attention:
        norm("mid.attn.0.group_norm", stream)
        for proj, space in (("to_q", "attn.qk"), ("to_k", "attn.qk"), ("to_v", "attn.v")):
            spaces[f"mid.attn.0.{proj}.weight"] = (space, stream)
            spaces[f"mid.attn.0.{proj}.bias"] = (space,)
        spaces["mid.attn.0.to_out.0.weight"] = (stream, "attn.v")
        spaces["mid.attn.0.to_out.0.bias"] = (stream,)
    resnet("mid.res.1", stream, stream, False)
    width = widths[0]
    for i, w in enumerate(widths):
        for j in range(config.layers_per_block + 1):
            changes = width != w
            out = f"stream.up.{i}" if changes else stream  # equal widths: the identity skip keeps the space
            resnet(f"up.{i}.res.{j}", stream, out, changes)
            stream, width = out, w
        if i < len(widths) - 1:
            conv(f"up.{i}.upsample.conv", f"stream.up.{i}.upsample", stream)
            stream = f"stream.up.{i}.upsample"
    norm("norm_out", stream)
    conv("conv_out", None, stream)
    return spaces


NORMED_PREFIXES = ("stream.", "hidden.")  # spaces that pass through a GroupNorm somewhere (attention's do not)


def _importance(teacher: dict[str, torch.Tensor], spaces: dict[str, tuple[Space, ...]]) -> dict[str, torch.Tensor]:
    """L1 importance per channel of every space: |w| summed over the other dims, each weight scaled to mean 1."""
    scores: dict[str, torch.Tensor] = {}
    for name, dims in spaces.items():
        w = teacher[name].float().abs()
        if w.ndim < 2:
            continue  # biases and norms: conv/linear weights carry the signal
        w = w / w.mean().clamp(min=1e-12)
        for d, space in enumerate(dims):
            if space is not None:
                other = [k for k in range(w.ndim) if k != d]
                scores[space] = scores.get(space, 0) + w.sum(dim=other)
    return scores


def select_channels(size: int, keep: int, groups: int, score: torch.Tensor | None) -> torch.Tensor:
    """Indices of ``keep`` of ``size`` channels: ``keep/groups`` from each of the teacher's ``groups`` norm groups
    (so a student group is a subset of one teacher group), in descending score order (or first-k if no score)."""
    if groups < 1 or size % groups or keep % groups:
        groups = 1
    per_group, group_size = keep // groups, size // groups
    chosen = []
    for g in range(groups):
        base = g * group_size
        if score is None:
            chosen.append(torch.arange(base, base + per_group))
        else:
            order = torch.argsort(score[base: base + group_size], descending=True, stable=True)
            chosen.append(base + order[:per_group])
    return torch.cat(chosen)


def init_from_teacher(student: Decoder, teacher: Decoder, method: InitMethod = "first") -> dict[str, torch.Tensor]:
    """Copy the teacher's weights into the narrower ``student`` on the selected channels; returns the index sets.

    ``first``: the first channels of each norm group; ``l1``: the largest-L1 ones; ``random``: leave the
    student's random init. Student and teacher must share everything but the decoder widths and group count.
    """
    if method == "random":
        return {}
    t_cfg, s_cfg = teacher.config, student.config
    if dataclasses.replace(t_cfg, decoder_widths=s_cfg.decoder_widths, norm_groups=s_cfg.norm_groups) != s_cfg:
        raise ConfigError("student and teacher decoders differ in more than widths and norm groups")
    spaces = decoder_spaces(t_cfg)
    t_state, s_state = teacher.state_dict(), student.state_dict()
    if set(spaces) != set(t_state):
        raise ConfigError(f"decoder space map out of date: {sorted(set(spaces) ^ set(t_state))[:3]}")
    sizes: dict[str, tuple[int, int]] = {}
    for name, dims in spaces.items():
        for d, space in enumerate(dims):
            if space is not None:
                sizes[space] = (t_state[name].shape[d], s_state[name].shape[d])
    scores = _importance(t_state, spaces) if method == "l1" else {}
    index = {}
    for space, (size, keep) in sizes.items():
        groups = min(t_cfg.norm_groups, s_cfg.norm_groups) if space.startswith(NORMED_PREFIXES) else 1
        index[space] = select_channels(size, keep, groups, scores.get(space))
    with torch.no_grad():
        for name, dims in spaces.items():
            value = t_state[name]
            for d, space in enumerate(dims):
                if space is not None:
                    value = value.index_select(d, index[space].to(value.device))
            s_state[name].copy_(value)
    return index


def reduce_decoder(teacher: Decoder, ratio: float = 0.5, *, method: InitMethod = "first",
                   norm_groups: int | None = None) -> Decoder:
    """A channel-reduced copy of ``teacher`` (every width times ``ratio``), initialised by ``method``."""
    student = Decoder(reduced_config(teacher.config, ratio, norm_groups=norm_groups))
    source = teacher if all(t.dtype == torch.float32 for t in teacher.state_dict().values()) else \
        copy.deepcopy(teacher).float()  # never cast the caller's module in place
    init_from_teacher(student, source, method)
    return student
