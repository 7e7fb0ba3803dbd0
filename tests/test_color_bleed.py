"""scripts/color_bleed.py: the shipped base decoder keeps an object's color on a background of another color (an
earlier decoder brought a red square on blue back as (203, 94, 46) at 128 px; docs/base_model.md)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("color_bleed", ROOT / "scripts" / "color_bleed.py")
color_bleed = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(color_bleed)


def test_square_image_has_both_colors():
    x = color_bleed.image("red", "blue", 64)
    rgb = lambda px: ((px + 1) * 127.5).round().int().tolist()  # noqa: E731
    assert rgb(x[0, :, 32, 32]) == list(color_bleed.COLORS["red"])
    assert rgb(x[0, :, 2, 2]) == list(color_bleed.COLORS["blue"])
    assert (color_bleed.image("red", None, 16) == x[:, :, 32:33, 32:33]).all()  # flat: the square's color everywhere


def test_shipped_decoder_keeps_object_colors(tmp_path):
    out = tmp_path / "bleed.json"
    assert color_bleed.main(["--size", "128", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert len(report["cases"]) == len(color_bleed.CASES)
    for case in report["cases"]:
        (decoded,) = case["decoded_center"].values()
        worst = max(abs(a - b) for a, b in zip(decoded, case["rgb"]))
        assert worst <= 25, (case, decoded)


def test_bad_size_is_one_line(capsys):
    assert color_bleed.main(["--size", "12"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("color_bleed: error:") and err.count("\n") == 1
