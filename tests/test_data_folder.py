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


def test_the_training_stream_visits_every_image_once_per_pass_in_a_seeded_order(tmp_path):
    from snapfusion.train.data import FolderStream

    rows = [{"file_name": f"{i}.png", "text": f"image {i}"} for i in range(7)]
    folder = _folder(tmp_path / "f", rows)
    stream = FolderStream(str(folder), size=16, seed=3)
    passes = [[stream.caption(e * 7 + j) for j in range(7)] for e in range(3)]
    assert all(sorted(p) == sorted(r["text"] for r in rows) for p in passes)  # each image once per pass
    assert len({tuple(p) for p in passes}) == 3  # each pass in its own order
    assert [stream.caption(i) for i in range(7)] == passes[0]  # deterministic
    other = FolderStream(str(folder), size=16, seed=4)
    assert [other.caption(i) for i in range(7)] != passes[0]  # another seed, another order
    plain = FolderStream(str(folder), size=16)  # no seed: the folder's order (latent pools, held-out grids)
    assert [plain.caption(i) for i in range(9)] == [f"image {i % 7}" for i in range(9)]
    assert torch.equal(stream[0]["image"], plain[stream.index(0)]["image"])


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


# ---- --data FOLDER and --prompts FILE on the training stages ------------------------------------------------

def _scenes_folder(root, count=4, size=72):
    """``count`` PIL-made images (a colored disc on gray) with captions, in the imagefolder layout."""
    from PIL import ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    colors = [("red", (220, 30, 30)), ("blue", (30, 30, 220)), ("green", (30, 200, 30)), ("yellow", (230, 220, 40))]
    rows = []
    for i in range(count):
        name, rgb = colors[i % len(colors)]
        im = Image.new("RGB", (size + 8 * i, size), (128, 128, 128))
        ImageDraw.Draw(im).ellipse((10, 10, size - 10, size - 10), fill=rgb)
        im.save(root / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "text": f"a {name} disc on a gray background"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


LOOP_FLAGS = ["--max-steps", "2", "--batch-size", "2", "--num-workers", "0", "--sample-every", "0",
              "--mixed-precision", "no", "--warmup-steps", "0", "--ema-decay", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def unet_parts(tmp_path_factory):
    """A tiny autoencoder and a text tower as wide as the base UNet's context (train-unet trains the base UNet)."""
    from snapfusion.models.autoencoder import AutoencoderConfig, AutoencoderKL, save_autoencoder
    from snapfusion.models.presets import base_unet
    from snapfusion.models.text import TextEncoder, TextEncoderConfig, save_text_encoder

    root = tmp_path_factory.mktemp("parts")
    torch.manual_seed(0)
    save_autoencoder(root / "vae", AutoencoderKL(AutoencoderConfig.tiny()))
    width = base_unet().context_dim
    save_text_encoder(root / "text", TextEncoder(TextEncoderConfig(hidden_size=width, num_layers=1, num_heads=2,
                                                                   intermediate_size=2 * width, projection_dim=width)))
    return {"vae": str(root / "vae"), "text": str(root / "text")}


def _assert_checkpoint(run, folder):
    from snapfusion.train import state as ckpt_io

    ckpt = ckpt_io.latest_checkpoint(run)
    assert ckpt is not None and ckpt.name.endswith("2") and (ckpt / "model" / "config.json").is_file()
    assert json.loads((run / "run_config.json").read_text())["task"]["data_folder"] == str(folder)


def test_train_unet_trains_on_an_image_folder(tmp_path, unet_parts):
    from snapfusion.cli import main

    folder = _scenes_folder(tmp_path / "images")
    run = tmp_path / "run"
    assert main(["train-unet", "--run-dir", str(run), "--vae", unet_parts["vae"], "--text-encoder",
                 unet_parts["text"], "--image-size", "64", "--data", str(folder), *LOOP_FLAGS]) == 0
    _assert_checkpoint(run, folder)
    assert (run / "final" / "config.json").is_file()


def test_the_unet_data_reads_the_folders_images_and_captions(tmp_path, unet_parts):
    from snapfusion.models.presets import base_unet
    from snapfusion.train.data import epoch_order
    from snapfusion.train.unet import UNetTask, UNetTaskConfig

    folder = _scenes_folder(tmp_path / "images", count=3)
    for pool in (0, 2):  # rendered per batch, or a latent pool of the folder's first 2 images
        task = UNetTask(UNetTaskConfig(model=base_unet(), vae=unet_parts["vae"], text_encoder=unet_parts["text"],
                                       image_size=32, latent_pool=pool, pool_workers=0, data_folder=str(folder),
                                       uncond_prob=0.0))
        batch = task.collate([task.dataset()[i] for i in range(4)])
        folder_order = ["a red disc", "a blue disc", "a green disc"]
        n = pool or 3  # every pass visits each image (of the pool) once, in the pass's own seeded order
        want = [folder_order[epoch_order(n, task.cfg.seed, i // n)[i % n]] for i in range(4)]
        got = [c.split(" on ")[0] for c in batch["caption"]]
        assert got == want and sorted(got[:n]) == sorted(folder_order[:n])
        x0 = task.data.latents(batch, torch.Generator().manual_seed(0))
        assert x0.shape == (4, 4, 4, 4) and bool(torch.isfinite(x0).all())
        if not pool:
            channel = {"a red disc": 0, "a green disc": 1, "a blue disc": 2}[got[0]]  # the image matches its caption
            center = batch["image"][0, :, 16, 16].tolist()
            assert batch["image"].shape == (4, 3, 32, 32) and center[channel] > 190
            assert all(v < 100 for c, v in enumerate(center) if c != channel)


def test_distill_trains_on_an_image_folder(tmp_path, tiny_pipeline):
    from snapfusion.cli import main

    tiny_pipeline.save(tmp_path / "pipe", dtype=None)
    folder = _scenes_folder(tmp_path / "images")
    run = tmp_path / "run"
    assert main(["distill", "--run-dir", str(run), "--model", str(tmp_path / "pipe"), "--image-size", "64",
                 "--student-steps", "2", "--data", str(folder), *LOOP_FLAGS]) == 0
    _assert_checkpoint(run, folder)


@pytest.mark.parametrize("command", ["train-unet", "train-autoencoder", "train-text", "distill", "finetune-v",
                                     "robust-train"])
def test_a_bad_folder_is_one_line_and_exit_2_before_any_model_loads(tmp_path, unet_parts, command, capsys,
                                                                     monkeypatch):
    from snapfusion import cli
    from snapfusion.models.unet import UNet

    monkeypatch.setattr(UNet, "load", lambda *a, **k: pytest.fail("a model loaded before the folder was checked"))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metadata.jsonl").write_text('{"file_name": "missing.png", "text": "x"}\n')
    extra = {"train-unet": ["--vae", unet_parts["vae"], "--text-encoder", unet_parts["text"]],
             "robust-train": ["--init", str(tmp_path), "--vae", unet_parts["vae"], "--text-encoder",
                              unet_parts["text"]]}
    code = cli.main([command, "--run-dir", str(tmp_path / "r"), "--data", str(bad), *extra.get(command, [])])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "missing.png" in err and "\n" not in err


def test_decoder_stages_take_a_prompt_file(tmp_path, capsys):
    from snapfusion.cli import main
    from snapfusion.decoder.task import LatentSource, PromptStream

    (tmp_path / "p.txt").write_text("a cat\na dog\n")
    stream = PromptStream(LatentSource(prompts=str(tmp_path / "p.txt")), seed=5)
    assert [stream[n]["prompt"] for n in range(3)] == ["a cat", "a dog", "a cat"]
    folder = _scenes_folder(tmp_path / "images", count=2)
    stream = PromptStream(LatentSource(prompts=str(folder), pool=2), seed=5)
    assert stream[3]["prompt"] == "a blue disc on a gray background"
    (tmp_path / "empty.txt").write_text("\n")
    latents = ["decoder-latents", "--latent-pool", "2", "--out", str(tmp_path / "lat.safetensors")]
    distill = ["distill-decoder", "--run-dir", str(tmp_path / "r"), "--data", str(folder)]
    for args, message in ((latents + ["--prompts", str(tmp_path / "empty.txt")], "holds no prompts"),
                          (distill + ["--prompts", str(tmp_path / "p.txt")], "pass one")):
        code = main([*args, "--teacher", str(tmp_path / "never_loaded")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "\n" not in err and message in err


def test_layout_prior_targets_from_an_image_folder(tmp_path, capsys):
    from snapfusion.cli import main
    from snapfusion.models.autoencoder import AutoencoderConfig, AutoencoderKL
    from snapfusion.prior import block_means, build_targets

    torch.manual_seed(0)
    encoder = AutoencoderKL(AutoencoderConfig.tiny()).encoder.eval()
    folder = _scenes_folder(tmp_path / "images", count=3)
    with torch.no_grad():
        caps, means = build_targets(encoder, 100, tmp_path / "cache", size=32, calibrate=0, full_size=64,
                                    data_folder=str(folder), progress=lambda s: None)
        want = block_means(encoder, torch.stack([ImageCaptionFolder(folder, 64)[i]["image"] for i in range(3)]), 2, 32)
    assert caps == ImageCaptionFolder(folder, 64).captions()  # each image once, with its own caption
    torch.testing.assert_close(means, want)
    code = main(["train-prior", "--out", str(tmp_path / "p"), "--data", str(folder), "--model", str(tmp_path / "no")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "at least 10 images" in err and "\n" not in err
