"""Checks of user-supplied generation settings, written once for the CLI, the HTTP server and the Python API.

Each ``check_*`` returns the normalised value or raises ``InputError`` with one line that names the setting.
None means "the model's default" wherever a setting has one, and passes through unchanged.
"""

from __future__ import annotations

import math
import os
from numbers import Integral, Real
from pathlib import Path
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
    try:
        value = float(value)
    except OverflowError:  # an int too large for a float (JSON allows any number of digits)
        raise InputError(f"{name} must be a finite number, got an integer of {len(str(value))} digits") from None
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
        raise _not_utf8(text, name) from None
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
    try:
        return check_side(height, name="height"), check_side(width, name="width")
    except InputError as err:
        raise InputError(f"{err} (size {text!r})") from None


def check_sampler(sampler, *, name: str = "sampler") -> str | None:
    """None (the model's default) or one of SAMPLERS."""
    if sampler is None:
        return None
    if sampler not in SAMPLERS:
        raise InputError(f"{name} must be one of {', '.join(SAMPLERS)}, got {sampler!r}")
    return sampler


# ---- prompts: argv bytes and CLIP's length -------------------------------------------------------------------

def _not_utf8(text: str, name: str) -> InputError:
    """The error for text holding lone surrogates: argv bytes that are not UTF-8 arrive as U+DC80..U+DCFF."""
    for i, ch in enumerate(text):
        if "\udc80" <= ch <= "\udcff":
            return InputError(f"{name} is not valid UTF-8: byte 0x{ord(ch) - 0xDC00:02x} at character {i} "
                              "(pass the text in UTF-8)")
        if "\ud800" <= ch <= "\udfff":
            return InputError(f"{name} is not valid UTF-8 text: unpaired surrogate U+{ord(ch):04X} at character {i}")
    return InputError(f"{name} is not valid UTF-8 text")


def truncation_warning(tokenizer, text: str, *, name: str = "prompt") -> str | None:
    """The warning for ``text`` longer than the tokenizer's window (CLIP: 75 tokens), or None when it fits.

    ``tokenizer`` needs ``is_truncated(text)`` and ``max_length`` (snapfusion.models.text.Tokenizer)."""
    if not text or not tokenizer.is_truncated(text):
        return None
    return f"the {name.replace('_', ' ')} is longer than CLIP's {tokenizer.max_length - 2} tokens; the rest is dropped"


def check_guidance_rescale(phi, *, name: str = "guidance_rescale") -> float | None:
    """None (the model's default) or the guidance rescale phi, a finite number in [0, 1]; 0 is plain guidance."""
    if phi is None:
        return None
    phi = _real(phi, name)
    if not 0.0 <= phi <= 1.0:
        raise InputError(f"{name} must be between 0 and 1, got {phi:g}")
    return phi


def resolve_guidance_rescale(phi, default) -> float:
    """``phi`` (a call's value) or, when None, ``default`` (the model's stored one), checked; the error names which."""
    return _call_or_default(phi, default, check_guidance_rescale, "guidance_rescale")


def check_rescale_fits(phi: float, *, embeds_guidance: bool, model: str) -> float:
    """``phi``, unless it is above 0 and ``model``'s UNet embeds the guidance scale: the rescale needs the
    conditional output beside the guided one, which a one-call model does not compute (``InputError``)."""
    if embeds_guidance and phi:
        raise InputError(f"guidance rescale needs two UNet calls per step (the conditional output beside the guided "
                         f"one); {model} embeds the guidance scale (one call) and cannot use it")
    return phi


def check_guidance_interval(interval, *, name: str = "guidance_interval") -> tuple[float, float] | None:
    """None (the model's default) or the guidance interval (start, end): two finite numbers, 0 <= start < end <= 1,
    fractions of the sampling steps that mix guidance (``sampling.guidance_steps``); (0, 1) is every step."""
    if interval is None:
        return None
    if isinstance(interval, (str, bytes)) or not isinstance(interval, Sequence) or len(interval) != 2:
        raise InputError(f"{name} must be two numbers [start, end], got {interval!r}")
    start, end = (_real(x, name) + 0.0 for x in interval)  # + 0.0: -0 is 0
    if not 0.0 <= start < end <= 1.0:
        raise InputError(f"{name} must satisfy 0 <= start < end <= 1, got [{start:g}, {end:g}]")
    return start, end


def resolve_guidance_interval(interval, default) -> tuple[float, float]:
    """``interval`` (a call's value) or, when None, ``default`` (the model's stored one), checked; the error names
    which."""
    return _call_or_default(interval, default, check_guidance_interval, "guidance_interval")


def _call_or_default(value, default, check, name: str):
    # a call's value, or the model's stored default when None, through ``check``; the error names which it was
    if value is None:
        return check(default, name=f"{name} (the model's default)")
    return check(value, name=name)


def check_interval_fits(interval: tuple[float, float], *, guided: Sequence[bool], guidance: float,
                        embeds_guidance: bool, model: str, default: bool = False) -> tuple[float, float]:
    """``interval``, unless it limits guidance on a model whose UNet embeds the guidance scale (one call per step,
    no conditional pass to fall back to) or, at a guidance other than 1, guides none of the steps (``guided``: one
    flag per step, ``sampling.guidance_steps``) (``InputError``; ``default``: the interval is the model's)."""
    if tuple(interval) == (0.0, 1.0):
        return interval
    if embeds_guidance:
        raise InputError(f"a guidance interval needs two UNet calls per step; {model} embeds the guidance scale (one "
                         "call) and cannot use one")
    if guidance != 1.0 and not any(guided):
        start, end, n = interval[0], interval[1], len(guided)
        whose = f"{model}'s default " if default else ""
        raise InputError(f"guidance interval {whose}[{start:g}, {end:g}] guides none of the {n} steps (step i is "
                         f"guided when {start:g} <= i/{n} < {end:g}); pass another interval")
    return interval


def used_guidance_interval(interval: tuple[float, float], guidance: float) -> tuple[float, float]:
    """The guidance interval as the sampler uses it: every step at guidance 1 (no mix to limit), for settings and
    metadata."""
    return (0.0, 1.0) if guidance == 1.0 else (float(interval[0]), float(interval[1]))


def check_negative_prompt_fits(negative_prompt: str | None, *, embeds_guidance: bool, model: str) -> str:
    """The negative prompt, unless ``model``'s UNet embeds the guidance scale: it runs one call per step and has no
    unconditional pass for a negative prompt to replace (``InputError``)."""
    if embeds_guidance and negative_prompt:
        raise InputError(f"negative prompts need two UNet calls per step; {model} embeds the guidance scale (one "
                         "call) and cannot use one")
    return "" if negative_prompt is None else negative_prompt


def used_guidance_rescale(phi: float, guidance: float) -> float:
    """The guidance rescale as the sampler uses it: 0 at guidance 1 (no mix to rescale), for settings and metadata."""
    return 0.0 if guidance == 1.0 else float(phi)


def used_negative_prompt(negative_prompt: str | None, guidance: float) -> str:
    """The negative prompt as the sampler uses it: blank at guidance 1 (no unconditional pass), for metadata."""
    return "" if negative_prompt is None or guidance == 1.0 else negative_prompt


# ---- numbers ------------------------------------------------------------------------------------------------

MAX_COUNT = 2**63 - 1      # the largest count a torch int64 (and a DataLoader index) holds
MAX_BATCH = 4096           # per-process training batch; far past what fits one GPU at our sizes
MAX_EVAL_BATCH = 256       # images per generate call in eval
MAX_SWEEP = 32             # guidance scales in one sweep
MIN_OPSET, MAX_OPSET = 14, 23  # 14: scaled_dot_product_attention's first; torch 2.13's exporter refuses 24; 14..23
#                                export the tiny pipeline (fp32, fp16, int8) and pass onnxruntime parity
BENCH_MULTIPLE = 64        # KL-f8 latents x 3 UNet downsamplings: every shipped preset's size step
SIDE_MULTIPLE = 64         # the same for the image sizes of the commands: every shipped model's latent_factor


def check_int(value, *, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer in [minimum, maximum] (either bound optional)."""
    value = _int(value, name)
    if minimum is not None and value < minimum or maximum is not None and value > maximum:
        if maximum is None:
            raise InputError(f"{name} must be >= {minimum}, got {value}")
        if minimum is None:
            raise InputError(f"{name} must be <= {maximum}, got {value}")
        shown = "2**63 - 1" if maximum == MAX_COUNT else maximum  # the int64 limit, not its 19 digits
        raise InputError(f"{name} must be between {minimum} and {shown}, got {value}")
    return value


def check_positive_int(value, *, name: str, maximum: int = MAX_COUNT) -> int:
    """An integer in [1, maximum]: batch sizes, step counts, --checkpoint-every, --log-every."""
    return check_int(value, name=name, minimum=1, maximum=maximum)


def check_non_negative_int(value, *, name: str, maximum: int = MAX_COUNT) -> int:
    """An integer in [0, maximum]: --num-workers, --warmup-steps, --sample-every (0: never)."""
    return check_int(value, name=name, minimum=0, maximum=maximum)


def check_float(value, *, name: str, minimum: float | None = None, maximum: float | None = None,
                low_open: bool = False, high_open: bool = False) -> float:
    """A finite number in [minimum, maximum]; ``low_open`` / ``high_open`` exclude the bound itself."""
    value = _real(value, name)
    low_bad = minimum is not None and (value <= minimum if low_open else value < minimum)
    high_bad = maximum is not None and (value >= maximum if high_open else value > maximum)
    if (low_bad or high_bad) and (minimum is None or maximum is None):  # one bound: say it plainly
        bound = f"{'>' if low_open else '>='} {minimum:g}" if low_bad else f"{'<' if high_open else '<='} {maximum:g}"
        raise InputError(f"{name} must be {bound}, got {value:g}")
    if low_bad or high_bad:
        lo = "(-inf" if minimum is None else f"{'(' if low_open else '['}{minimum:g}"
        hi = "inf)" if maximum is None else f"{maximum:g}{')' if high_open else ']'}"
        raise InputError(f"{name} must be in {lo}, {hi}, got {value:g}")
    return value


def check_lr(value, *, name: str = "--lr") -> float:
    """A learning rate: finite, > 0 and <= 1."""
    return check_float(value, name=name, minimum=0.0, maximum=1.0, low_open=True)


def check_ema_decay(value, *, name: str = "--ema-decay") -> float:
    """An EMA decay in [0, 1) (0 disables the EMA; 1 would never move it)."""
    return check_float(value, name=name, minimum=0.0, maximum=1.0, high_open=True)


def parse_float(text, *, name: str) -> float:
    """A finite number written as text ('7.5', '1e-4'); nan and inf refused."""
    if isinstance(text, str):
        try:
            text = float(text.strip())
        except ValueError:
            raise InputError(f"{name} must be a number, got {text!r}") from None
    return _real(text, name)


def parse_int(text, *, name: str) -> int:
    """An integer written as text ('12', '-3'); '1.5', '1e3' and words refused."""
    if isinstance(text, str):
        try:
            text = int(text.strip(), 10)
        except ValueError:
            raise InputError(f"{name} must be an integer, got {text!r}") from None
    return _int(text, name)


def parse_guidance_sweep(text, *, name: str = "--guidance-sweep") -> list[float]:
    """'1,2,4,7.5' -> [1.0, 2.0, 4.0, 7.5]: each a finite scale in [0, MAX_GUIDANCE], at most MAX_SWEEP of them.

    On the command line pass a list that starts with '-' as ``--guidance-sweep=-1,2`` (else argparse reads it as an
    option); its negative scale is then refused here."""
    if not isinstance(text, str):
        raise InputError(f"{name} must be text like '1,2,4,7.5', got {text!r}")
    parts = [p.strip() for p in text.split(",")]
    if not text.strip() or any(not p for p in parts):
        raise InputError(f"{name} must be comma-separated numbers like '1,2,4,7.5', got {text!r}")
    if len(parts) > MAX_SWEEP:
        raise InputError(f"{name} has {len(parts)} scales; the limit is {MAX_SWEEP}")
    return [check_guidance(parse_float(p, name=f"{name} value"), name=f"{name} value") for p in parts]


def parse_guidance_interval(text, *, name: str = "--guidance-interval") -> tuple[float, float]:
    """'0,0.5' -> (0.0, 0.5), checked as ``check_guidance_interval`` checks it."""
    if not isinstance(text, str):
        raise InputError(f"{name} must be text like '0,0.5', got {text!r}")
    parts = [p.strip() for p in text.split(",")]
    if len(parts) != 2 or not all(parts):
        raise InputError(f"{name} must be two comma-separated numbers START,END like '0,0.5', got {text!r}")
    return check_guidance_interval([parse_float(p, name=name) for p in parts], name=name)


def check_opset(value, *, name: str = "--opset") -> int:
    """An ONNX opset torch.onnx can export our graphs with: MIN_OPSET..MAX_OPSET."""
    return check_int(value, name=name, minimum=MIN_OPSET, maximum=MAX_OPSET)


def check_bench_size(value, *, name: str = "--size") -> int:
    """A benchmark image side: a positive multiple of BENCH_MULTIPLE up to MAX_SIDE (no default: None is refused)."""
    if value is None:
        raise InputError(f"{name} must be a positive multiple of {BENCH_MULTIPLE} up to {MAX_SIDE}, got None")
    return check_side(value, name=name, multiple=BENCH_MULTIPLE)


def check_training(*, max_steps, batch_size, lr, warmup_steps=0, ema_decay=0.0, log_every=1, sample_every=0,
                   checkpoint_every=1, num_workers=0, max_minutes=0.0, seed=0) -> dict:
    """The training loop's options (CLI spelling in the messages), checked together; returns them normalised."""
    return {"max_steps": check_positive_int(max_steps, name="--max-steps"),
            "batch_size": check_positive_int(batch_size, name="--batch-size", maximum=MAX_BATCH),
            "lr": check_lr(lr),
            "warmup_steps": check_non_negative_int(warmup_steps, name="--warmup-steps"),
            "ema_decay": check_ema_decay(ema_decay),
            "log_every": check_positive_int(log_every, name="--log-every"),
            "sample_every": check_non_negative_int(sample_every, name="--sample-every"),
            "checkpoint_every": check_positive_int(checkpoint_every, name="--checkpoint-every"),
            "num_workers": check_non_negative_int(num_workers, name="--num-workers", maximum=256),
            "max_minutes": check_float(max_minutes, name="--max-minutes", minimum=0.0),
            "seed": check_seed(seed, name="--seed")}


# ---- output paths: checked before any model loads ----------------------------------------------------------

IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}


def _path(value, name: str) -> Path:
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str):
        raise InputError(f"{name} must be a path, got {value!r}")
    if not value.strip():
        raise InputError(f"{name} is empty; give a file or folder name")
    if "\x00" in value:
        raise InputError(f"{name} contains a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        if not all("\udc80" <= ch <= "\udcff" for ch in value if "\ud800" <= ch <= "\udfff"):
            raise _not_utf8(value, name) from None  # lone surrogates that are no argv byte
    return Path(value)


def _check_writable_parent(path: Path, name: str) -> None:
    """The nearest existing ancestor of ``path`` is a folder we may write in (the rest is created later)."""
    parent = path.parent if str(path.parent) else Path(".")
    while not parent.exists():
        if parent.is_symlink():
            raise InputError(f"{name} {path}: {parent} is a broken link")
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{name} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{name} {path}: no permission to write in {parent}")


def check_output_image(value, *, name: str = "--out") -> Path:
    """An image path to write: a known extension (.png, .jpg, .jpeg, .webp), not a folder, in a writable place."""
    path = _path(value, name)
    if path.is_dir():
        raise InputError(f"{name} {path} is a folder; give an image file name such as {path / 'image.png'}")
    if path.suffix.lower() not in IMAGE_FORMATS:
        known = ", ".join(IMAGE_FORMATS)
        got = f"extension {path.suffix!r}" if path.suffix else "no extension"
        raise InputError(f"{name} {path}: {got}; use one of {known}")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{name} {path}: the file exists and is not writable")
    _check_writable_parent(path, name)
    return path


def check_output_dir(value, *, name: str = "--out") -> Path:
    """A folder to write into: not an existing file, and creatable or writable."""
    path = _path(value, name)
    if path.exists() and not path.is_dir():
        raise InputError(f"{name} {path} is a file, not a folder")
    if path.is_dir():
        if not os.access(path, os.W_OK | os.X_OK):
            raise InputError(f"{name} {path}: no permission to write in it")
        return path
    _check_writable_parent(path, name)
    return path


def check_output_file(value, *, name: str, suffixes: Sequence[str] = ()) -> Path:
    """A file path to write (JSON, Markdown, safetensors): not a folder, a known suffix if given, a writable place."""
    path = _path(value, name)
    if path.is_dir():
        raise InputError(f"{name} {path} is a folder; give a file name")
    if suffixes and path.suffix.lower() not in suffixes:
        got = f"extension {path.suffix!r}" if path.suffix else "no extension"
        raise InputError(f"{name} {path}: {got}; use {' or '.join(suffixes)}")
    if path.exists() and not os.access(path, os.W_OK):
        raise InputError(f"{name} {path}: the file exists and is not writable")
    _check_writable_parent(path, name)
    return path


def check_input_path(value, *, name: str, folder: bool | None = None, marker: str | None = None) -> Path:
    """An existing file or folder to read (``folder``: True a folder, False a file, None either; ``marker``: a file
    the folder must hold, e.g. config.json)."""
    path = _path(value, name)
    if not path.exists():
        raise InputError(f"{name} {path}: no such file or folder")
    if folder is True and not path.is_dir():
        raise InputError(f"{name} {path} is a file, not a folder")
    if folder is False and path.is_dir():
        raise InputError(f"{name} {path} is a folder, not a file")
    if marker and not (path / marker).is_file():
        raise InputError(f"{name} {path}: no {marker} there")
    return path
