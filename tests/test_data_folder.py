"""Your own images: the image-caption folder (metadata.jsonl) and prompt files."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from snapfusion.data.folder import ImageCaptionFolder, collate_folder, load_image, read_metadata, read_prompts
from snapfusion.errors import InputError, WeightsError


def _folder(root, rows, sizes=None):
    root.mkdir(parents=True, exist_ok=True)
    for i, row in enumerate(rows):
        if "file_name" in row and not (root / row["file_name"]).exists():
            w, h = (sizes or {}).get(row["file_name"], (40 + 8 * i, 24))
            arr = np.zeros((h, w, 3), np.uint8)
            arr[:, : w // 2] = (255, 0, 0)  # left half red, right half blue
            arr[:, w // 2:] = (0, 0, 255)
            (root / row["file_name"]).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(arr).save(root / row["file_name"])
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_folder_items_are_resized_center_cropped_uint8(tmp_path):
    root = _folder(tmp_path / "d", [{"file_name": "a.png", "text": "a red thing"},
                                    {"file_name": "sub/b.jpg", "caption": "a blue thing"}],
                   sizes={"a.png": (64, 32), "sub/b.jpg": (30, 90)})
    ds = ImageCaptionFolder(root, size=16)
    assert len(ds) == 2 and ds.captions() == ["a red thing", "a blue thing"]
    item = ds[0]
    assert item["image"].dtype == torch.uint8 and item["image"].shape == (3, 16, 16)
    assert item["caption"] == "a red thing"
    img = item["image"].float()
    # 64x32 -> 32x16, center crop keeps x 8..24: left half red, right half blue
    assert img[0, :, :6].mean() > 200 and img[2, :, :6].mean() < 30 and img[2, :, -6:].mean() > 200
    assert ds[1]["image"].shape == (3, 16, 16)
    batch = collate_folder([ds[0], ds[1]])
    assert batch["image"].shape == (2, 3, 16, 16) and batch["caption"] == ["a red thing", "a blue thing"]


def test_load_image_modes(tmp_path):
    Image.new("L", (20, 10), 128).save(tmp_path / "g.png")
    Image.new("RGBA", (10, 20), (0, 255, 0, 10)).save(tmp_path / "c.png")
    assert load_image(tmp_path / "g.png", 8).shape == (3, 8, 8)
    assert load_image(tmp_path / "c.png", 8)[1].float().mean() > 250


@pytest.mark.parametrize("case,error,match", [
    ("no folder", WeightsError, "image folder not found"),
    ("no metadata", WeightsError, "no metadata.jsonl"),
    ("empty", InputError, "lists no images"),
    ("bad json", InputError, "line 2: not JSON"),
    ("no text", InputError, "line 1: needs a \"file_name\""),
    ("missing image", WeightsError, "line 1: image not found"),
    ("corrupt image", WeightsError, "corrupt image"),
    ("escape", InputError, "must be a path inside"),
])
def test_folder_errors_are_one_line(tmp_path, case, error, match):
    root = tmp_path / "d"
    if case != "no folder":
        root.mkdir()
    if case == "empty":
        (root / "metadata.jsonl").write_text("\n")
    elif case == "bad json":
        _folder(root, [{"file_name": "a.png", "text": "x"}])
        (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{oops\n')
    elif case == "no text":
        _folder(root, [{"file_name": "a.png", "label": 3}])
    elif case == "missing image":
        (root / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    elif case == "corrupt image":
        (root / "bad.png").write_bytes(b"not a png at all")
        (root / "metadata.jsonl").write_text('{"file_name": "bad.png", "text": "x"}\n')
    elif case == "escape":
        (tmp_path / "out.png").write_bytes(b"x")
        (root / "metadata.jsonl").write_text('{"file_name": "../out.png", "text": "x"}\n')
    with pytest.raises(error, match=match) as info:
        ImageCaptionFolder(root, size=16)
    assert "\n" not in str(info.value)


def test_truncated_image_fails_on_read_naming_the_file(tmp_path):
    root = _folder(tmp_path / "d", [{"file_name": "a.png", "text": "x"}], sizes={"a.png": (64, 64)})
    data = (root / "a.png").read_bytes()
    (root / "a.png").write_bytes(data[: len(data) // 2])
    try:
        ds = ImageCaptionFolder(root, size=16)  # the header may still read
    except WeightsError as err:
        assert "a.png" in str(err)
        return
    with pytest.raises(WeightsError, match="a.png"):
        ds[0]


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"text": "a cat"}\n{"prompt": "a dog"}\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    (tmp_path / "bad.jsonl").write_text('{"text": "a cat"}\n{"n": 1}\n')
    with pytest.raises(InputError, match="line 2"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n \n")
    with pytest.raises(InputError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(WeightsError, match="not found"):
        read_prompts(tmp_path / "nope.txt")
    root = _folder(tmp_path / "d", [{"file_name": "a.png", "text": "from a folder"}])
    assert read_prompts(root) == ["from a folder"] and read_metadata(root) == [("a.png", "from a folder")]
