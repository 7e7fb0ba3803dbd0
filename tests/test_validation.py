"""The validators: property-based (hypothesis) checks that each returns a value in range or raises InputError with
one line naming the setting, never another exception; round trips and boundaries; output paths; image metadata."""

import math
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapfusion import validation as v
from snapfusion.errors import InputError

FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

anything = st.one_of(st.none(), st.booleans(), st.integers(), st.integers(min_value=-2**70, max_value=2**70),
                     st.floats(), st.text(), st.binary(), st.lists(st.integers(), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2), st.complex_numbers())

# (validator, the name its message must carry, the check a returned value must pass)
VALIDATORS = [
    (lambda x: v.check_seed(x), "seed", lambda r: r is None or 0 <= r <= v.MAX_SEED),
    (lambda x: v.check_steps(x), "steps", lambda r: r is None or 1 <= r <= v.MAX_STEPS),
    (lambda x: v.check_guidance(x), "guidance", lambda r: r is None or 0 <= r <= v.MAX_GUIDANCE),
    (lambda x: v.check_guidance_rescale(x), "guidance_rescale", lambda r: r is None or 0 <= r <= 1),
    (lambda x: v.check_guidance_interval(x), "guidance_interval", lambda r: r is None or 0 <= r[0] < r[1] <= 1),
    (lambda x: v.parse_guidance_interval(x), "--guidance-interval", lambda r: 0 <= r[0] < r[1] <= 1),
    (lambda x: v.check_side(x), "height", lambda r: r is None or (0 < r <= v.MAX_SIDE and r % 8 == 0)),
    (lambda x: v.check_num_images(x), "num_images", lambda r: 1 <= r <= v.MAX_IMAGES),
    (lambda x: v.check_sampler(x), "sampler", lambda r: r is None or r in v.SAMPLERS),
    (lambda x: v.check_prompt(x), "prompt", lambda r: isinstance(r, str) and len(r) <= v.MAX_PROMPT_CHARS),
    (lambda x: v.parse_size(x), "size", lambda r: all(0 < s <= v.MAX_SIDE and s % 8 == 0 for s in r)),
    (lambda x: v.check_positive_int(x, name="--batch-size", maximum=v.MAX_BATCH), "--batch-size",
     lambda r: 1 <= r <= v.MAX_BATCH),
    (lambda x: v.check_non_negative_int(x, name="--num-workers"), "--num-workers", lambda r: 0 <= r <= v.MAX_COUNT),
    (lambda x: v.check_lr(x), "--lr", lambda r: 0 < r <= 1 and math.isfinite(r)),
    (lambda x: v.check_ema_decay(x), "--ema-decay", lambda r: 0 <= r < 1),
    (lambda x: v.check_float(x, name="--mix-prob", minimum=0, maximum=1), "--mix-prob", lambda r: 0 <= r <= 1),
    (lambda x: v.parse_float(x, name="--min-psnr"), "--min-psnr", math.isfinite),
    (lambda x: v.parse_guidance_sweep(x), "--guidance-sweep",
     lambda r: 1 <= len(r) <= v.MAX_SWEEP and all(0 <= g <= v.MAX_GUIDANCE for g in r)),
    (lambda x: v.check_opset(x), "--opset", lambda r: v.MIN_OPSET <= r <= v.MAX_OPSET),
    (lambda x: v.check_bench_size(x), "--size", lambda r: 0 < r <= v.MAX_SIDE and r % 64 == 0),
]


def _one_line_naming(err: InputError, name: str) -> None:
    text = str(err)
    assert "\n" not in text and "\r" not in text, text
    assert name in text, f"{name!r} not in {text!r}"


@pytest.mark.parametrize("check,name,ok", VALIDATORS, ids=[n for _, n, _ in VALIDATORS])
@FAST
@given(value=anything)
def test_in_range_or_one_line_input_error(check, name, ok, value):
    try:
        result = check(value)
    except InputError as err:
        _one_line_naming(err, name)
    else:
        assert ok(result), result


@FAST
@given(st.integers(min_value=1, max_value=v.MAX_SIDE // 8), st.integers(min_value=1, max_value=v.MAX_SIDE // 8))
def test_parse_size_round_trip(w8, h8):
    assert v.parse_size(f"{w8 * 8}x{h8 * 8}") == (h8 * 8, w8 * 8)
    assert v.parse_size(f"{w8 * 8}") == (w8 * 8, w8 * 8)


@FAST
@given(st.lists(st.floats(min_value=0, max_value=100, allow_nan=False), min_size=1, max_size=v.MAX_SWEEP))
def test_guidance_sweep_round_trip(scales):
    assert v.parse_guidance_sweep(",".join(repr(s) for s in scales)) == scales


@FAST
@given(st.text(alphabet=st.characters(codec="utf-8", exclude_characters="\x00"), max_size=200))
def test_prompt_utf8_text_passes(text):
    assert v.check_prompt(text) == text


@FAST
@given(st.binary(min_size=1, max_size=40))
def test_prompt_from_argv_bytes(raw):
    """argv arrives decoded with surrogateescape: bytes that are not UTF-8 become U+DC80..U+DCFF."""
    text = raw.decode("utf-8", "surrogateescape")
    try:
        v.check_prompt(text)
    except InputError as err:
        _one_line_naming(err, "prompt")
        assert "\x00" in text or "not valid UTF-8" in str(err)
    else:
        assert raw.decode("utf-8") == text


def test_prompt_bad_byte_message():
    with pytest.raises(InputError, match=r"prompt is not valid UTF-8: byte 0xff at character 2"):
        v.check_prompt(b"a \xff cat".decode("utf-8", "surrogateescape"))


def test_boundaries():
    assert v.check_seed(2**64 - 1) == 2**64 - 1 and v.check_seed(0) == 0
    for bad in (2**64, -1, 1.0, True, "1", float("nan")):
        with pytest.raises(InputError, match="seed"):
            v.check_seed(bad)
    for bad in (float("nan"), float("inf"), -float("inf"), 100.0001, -0.5, 1e30):
        with pytest.raises(InputError, match="guidance"):
            v.check_guidance(bad)
    assert v.check_guidance(100) == 100.0 and v.check_guidance(0) == 0.0
    for name in ("--max-steps", "--checkpoint-every", "--log-every", "--batch-size"):
        with pytest.raises(InputError, match=f"{name} must be between 1"):
            v.check_positive_int(0, name=name)
    assert v.check_non_negative_int(0, name="--num-workers") == 0
    with pytest.raises(InputError, match="--num-workers must be between 0"):
        v.check_non_negative_int(-1, name="--num-workers")
    assert v.check_lr(1.0) == 1.0 and v.check_lr(1e-8) == 1e-8
    for bad in (0.0, -1e-4, 1.5, float("nan"), float("inf")):
        with pytest.raises(InputError, match="--lr"):
            v.check_lr(bad)
    assert v.check_ema_decay(0) == 0.0 and v.check_ema_decay(0.9999) == 0.9999
    for bad in (1.0, 5.0, -0.1, float("nan")):
        with pytest.raises(InputError, match="--ema-decay"):
            v.check_ema_decay(bad)
    assert v.check_opset(14) == 14 and v.check_opset(23) == 23
    for bad in (5, 13, 24):
        with pytest.raises(InputError, match="--opset must be between 14 and 23"):
            v.check_opset(bad)
    assert v.check_bench_size(512) == 512
    with pytest.raises(InputError, match="multiple of 64"):
        v.check_bench_size(100)


@pytest.mark.parametrize("text,message", [
    ("1,inf", "finite"), ("nan", "finite"), ("-1,2", "between 0 and 100"), ("1,,2", "comma-separated"),
    ("", "comma-separated"), ("1;2", "must be a number"), ("1e30", "between 0 and 100"),
    (",".join(["1"] * (v.MAX_SWEEP + 1)), "limit"),
])
def test_guidance_sweep_refusals(text, message):
    with pytest.raises(InputError, match=message) as err:
        v.parse_guidance_sweep(text)
    _one_line_naming(err.value, "--guidance-sweep")


def test_guidance_sweep_negative_through_argparse():
    """'--guidance-sweep=-1,2' reaches the parser (a bare '-1,2' would be taken for an option) and is refused."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("--guidance-sweep")
    text = p.parse_args(["--guidance-sweep=-1,2"]).guidance_sweep
    assert text == "-1,2"
    with pytest.raises(InputError, match="between 0 and 100, got -1"):
        v.parse_guidance_sweep(text)


def test_training_options():
    good = v.check_training(max_steps=10, batch_size=2, lr=1e-4, ema_decay=0.999, checkpoint_every=5, log_every=1,
                            num_workers=0)
    assert good["max_steps"] == 10 and good["ema_decay"] == 0.999
    bad = [("max_steps", 0, "--max-steps"), ("max_steps", -1, "--max-steps"), ("batch_size", 0, "--batch-size"),
           ("batch_size", 10**6, "--batch-size"), ("lr", float("nan"), "--lr"), ("ema_decay", 5.0, "--ema-decay"),
           ("checkpoint_every", 0, "--checkpoint-every"), ("log_every", 0, "--log-every"),
           ("num_workers", -1, "--num-workers"), ("max_minutes", float("inf"), "--max-minutes")]
    for key, value, name in bad:
        kw = dict(max_steps=10, batch_size=2, lr=1e-4, **{key: value}) if key not in ("max_steps", "batch_size", "lr") \
            else {**dict(max_steps=10, batch_size=2, lr=1e-4), key: value}
        with pytest.raises(InputError, match=name):
            v.check_training(**kw)


def test_output_image_paths(tmp_path):
    assert v.check_output_image(tmp_path / "a" / "b" / "x.PNG") == tmp_path / "a" / "b" / "x.PNG"
    for ext in (".png", ".jpg", ".jpeg", ".webp"):
        v.check_output_image(str(tmp_path / f"x{ext}"))
    (tmp_path / "dir.png").mkdir()
    (tmp_path / "file").write_text("")
    cases = [("", "empty"), ("  ", "empty"), (str(tmp_path / "x.xyz"), "extension '.xyz'"),
             (str(tmp_path / "noextension"), "no extension"), (str(tmp_path), "is a folder"),
             (str(tmp_path / "dir.png"), "is a folder"), (str(tmp_path / "file" / "x.png"), "is a file"),
             ("a\x00b.png", "NUL"), (None, "must be a path"), (3, "must be a path")]
    for value, message in cases:
        with pytest.raises(InputError, match=message) as err:
            v.check_output_image(value)
        _one_line_naming(err.value, "--out")
    assert not (tmp_path / "a").exists()  # checking creates nothing


def test_output_dir_paths(tmp_path):
    assert v.check_output_dir(tmp_path) == tmp_path
    assert v.check_output_dir(tmp_path / "new" / "deeper") == tmp_path / "new" / "deeper"
    (tmp_path / "file").write_text("")
    for value, message in [(tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "sub", "is a file"),
                           ("", "empty")]:
        with pytest.raises(InputError, match=message):
            v.check_output_dir(value)


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root may write anywhere")
def test_output_unwritable(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(InputError, match="no permission"):
        v.check_output_image(ro / "x.png")
    with pytest.raises(InputError, match="no permission"):
        v.check_output_dir(ro)


class _Tok:
    max_length = 77

    def is_truncated(self, text):
        return len(text.split()) > 75


def test_truncation_warning_for_prompt_and_negative_prompt():
    long = "word " * 200
    assert v.truncation_warning(_Tok(), "a cat") is None
    assert v.truncation_warning(_Tok(), long) == "the prompt is longer than CLIP's 75 tokens; the rest is dropped"
    assert v.truncation_warning(_Tok(), long, name="negative_prompt") == (
        "the negative prompt is longer than CLIP's 75 tokens; the rest is dropped")


def test_truncation_warning_with_the_real_tokenizer():
    from snapfusion.models.text import Tokenizer

    tok = Tokenizer()
    assert v.truncation_warning(tok, "a red apple", name="negative_prompt") is None
    assert "negative prompt is longer than CLIP's 75 tokens" in v.truncation_warning(tok, "apple " * 5_000,
                                                                                      name="negative_prompt")


def test_negative_prompt_recorded_only_when_used(tmp_path):
    from PIL import Image

    from snapfusion.images import image_metadata, read_metadata, save_image

    assert v.used_negative_prompt("blurry", 1.0) == "" and v.used_negative_prompt("blurry", 7.5) == "blurry"
    im = Image.new("RGB", (16, 16), "red")
    for ext in ("png", "jpg", "webp"):
        for guidance, recorded in ((1.0, ""), (7.5, "blurry")):
            meta = image_metadata(prompt="a cat ü", negative_prompt="blurry", seeds=[3], steps=4, guidance=guidance,
                                  sampler="ddim", model="tiny")
            path = save_image(im, tmp_path / f"g{guidance}.{ext}", meta)
            back = read_metadata(path)
            assert back == meta and back["negative_prompt"] == recorded and back["prompt"] == "a cat ü"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
