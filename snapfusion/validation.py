"""Checks of user-supplied generation settings, written once for the CLI, the HTTP server and the Python API.

Each ``check_*`` returns the normalised value or raises ``InputError`` with one line that names the setting.
None means "the model's default" wherever a setting has one, and passes through unchanged.
"""

from __future__ import annotations

import math
from numbers import Integral, Real
from typing import Sequence

from snapfusion.errors import InputError

MAX_SEED = 2**64 - 1        # torch.Generator.manual_seed's range
MAX_IMAGES = 64             # images per call (prompts x num_images): one batch must fit a laptop
MAX_STEPS = 1000            # the training schedule's length
MAX_GUIDANCE = 100.0        # far past any useful scale; larger ones overflow fp16 latents
MAX_SIDE = 2048             # pixels; 4x SD-v1.5's training size
MAX_PROMPT_CHARS = 20_000   # a guard against absurd input; CLIP reads 75 tokens and drops the rest
SAMPLERS = ("ddim", "dpmpp_2m")


def _int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise InputError(f"{name} must be an integer, got {value!r}")
    return int(value)


def _real(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise InputError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise InputError(f"{name} must be a finite number, got {value}")
    return value


def check_prompt(text, *, name: str = "prompt", allow_empty: bool = True) -> str:
    """A prompt: text of at most MAX_PROMPT_CHARS characters, without NUL or unpaired surrogates."""
    if not isinstance(text, str):
        raise InputError(f"{name} must be text, got {type(text).__name__}")
    if len(text) > MAX_PROMPT_CHARS:
        raise InputError(f"{name} is {len(text)} characters; the limit is {MAX_PROMPT_CHARS} (CLIP reads 75 tokens)")
    if "\x00" in text:
        raise InputError(f"{name} contains a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{name} is not valid UTF-8 text") from None
    if not allow_empty and not text.strip():
        raise InputError(f"{name} is empty")
    return text


def check_prompts(prompts, *, name: str = "prompt") -> list[str]:
    """One prompt or a list of prompts -> a list (a plain string is one prompt, not one per character)."""
    if isinstance(prompts, str):
        return [check_prompt(prompts, name=name)]
    if not isinstance(prompts, Sequence) or not prompts:
        raise InputError(f"{name} must be a string or a non-empty list of strings, got {type(prompts).__name__}")
    return [check_prompt(p, name=name) for p in prompts]


def check_seed(seed, *, name: str = "seed") -> int | None:
    """None (a random seed is drawn) or an integer in [0, 2**64 - 1]."""
    if seed is None:
        return None
    seed = _int(seed, name)
    if not 0 <= seed <= MAX_SEED:
        raise InputError(f"{name} must be between 0 and {MAX_SEED} (2**64 - 1), got {seed}")
    return seed


def check_num_images(n, *, name: str = "num_images", prompts: int = 1) -> int:
    """Images per prompt: at least 1, and prompts x n at most MAX_IMAGES."""
    n = _int(n, name)
    if n < 1:
        raise InputError(f"{name} must be at least 1, got {n}")
    if n * prompts > MAX_IMAGES:
        raise InputError(f"{name} x prompts = {n * prompts} images; the limit per call is {MAX_IMAGES}")
    return n


def check_steps(steps, *, name: str = "steps") -> int | None:
    """None (the model's default) or 1..MAX_STEPS sampler steps."""
    if steps is None:
        return None
    steps = _int(steps, name)
    if not 1 <= steps <= MAX_STEPS:
        raise InputError(f"{name} must be between 1 and {MAX_STEPS}, got {steps}")
    return steps


def check_guidance(guidance, *, name: str = "guidance") -> float | None:
    """None (the model's default) or a finite scale in [0, MAX_GUIDANCE]; 1 means no unconditional pass."""
    if guidance is None:
        return None
    guidance = _real(guidance, name)
    if not 0.0 <= guidance <= MAX_GUIDANCE:
        raise InputError(f"{name} must be between 0 and {MAX_GUIDANCE:g}, got {guidance:g}")
    return guidance


def check_side(value, *, name: str = "height", multiple: int = 8) -> int | None:
    """None (the model's default) or a positive multiple of ``multiple`` pixels up to MAX_SIDE."""
    if value is None:
        return None
    value = _int(value, name)
    if value <= 0 or value % multiple or value > MAX_SIDE:
        raise InputError(f"{name} must be a positive multiple of {multiple} up to {MAX_SIDE}, got {value}")
    return value


def parse_size(text: str) -> tuple[int, int]:
    """'512x512' (width x height, as OpenAI's images API writes it) or '512' -> (height, width)."""
    if not isinstance(text, str):
        raise InputError(f"size must be text like '512x512', got {text!r}")
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise InputError(f"size must look like '512x512' (width x height), got {text!r}")
    width, height = int(parts[0]), int(parts[-1])
    return check_side(height, name="height"), check_side(width, name="width")


def check_sampler(sampler, *, name: str = "sampler") -> str | None:
    """None (the model's default) or one of SAMPLERS."""
    if sampler is None:
        return None
    if sampler not in SAMPLERS:
        raise InputError(f"{name} must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    return sampler
