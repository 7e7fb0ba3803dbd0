"""snapfusion compress: the whole recipe on a tiny teacher, its manifest, resumption in time-limited calls, --stages."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from snapfusion.cli import main
from snapfusion.compress import STAGE_NAMES, check, recipe_config, run_recipe
from snapfusion.compress.manifest import sha256_path
from snapfusion.decoder.io import load_decoder
from snapfusion.errors import InputError
from snapfusion.evolve.baselines import bk_sdm
from snapfusion.evolve.evolution import read_log
from snapfusion.evolve.latency import load_table
from snapfusion.models.unet import UNet
from snapfusion.pipeline import Pipeline
from snapfusion.prior import LayoutPrior
from snapfusion.weights import load_safetensors

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def teacher(tiny_pipeline, tmp_path_factory):
    folder = tmp_path_factory.mktemp("recipe") / "teacher"
    tiny_pipeline.save(folder, dtype=None)
    return folder


def _args(teacher, run_dir, *more):
    return ["compress", "--teacher", str(teacher), "--run-dir", str(run_dir), "--scale", "tiny", "--device", "cpu",
            *more]


@pytest.fixture(scope="module")
def run(teacher, tmp_path_factory):
    """The whole tiny recipe, run once in one call, at the tests' one torch thread (the tests compare other runs with
    it bit for bit, and a module-scoped fixture runs before the function-scoped ``one_thread``)."""
    run_dir = tmp_path_factory.mktemp("recipe") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(_args(teacher, run_dir)) == 0
    finally:
        torch.set_num_threads(threads)
    return run_dir


def _manifest(run_dir):
    return json.loads((run_dir / "manifest.json").read_text())


def _same_tensors(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _weights(folder):
    return load_safetensors(next(folder.glob("*.safetensors")))


@pytest.mark.slow
def test_every_stage_writes_an_output_that_loads(run, teacher):
    assert len(load_table(run / "bench-blocks/table.json")["blocks"]) > 0
    robust = UNet.load(run / "robust-train/final")
    teacher_unet = UNet.load(teacher / "unet")
    assert robust.config == teacher_unet.config
    steps = [r for r in read_log(run / "evolve") if r["type"] == "step"]
    assert len(steps) == 2 and all(r["latency_after_ms"] < r["latency_ms"] for r in steps)  # over budget: removals
    evolved = UNet.load(run / "evolve-apply/unet")
    assert evolved.config == UNet.load(run / "evolve/final").config != teacher_unet.config
    kd = UNet.load(run / "kd-finetune/final")  # fine-tuned with KD straight to v: no v-student stage
    assert kd.config.prediction_type == "v_prediction" and evolved.config.prediction_type == "epsilon"
    assert kd.config.down == evolved.config.down and not torch.equal(kd.conv_out.weight, evolved.conv_out.weight)
    assert not (run / "v-student").exists() and not (run / "distill-guidance").exists()
    assert UNet.load(run / "v-teacher/final").config.prediction_type == "v_prediction"
    student = UNet.load(run / "distill/final")
    assert student.config == kd.config
    assert student.config.prediction_type == "v_prediction" and student.config.down == evolved.config.down
    reduced = load_decoder(run / "reduce-decoder/decoder")
    teacher_widths = load_decoder(teacher / "vae_decoder").config.decoder_widths
    assert reduced.config.decoder_widths == tuple(w // 2 for w in teacher_widths)
    assert load_safetensors(run / "decoder-latents/latents.safetensors")["latents"].shape == (4, 4, 8, 8)
    assert load_decoder(run / "distill-decoder/final").config == reduced.config
    assert LayoutPrior.load(run / "train-prior/prior").config.context_dim == 32
    pipe = Pipeline.load(run / "assemble/pipeline")
    assert (pipe.config.steps, pipe.config.sampler, pipe.config.timestep_spacing) == (8, "ddim", "trailing")
    assert pipe.unet.config == student.config and pipe.prior is not None and pipe.decoder.config == reduced.config
    result = pipe("a red circle on a blue background", seed=0)
    assert result.images[0].size == (64, 64) and result.settings["steps"] == 8
    for name in ("student", "teacher"):
        report = json.loads((run / "eval" / name / "eval.json").read_text())
        assert report["num_images"] == 2 and 0 <= report["results"][0]["clip_score"] <= 100


@pytest.mark.slow
def test_manifest_has_every_stage_done_with_hashes_and_times(run, teacher):
    data = _manifest(run)
    assert list(data["stages"]) == [n for n in STAGE_NAMES if n not in ("v-student", "distill-guidance",
                                                                        "distill-half")]
    assert data["recipe"]["teacher"] == str(teacher) and data["recipe"]["scale"]["name"] == "tiny"
    assert json.loads((run / "recipe.json").read_text()) == data["recipe"]
    for name, entry in data["stages"].items():
        assert entry["status"] == "done", name
        assert entry["inputs"] and all(len(i["sha256"]) == 64 for i in entry["inputs"].values()), name
        assert entry["wall_s"] > 0 and entry["gpu_minutes"] == 0 and entry["device"] == "cpu", name
        assert entry["invocations"] == 1 and entry["metrics"] and entry["outputs"], name
    stages = data["stages"]
    assert stages["assemble"]["inputs"]["unet"]["sha256"] == sha256_path(run / "distill/final")
    assert stages["assemble"]["inputs"]["unet"]["sha256"] == stages["distill"]["outputs"]["unet"]["sha256"]
    assert stages["robust-train"]["metrics"]["step"] == 2
    assert stages["evolve-apply"]["metrics"]["latency_fraction"] < 1
    assert set(stages["eval"]["metrics"]) == {"student", "teacher"}


def _bench_only(src, dst):
    """A run folder holding only ``src``'s latency table, as if its first stage had run there (the table is a
    measurement: the rest of the chain is deterministic given it)."""
    shutil.copytree(src / "bench-blocks", dst / "bench-blocks")
    data = _manifest(src)
    entry = data["stages"]["bench-blocks"]
    entry["outputs"]["table"]["path"] = str(dst / "bench-blocks/table.json")
    (dst / "manifest.json").write_text(json.dumps({"recipe": data["recipe"], "stages": {"bench-blocks": entry}}))


@pytest.mark.slow
def test_time_limited_calls_resume_to_the_models_of_one_call(run, teacher, tmp_path):
    dst = tmp_path / "chunked"
    dst.mkdir()
    _bench_only(run, dst)
    config = recipe_config(str(teacher), str(dst), scale="tiny", device="cpu", max_minutes=0.001)
    results = []
    while not results or results[-1]["status"] != "done":
        results.append(run_recipe(config))
        assert len(results) < 60
    partial = [r for r in results if r["status"] == "partial"]
    assert partial and all(r["left"] for r in partial)
    stages = _manifest(dst)["stages"]
    assert all(e["status"] == "done" for e in stages.values())
    assert stages["robust-train"]["invocations"] == 2 and stages["evolve"]["invocations"] == 2  # 2 steps, 2 iterations
    assert len(results) >= len(stages)
    # resumed in chunks = one straight run, bit for bit
    for folder in ("evolve-apply/unet", "distill/final", "distill-decoder/final", "train-prior/prior"):
        _same_tensors(_weights(dst / folder), _weights(run / folder))


@pytest.mark.slow
def test_a_rerun_skips_done_stages_and_redoes_those_whose_inputs_changed(run, teacher, capsys):
    before = _manifest(run)["stages"]
    assert main(_args(teacher, run)) == 0
    out = capsys.readouterr().out
    assert "recipe config" in out and out.count("inputs unchanged: skipped") == len(before)
    assert _manifest(run)["stages"] == before
    # the prior made again from the same inputs is the same file: assemble, which reads it, stays done
    shutil.rmtree(run / "train-prior")
    assert main(_args(teacher, run, "--stages", "train-prior,assemble")) == 0
    out = capsys.readouterr().out
    assert "train-prior (" in out and "assemble: done, inputs unchanged: skipped" in out
    # another decoder in assemble's input: assemble runs again, from scratch
    shutil.rmtree(run / "distill-decoder/final")
    shutil.copytree(run / "reduce-decoder/decoder", run / "distill-decoder/final")
    assert main(_args(teacher, run, "--stages", "assemble")) == 0
    assert "assemble (the SnapFusion pipeline): fresh" in capsys.readouterr().out
    entry = _manifest(run)["stages"]["assemble"]
    assert entry["inputs"]["decoder"]["sha256"] == sha256_path(run / "reduce-decoder/decoder")


def test_stages_runs_only_the_named_stages(teacher, tmp_path, capsys):
    run_dir = tmp_path / "part"
    assert main(_args(teacher, run_dir, "--stages", "reduce-decoder, decoder-latents")) == 0
    assert list(_manifest(run_dir)["stages"]) == ["reduce-decoder", "decoder-latents"]
    assert sorted(p.name for p in run_dir.iterdir()) == [".manifest.lock", "decoder-latents", "manifest.json",
                                                         "recipe.json", "reduce-decoder"]
    assert main(_args(teacher, run_dir, "--stages", "distill-decoder")) == 0
    assert _manifest(run_dir)["stages"]["distill-decoder"]["status"] == "done"
    capsys.readouterr()
    assert main(_args(teacher, run_dir, "--stages", "assemble")) == 2  # its UNet and prior do not exist
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "stage assemble needs" in err and "include distill in --stages" in err


def test_a_failed_stage_is_recorded_and_the_next_call_redoes_it(teacher, tmp_path, monkeypatch, capsys):
    import snapfusion.decoder.reduce

    def broken(*args, **kwargs):
        raise RuntimeError("out of memory")

    run_dir = tmp_path / "failing"
    monkeypatch.setattr(snapfusion.decoder.reduce, "reduce_decoder", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        main(_args(teacher, run_dir, "--stages", "reduce-decoder"))
    entry = _manifest(run_dir)["stages"]["reduce-decoder"]
    assert entry["status"] == "failed" and entry["note"] == "RuntimeError: out of memory" and not entry["outputs"]
    monkeypatch.undo()
    assert main(_args(teacher, run_dir, "--stages", "reduce-decoder")) == 0
    assert "reduce-decoder (§3.2 decoder channel reduction): resume" in capsys.readouterr().out
    entry = _manifest(run_dir)["stages"]["reduce-decoder"]
    assert entry["status"] == "done" and entry["invocations"] == 2 and entry["outputs"]["decoder"]["sha256"]


def test_bad_options_are_one_line_errors_before_any_work(teacher, tmp_path, capsys):
    run_dir = tmp_path / "never"
    no_encoder = tmp_path / "no_encoder"
    shutil.copytree(teacher, no_encoder)
    shutil.rmtree(no_encoder / "vae_encoder")
    cases = [(["--stages", "evolve,bogus"], "unknown stage(s) bogus"),
             (["--latency-budget", "1.5"], "--latency-budget must be in (0, 1]"),
             (["--max-minutes", "-1"], "--max-minutes must be >= 0")]
    for extra, message in cases:
        assert main(_args(teacher, run_dir, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    for folder, message in ((tmp_path / "missing", "no snapfusion pipeline folder"), (no_encoder, "no vae_encoder/")):
        assert main(_args(folder, run_dir)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    with pytest.raises(InputError, match="--guidance-teacher 'teacher': unknown"):  # the API's own check
        check(recipe_config(str(teacher), str(run_dir), guidance_teacher="teacher"))
    with pytest.raises(InputError, match="--teacher-ratio 1: distill must reduce steps"):  # the CLI's minimum is 2
        check(recipe_config(str(teacher), str(run_dir), teacher_ratio=1))
    assert not run_dir.exists()


@pytest.mark.slow
def test_a_given_architecture_decoder_and_prior_and_a_frontier_student(run, teacher, tmp_path, capsys):
    """--architecture LOG replays an evolution found earlier (no robust training, no search); --decoder and --prior
    reuse parts; --ship distill-half assembles the n/2-step student; two processes with disjoint --stages share one
    run folder and its manifest."""
    import os
    import subprocess
    import sys

    log = run / "evolve/evolve.jsonl"
    run_dir = tmp_path / "given"
    given = ["--architecture", str(log), "--decoder", str(run / "distill-decoder/final"), "--prior",
             str(run / "train-prior/prior")]
    base = [sys.executable, "-m", "snapfusion.cli", *_args(teacher, run_dir, *given)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    first = subprocess.Popen([*base, "--stages", "bench-blocks,evolve,evolve-apply,kd-finetune"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    second = subprocess.run([*base, "--stages", "v-teacher"], env=env, capture_output=True, text=True, timeout=600)
    out = first.communicate(timeout=600)[0]
    assert first.returncode == 0 and second.returncode == 0, out[-2000:] + second.stderr[-2000:]
    stages = _manifest(run_dir)["stages"]
    assert set(stages) == {"bench-blocks", "evolve", "evolve-apply", "kd-finetune", "v-teacher"}  # none lost
    assert stages["evolve"]["metrics"]["rule"] == "given log" and stages["evolve"]["inputs"]["log"]["path"] == str(log)
    assert UNet.load(run_dir / "evolve-apply/unet").config == UNet.load(run / "evolve-apply/unet").config
    assert not (run_dir / "robust-train").exists()
    assert main(_args(teacher, run_dir, *given, "--ship", "distill-half")) == 0
    out = capsys.readouterr().out
    ran = set(_manifest(run_dir)["stages"])
    assert ran == {"bench-blocks", "evolve", "evolve-apply", "kd-finetune", "v-teacher", "distill", "distill-half",
                   "assemble", "eval"}, ran
    assert out.count("inputs unchanged: skipped") == 5
    pipe = Pipeline.load(run_dir / "assemble/pipeline")
    assert pipe.config.steps == 4 and pipe.decoder.config == load_decoder(run / "distill-decoder/final").config
    _same_tensors(pipe.prior.state_dict(), LayoutPrior.load(run / "train-prior/prior").state_dict())
    half = json.loads((run_dir / "distill-half/run_config.json").read_text())
    assert half["task"]["student_steps"] == 4 and half["task"]["source"]["teacher_unet"].endswith("distill/final")
    # the guidance-embedded student: assembled in place of the halved one, one UNet call per step
    assert main(_args(teacher, run_dir, *given, "--ship", "distill-guidance")) == 0
    capsys.readouterr()
    pipe = Pipeline.load(run_dir / "assemble/pipeline")
    assert pipe.unet.config.guidance_embed and pipe.config.steps == 8
    assert pipe("a red circle on a blue background", seed=0).images[0].size == (64, 64)
    stages = _manifest(run_dir)["stages"]
    assert stages["assemble"]["inputs"]["unet"]["path"].endswith("distill-guidance/final")
    assert stages["eval"]["metrics"]["student"]["steps"] == 8
    # the preset's teacher: the two-call student, its one-call copy, one guided step per step
    task = json.loads((run_dir / "distill-guidance/run_config.json").read_text())["task"]
    assert task["source"]["teacher_unet"].endswith("distill/final") and task["teacher_ratio"] == 1
    assert task["teacher_grid"] == task["student_grid"] and task["guidance_embed"]
    stage = stages["distill-guidance"]
    assert stage["inputs"]["teacher_unet"]["path"].endswith("distill/final")
    assert (stage["settings"]["guidance_teacher"], stage["settings"]["teacher_ratio"]) == ("student", 1)
    # the v teacher's --teacher-ratio guided steps instead: the stage reruns afresh
    assert main(_args(teacher, run_dir, *given, "--ship", "distill-guidance", "--guidance-teacher", "v-teacher",
                      "--stages", "distill-guidance")) == 0
    assert "not in the paper)): fresh" in capsys.readouterr().out
    task = json.loads((run_dir / "distill-guidance/run_config.json").read_text())["task"]
    assert task["source"]["teacher_unet"].endswith("v-teacher/final") and task["teacher_ratio"] == 4
    settings = _manifest(run_dir)["stages"]["distill-guidance"]["settings"]
    assert settings["teacher_ratio"] == 4 and "guidance_teacher" not in settings  # as run folders from before it
    for extra, message in ((["--architecture", str(tmp_path / "nope.jsonl")], "no such evolution log"),
                           (["--decoder", str(tmp_path)], "no config.json there"),
                           (["--ship", "bogus"], "invalid choice"),
                           (["--guidance-teacher", "teacher"], "invalid choice")):
        assert main(_args(teacher, tmp_path / "never", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.slow
def test_a_log_cut_at_another_budget_and_a_shared_v_teacher(run, teacher, tmp_path, capsys):
    """--architecture LOG at a larger --latency-budget replays the log only as far as that search would have gone;
    --v-teacher reuses another run's v teacher (runs at several budgets share one), leaving out the v-teacher stage;
    a budget the log never reaches, a missing or eps-predicting v teacher are one-line errors before any work."""
    from snapfusion.evolve.evolution import replay, within_budget

    log = run / "evolve/evolve.jsonl"
    run_dir, v = tmp_path / "cut", run / "v-teacher/final"
    given = ["--architecture", str(log), "--latency-budget", "1.0", "--v-teacher", str(v)]
    stages = "bench-blocks,evolve,evolve-apply,kd-finetune,distill"
    assert main(_args(teacher, run_dir, *given, "--stages", stages)) == 0
    capsys.readouterr()
    want, _ = replay(within_budget(read_log(log), 1.0), UNet.load(teacher / "unet"))
    assert UNet.load(run_dir / "evolve-apply/unet").config == want.config
    assert read_log(run_dir / "evolve") == within_budget(read_log(log), 1.0)
    stages = _manifest(run_dir)["stages"]
    assert "v-teacher" not in stages and stages["evolve"]["metrics"]["iterations"] == 1
    assert stages["distill"]["inputs"]["teacher_unet"]["path"] == str(v)
    assert json.loads((run_dir / "distill/run_config.json").read_text())["task"]["source"]["teacher_unet"] == str(v)
    assert json.loads((run_dir / "distill/run_config.json").read_text())["task"]["teacher_ratio"] == 4  # the preset's
    assert main(_args(teacher, run_dir, *given, "--stages", "distill", "--teacher-ratio", "2")) == 0
    assert "CFG-aware)): fresh" in capsys.readouterr().out  # the settings changed: the stage starts afresh
    task = json.loads((run_dir / "distill/run_config.json").read_text())["task"]
    assert task["teacher_ratio"] == 2 and len(task["teacher_grid"]) == 2 * 8 + 1
    assert _manifest(run_dir)["stages"]["distill"]["settings"]["teacher_ratio"] == 2
    for extra, message in ((["--architecture", str(log), "--latency-budget", "0.01"], "above --latency-budget 0.01"),
                           (["--v-teacher", str(tmp_path)], "no config.json there"),
                           (["--v-teacher", str(tmp_path / "none")], "stage distill needs"),
                           (["--v-teacher", str(teacher / "unet")], "predicts epsilon, not v")):
        assert main(_args(teacher, tmp_path / "never", *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not (tmp_path / "never").exists()


@pytest.mark.slow
def test_two_processes_train_together_and_evolve_in_the_main_one(teacher, tmp_path):
    """As under ``accelerate launch``: torchrun with two CPU processes (gloo)."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "snapfusion.cli",
           *_args(teacher, run_dir, "--stages", "bench-blocks,robust-train,evolve")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert out.count("recipe config") == 1  # the main process alone reports
    assert "parameters; 2 process(es)" in out  # robust training: both processes
    assert "parameters; 1 process(es)" in out  # evolution's training chunks: the main process's child alone
    stages = _manifest(run_dir)["stages"]
    assert list(stages) == ["bench-blocks", "robust-train", "evolve"]
    assert all(e["status"] == "done" and e["processes"] == 2 for e in stages.values())
    assert (run_dir / "evolve" / "final" / "config.json").is_file()


def _image_folder(root, n=12):
    """A small image-caption folder (images + metadata.jsonl) of colored patches."""
    root.mkdir(parents=True)
    colors = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 200, 30)}
    rows = []
    for i in range(n):
        name, rgb = list(colors.items())[i % 3]
        arr = np.full((40, 48, 3), rgb, np.uint8)
        arr[8 + i: 24 + i, 10:30] = 255
        Image.fromarray(arr).save(root / f"img{i}.png")
        rows.append({"file_name": f"img{i}.png", "text": f"a white patch on {name} number {i}"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.mark.slow
def test_the_recipe_on_your_own_images(teacher, tmp_path, capsys):
    data = _image_folder(tmp_path / "mine")
    run_dir = tmp_path / "own"
    assert main(_args(teacher, run_dir, "--data", str(data), "--architecture", "bk-sdm")) == 0
    stages = _manifest(run_dir)["stages"]
    assert list(stages) == [n for n in STAGE_NAMES if n not in ("v-student", "distill-guidance", "distill-half")]
    assert all(e["status"] == "done" for e in stages.values())
    digest = sha256_path(data / "metadata.jsonl")
    for name in ("robust-train", "evolve", "kd-finetune", "v-teacher", "distill", "train-prior", "eval"):
        assert stages[name]["inputs"]["data"]["sha256"] == digest, name
    for name in ("decoder-latents", "distill-decoder"):  # their prompts: the folder's captions
        assert stages[name]["inputs"]["prompts"]["sha256"] == digest, name
    assert _manifest(run_dir)["recipe"]["data_folder"] == str(data)
    for name in ("robust-train", "kd-finetune", "v-teacher", "distill"):
        assert json.dumps(str(data)) in (run_dir / name / "run_config.json").read_text(), name  # trained on it
    # the architecture: BK-SDM's fixed rule, replayed on the teacher's weights
    assert stages["evolve"]["metrics"]["rule"] == "bk-sdm" and stages["evolve"]["metrics"]["removed"] == 14
    teacher_unet = UNet.load(teacher / "unet")
    assert UNet.load(run_dir / "evolve-apply/unet").config == bk_sdm(teacher_unet.config)[0]
    # the prior's targets are the folder's images
    cache = json.loads((run_dir / "train-prior/cache/manifest.json").read_text())
    assert cache["data_folder"] == str(data.resolve())
    # the evaluation: no scene metric, image statistics and agreement with the teacher, said so in the manifest
    metrics = stages["eval"]["metrics"]
    assert "scene metrics" in metrics["evaluation"] and "scene metrics skipped" in stages["eval"]["note"]
    assert metrics["student"]["images"] == 2 and metrics["student"]["finite"] and metrics["teacher"]["steps"] == 2
    assert "clip_score" not in metrics["student"] and metrics["student_vs_teacher"]["psnr_db"] > 0
    assert len(list((run_dir / "eval/student").glob("*.png"))) == 2
    report = json.loads((run_dir / "eval/own_data.json").read_text())
    assert report["prompts"][:2] == ["a white patch on red number 0", "a white patch on blue number 1"]
    pipe = Pipeline.load(run_dir / "assemble/pipeline")
    result = pipe("a white patch on green", seed=0)
    assert result.images[0].size == (64, 64) and np.asarray(result.images[0]).std() > 0
    # another data set: the stages that read it start again
    with (data / "metadata.jsonl").open("a") as f:
        f.write(json.dumps({"file_name": "img0.png", "text": "a white patch again"}) + "\n")
    capsys.readouterr()
    assert main(_args(teacher, run_dir, "--data", str(data), "--architecture", "bk-sdm", "--stages",
                      "reduce-decoder,train-prior")) == 0
    out = capsys.readouterr().out
    assert "reduce-decoder: done, inputs unchanged: skipped" in out and "train-prior (layout prior" in out
    assert "): fresh" in out and _manifest(run_dir)["stages"]["train-prior"]["inputs"]["data"]["sha256"] != digest


def test_bad_data_options_are_one_line_errors_before_any_work(teacher, tmp_path, capsys):
    run_dir = tmp_path / "never"
    good = _image_folder(tmp_path / "good")
    broken = _image_folder(tmp_path / "broken")
    (broken / "img3.png").unlink()
    few = _image_folder(tmp_path / "few", n=4)
    bk = ["--architecture", "bk-sdm"]
    cases = [(["--data", str(tmp_path / "nowhere"), *bk], "image folder not found"),
             (["--data", str(broken), *bk], "line 4: image not found"),
             (["--data", str(good)], "--architecture bk-sdm"),
             (["--data", str(few), *bk], "the layout prior needs at least 10 images"),
             (["--prompts", str(tmp_path / "none.txt")], "prompt file not found")]
    for extra, message in cases:
        assert main(_args(teacher, run_dir, *extra)) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, err
    assert not run_dir.exists()
