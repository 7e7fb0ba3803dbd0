"""argparse ``type=`` functions, each built from a snapfusion.validation check (the checks the Python API and the
HTTP server use too): a bad value is a one-line ``InputError`` naming the option, raised while the command line is
parsed, before any model loads or any file is written."""

from __future__ import annotations

from typing import Callable, Sequence

from snapfusion import validation as v


def _named(parse: Callable, what: str) -> Callable:
    parse.__name__ = what  # argparse names a type by its __name__ in its own messages
    return parse


def integer(name: str, *, minimum: int | None = None, maximum: int | None = None) -> Callable[[str], int]:
    """An integer in [minimum, maximum]."""
    return _named(lambda text: v.check_int(v.parse_int(text, name=name), name=name, minimum=minimum,
                                           maximum=maximum), "integer")


def positive(name: str, *, maximum: int = v.MAX_COUNT) -> Callable[[str], int]:
    """An integer in [1, maximum]: counts, batch sizes, step counts."""
    return _named(lambda text: v.check_positive_int(v.parse_int(text, name=name), name=name, maximum=maximum),
                  "integer")


def non_negative(name: str, *, maximum: int = v.MAX_COUNT) -> Callable[[str], int]:
    """An integer in [0, maximum] (0 usually: none, or the default)."""
    return _named(lambda text: v.check_non_negative_int(v.parse_int(text, name=name), name=name, maximum=maximum),
                  "integer")


def at_least(name: str, minimum: int = 0) -> Callable[[str], int]:
    """An integer >= minimum (and at most MAX_COUNT), refused as "must be >= minimum": pool sizes and the like."""
    def parse(text: str) -> int:
        value = v.check_int(v.parse_int(text, name=name), name=name, minimum=minimum)
        return v.check_int(value, name=name, maximum=v.MAX_COUNT)
    return _named(parse, "integer")


def number(name: str, *, minimum: float | None = None, maximum: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Callable[[str], float]:
    """A finite number in [minimum, maximum] (``low_open`` / ``high_open`` exclude the bound)."""
    return _named(lambda text: v.check_float(v.parse_float(text, name=name), name=name, minimum=minimum,
                                             maximum=maximum, low_open=low_open, high_open=high_open), "number")


def probability(name: str) -> Callable[[str], float]:
    """A probability or a share: a number in [0, 1]."""
    return number(name, minimum=0.0, maximum=1.0)


def seed(name: str = "--seed") -> Callable[[str], int]:
    """A seed in [0, 2**64 - 1]."""
    return _named(lambda text: v.check_seed(v.parse_int(text, name=name), name=name), "integer")


def steps(name: str = "--steps") -> Callable[[str], int]:
    """Sampler steps, 1..MAX_STEPS."""
    return _named(lambda text: v.check_steps(v.parse_int(text, name=name), name=name), "integer")


def guidance(name: str = "--guidance") -> Callable[[str], float]:
    """A guidance scale, finite, in [0, MAX_GUIDANCE]."""
    return _named(lambda text: v.check_guidance(v.parse_float(text, name=name), name=name), "number")


def guidance_rescale(name: str = "--guidance-rescale") -> Callable[[str], float]:
    """A guidance rescale phi, finite, in [0, 1]."""
    return _named(lambda text: v.check_guidance_rescale(v.parse_float(text, name=name), name=name), "number")


def guidance_interval(name: str = "--guidance-interval") -> Callable[[str], tuple[float, float]]:
    """'START,END': the fractions of the sampling steps that mix guidance, 0 <= START < END <= 1."""
    return _named(lambda text: v.parse_guidance_interval(text, name=name), "interval")


def side(name: str, *, multiple: int = v.SIDE_MULTIPLE, zero: bool = False) -> Callable[[str], int]:
    """An image side: a positive multiple of ``multiple`` up to MAX_SIDE (``zero``: 0 too, meaning the default)."""
    def parse(text: str) -> int:
        value = v.parse_int(text, name=name)
        return 0 if zero and value == 0 else v.check_side(value, name=name, multiple=multiple)
    return _named(parse, "integer")


def num_images(name: str = "--num-images") -> Callable[[str], int]:
    """Images of one call: 1..MAX_IMAGES."""
    return _named(lambda text: v.check_num_images(v.parse_int(text, name=name), name=name), "integer")


def lr(name: str = "--lr") -> Callable[[str], float]:
    """A learning rate in (0, 1]."""
    return _named(lambda text: v.check_lr(v.parse_float(text, name=name), name=name), "number")


def guidance_sweep(name: str = "--guidance-sweep") -> Callable[[str], list[float]]:
    """'1,2,4,7.5' -> a list of guidance scales."""
    return _named(lambda text: v.parse_guidance_sweep(text, name=name), "list")


def opset(name: str = "--opset") -> Callable[[str], int]:
    """An ONNX opset MIN_OPSET..MAX_OPSET."""
    return _named(lambda text: v.check_opset(v.parse_int(text, name=name), name=name), "integer")


def bench_size(name: str = "--size") -> Callable[[str], int]:
    """A benchmark image side: a positive multiple of BENCH_MULTIPLE."""
    return _named(lambda text: v.check_bench_size(v.parse_int(text, name=name), name=name), "integer")


def prompt(name: str = "prompt", *, allow_empty: bool = True) -> Callable[[str], str]:
    """A prompt: UTF-8 text without NUL, at most MAX_PROMPT_CHARS characters."""
    return _named(lambda text: v.check_prompt(text, name=name, allow_empty=allow_empty), "text")


def output_image(name: str = "--out") -> Callable[[str], str]:
    """An image file to write (.png, .jpg, .jpeg or .webp) in a writable place."""
    return _named(lambda text: str(v.check_output_image(text, name=name)), "path")


def output_dir(name: str = "--out") -> Callable[[str], str]:
    """A folder to write into (created if missing)."""
    return _named(lambda text: str(v.check_output_dir(text, name=name)), "path")


def output_file(name: str, suffixes: Sequence[str] = ()) -> Callable[[str], str]:
    """A file to write (JSON, Markdown, safetensors), with one of ``suffixes`` if given."""
    return _named(lambda text: str(v.check_output_file(text, name=name, suffixes=tuple(suffixes))), "path")


def existing(name: str, *, folder: bool | None = None, marker: str | None = None) -> Callable[[str], str]:
    """An existing file or folder to read (``marker``: a file the folder must hold)."""
    return _named(lambda text: str(v.check_input_path(text, name=name, folder=folder, marker=marker)), "path")
