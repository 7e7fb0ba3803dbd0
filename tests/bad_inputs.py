"""The bad-input corpus: command lines a user may type wrong, each with a piece of the one-line error it must give.

Every case must end with exit status 2 and one line on stderr starting "snapfusion: error:" (no traceback), leave no
file behind, and (unless ``loads``) fail before any model loads or any work starts. ``{tmp}`` is the test's scratch
folder, holding the fixtures made by ``tests/test_bad_inputs.py``: ``dir/`` (an existing folder), ``file.txt``,
``bad.safetensors`` (garbage), ``trunc.safetensors`` (a header cut short), ``bad.json`` (malformed),
``badmodel/`` (a folder with a malformed model_index.json), ``empty/`` (an empty folder) and ``bad.jsonl``.
"""

from __future__ import annotations

from typing import NamedTuple


class Case(NamedTuple):
    id: str
    argv: list[str]
    expect: str            # a piece of the one-line message (case-insensitive)
    loads: bool = False    # True: the error comes from reading the named file, so loading it is allowed


NOT_UTF8 = b"a red \xff\xfe apple".decode("utf-8", "surrogateescape")  # argv bytes that are not UTF-8
P = "a red apple left of a cat"


def _generate() -> list[Case]:
    g = ["generate", P, "--out", "{tmp}/out.png"]
    rows = [
        # from the report: tracebacks
        ("not-utf8-prompt", ["generate", NOT_UTF8, "--out", "{tmp}/out.png"], "UTF-8"),
        ("seed-2**64", g + ["--seed", "18446744073709551616"], "--seed"),
        ("batch-10000", g + ["--batch", "10000"], "--num-images"),
        ("out-xyz", ["generate", P, "--out", "{tmp}/x.xyz"], "--out"),
        ("out-noextension", ["generate", P, "--out", "{tmp}/noextension"], "--out"),
        ("out-empty", ["generate", P, "--out", ""], "--out"),
        ("out-existing-dir", ["generate", P, "--out", "{tmp}/dir"], "--out"),
        # surprises
        ("guidance-1e30", g + ["--guidance", "1e30"], "--guidance"),
        ("negative-32000", g + ["--negative-prompt", "x" * 32_000], "negative"),
        # late messages and more
        ("steps-0", g + ["--steps", "0"], "--steps"),
        ("steps-negative", g + ["--steps=-3"], "--steps"),
        ("steps-huge", g + ["--steps", "100000"], "--steps"),
        ("steps-text", g + ["--steps", "many"], "--steps"),
        ("guidance-nan", g + ["--guidance", "nan"], "--guidance"),
        ("guidance-inf", g + ["--guidance", "inf"], "--guidance"),
        ("guidance-negative", g + ["--guidance=-2"], "--guidance"),
        ("guidance-text", g + ["--guidance", "high"], "--guidance"),
        ("guidance-rescale-above-1", g + ["--guidance-rescale", "1.5"], "--guidance-rescale"),
        ("guidance-rescale-negative", g + ["--guidance-rescale=-0.1"], "--guidance-rescale"),
        ("guidance-rescale-nan", g + ["--guidance-rescale", "nan"], "--guidance-rescale"),
        ("guidance-rescale-text", g + ["--guidance-rescale", "strong"], "--guidance-rescale"),
        ("guidance-interval-one-number", g + ["--guidance-interval", "0.5"], "--guidance-interval"),
        ("guidance-interval-reversed", g + ["--guidance-interval", "0.6,0.2"], "--guidance-interval"),
        ("guidance-interval-above-1", g + ["--guidance-interval", "0,1.5"], "--guidance-interval"),
        ("guidance-interval-nan", g + ["--guidance-interval", "nan,1"], "--guidance-interval"),
        ("guidance-interval-text", g + ["--guidance-interval", "early"], "--guidance-interval"),
        ("size-0", g + ["--size", "0"], "--size"),
        ("size-100", g + ["--size", "100"], "--size"),
        ("size-huge", g + ["--size", "100000"], "--size"),
        ("size-negative", g + ["--size=-512"], "--size"),
        ("height-7", g + ["--height", "7"], "--height"),
        ("width-1000", g + ["--width", "1000"], "--width"),
        ("width-text", g + ["--width", "wide"], "--width"),
        ("seed-negative", g + ["--seed=-1"], "--seed"),
        ("seed-text", g + ["--seed", "abc"], "--seed"),
        ("seed-float", g + ["--seed", "1.5"], "--seed"),
        ("num-images-0", g + ["--num-images", "0"], "--num-images"),
        ("num-images-negative", g + ["--num-images=-1"], "--num-images"),
        ("empty-prompt", ["generate", "", "--out", "{tmp}/out.png"], "prompt"),
        ("blank-prompt", ["generate", "   ", "--out", "{tmp}/out.png"], "prompt"),
        ("nul-prompt", ["generate", "a\x00b", "--out", "{tmp}/out.png"], "prompt"),
        ("huge-prompt", ["generate", "y" * 30_000, "--out", "{tmp}/out.png"], "prompt"),
        ("not-utf8-negative", g + ["--negative-prompt", NOT_UTF8], "UTF-8"),
        ("sampler-unknown", g + ["--sampler", "euler"], "--sampler"),
        ("dtype-unknown", g + ["--dtype", "int4"], "--dtype"),
        ("device-unknown", g + ["--device", "tpu"], "--device"),
        ("backend-unknown", g + ["--backend", "tensorrt"], "--backend"),
        ("out-in-file", ["generate", P, "--out", "{tmp}/file.txt/x.png"], "--out"),
        ("out-nul", ["generate", P, "--out", "{tmp}/a\x00.png"], "--out"),
        ("out-trailing-slash", ["generate", P, "--out", "{tmp}/newdir/"], "--out"),
        ("model-missing", g + ["--model", "{tmp}/nomodel"], "nomodel"),
        ("decoder-missing", g + ["--decoder", "{tmp}/nodecoder"], "nodecoder"),
        ("onnx-with-decoder", g + ["--backend", "onnxruntime", "--decoder", "half"], "--decoder"),
        ("unknown-option", g + ["--guidence", "3"], "--guidence"),
        ("missing-prompt", ["generate"], "prompt"),
    ]
    loads = [
        ("model-garbage-weights", g + ["--model", "{tmp}/bad.safetensors"], "bad.safetensors"),
        ("model-truncated-weights", g + ["--model", "{tmp}/trunc.safetensors"], "trunc.safetensors"),
        ("model-bad-index", g + ["--model", "{tmp}/badmodel"], "badmodel"),
        ("model-empty-folder", g + ["--model", "{tmp}/empty"], "empty"),
        # the default model embeds the guidance scale: known once its config is read, refused before any image
        ("negative-with-guidance-embedded-default", g + ["--negative-prompt", "a dog"], "negative prompt"),
        ("rescale-with-guidance-embedded-default", g + ["--guidance-rescale", "0.7"], "guidance rescale"),
        ("interval-with-guidance-embedded-default", g + ["--guidance-interval", "0,0.5"], "guidance interval"),
    ]
    return ([Case(f"generate/{i}", a, e) for i, a, e in rows]
            + [Case(f"generate/{i}", a, e, loads=True) for i, a, e in loads])


def _eval() -> list[Case]:
    e = ["eval", "--out", "{tmp}/ev"]
    rows = [
        ("steps-0", e + ["--steps", "0"], "--steps"),
        ("steps-negative", e + ["--steps=-1"], "--steps"),
        ("guidance-1e30", e + ["--guidance", "1e30"], "--guidance"),
        ("guidance-nan", e + ["--guidance", "nan"], "--guidance"),
        ("guidance-rescale-2", e + ["--guidance-rescale", "2"], "--guidance-rescale"),
        ("guidance-interval-empty", e + ["--guidance-interval", "0,"], "--guidance-interval"),
        ("guidance-interval-three", e + ["--guidance-interval", "0,0.5,1"], "--guidance-interval"),
        ("sweep-inf", e + ["--guidance-sweep", "1,inf"], "--guidance-sweep"),
        ("sweep-nan", e + ["--guidance-sweep", "nan,2"], "--guidance-sweep"),
        ("sweep-negative", e + ["--guidance-sweep=-1,2"], "--guidance-sweep"),
        ("sweep-empty-item", e + ["--guidance-sweep", "1,,2"], "--guidance-sweep"),
        ("sweep-text", e + ["--guidance-sweep", "low,high"], "--guidance-sweep"),
        ("sweep-huge", e + ["--guidance-sweep", "1,1000"], "--guidance-sweep"),
        ("sweep-empty", e + ["--guidance-sweep", ""], "--guidance-sweep"),
        ("size-100", e + ["--size", "100"], "--size"),
        ("size-0", e + ["--size", "0"], "--size"),
        ("num-images-1", e + ["--num-images", "1"], "--num-images"),
        ("num-images-0", e + ["--num-images", "0"], "--num-images"),
        ("seeds-per-prompt-0", e + ["--seeds-per-prompt", "0"], "--seeds-per-prompt"),
        ("batch-size-0", e + ["--batch-size", "0"], "--batch-size"),
        ("batch-size-huge", e + ["--batch-size", "100000"], "--batch-size"),
        ("num-emoji-0", e + ["--num-emoji", "0"], "--num-emoji"),
        ("out-is-file", ["eval", "--out", "{tmp}/file.txt"], "--out"),
        ("out-empty", ["eval", "--out", ""], "--out"),
        ("prompts-unknown-set", e + ["--prompts", "nosuchset"], "--prompts"),
        ("prompts-missing-file", e + ["--prompts", "{tmp}/missing.jsonl"], "missing.jsonl"),
        ("prompts-bad-jsonl", e + ["--prompts", "{tmp}/bad.jsonl"], "bad.jsonl"),
        ("sampler-unknown", e + ["--sampler", "euler"], "--sampler"),
        ("unet-missing", e + ["--unet", "{tmp}/nounet"], "nounet"),
        ("dtype-unknown", e + ["--dtype", "fp8"], "--dtype"),
    ]
    loads = [  # the default model embeds the guidance scale: known once its config is read, refused before any image
        ("rescale-with-guidance-embedded-default", e + ["--guidance-rescale", "0.7"], "guidance rescale"),
        ("interval-with-guidance-embedded-default", e + ["--guidance-interval", "0,0.5"], "guidance interval"),
    ]
    return [Case(f"eval/{i}", a, x) for i, a, x in rows] + [Case(f"eval/{i}", a, x, loads=True) for i, a, x in loads]


def _export_bench() -> list[Case]:
    x = ["export", "--out", "{tmp}/onnx"]
    b = ["bench", "--preset", "tiny", "--json", "{tmp}/bench.json"]
    rows = [
        ("export/opset-5", x + ["--opset", "5"], "--opset"),
        ("export/opset-99", x + ["--opset", "99"], "--opset"),
        ("export/opset-text", x + ["--opset", "latest"], "--opset"),
        ("export/format-unknown", x + ["--format", "tflite"], "--format"),
        ("export/precision-unknown", x + ["--precision", "int4"], "--precision"),
        ("export/batch-0", x + ["--batch", "0"], "--batch"),
        ("export/size-100", x + ["--size", "100"], "--size"),
        ("export/size-negative", x + ["--size=-64"], "--size"),
        ("export/parity-steps-negative", x + ["--parity-steps=-1"], "--parity-steps"),
        ("export/min-psnr-nan", x + ["--min-psnr", "nan"], "--min-psnr"),
        ("export/max-rel-diff-negative", x + ["--max-rel-diff=-1"], "--max-rel-diff"),
        ("export/out-is-file", ["export", "--out", "{tmp}/file.txt"], "--out"),
        ("export/out-empty", ["export", "--out", ""], "--out"),
        ("export/out-missing", ["export"], "--out"),
        ("export/model-missing", x + ["--model", "{tmp}/nomodel"], "nomodel"),
        ("bench/size-100", b + ["--size", "100"], "--size"),
        ("bench/size-0", b + ["--size", "0"], "--size"),
        ("bench/size-huge", b + ["--size", "65536"], "--size"),
        ("bench/steps-0", b + ["--steps", "0"], "--steps"),
        ("bench/guidance-inf", b + ["--guidance", "inf"], "--guidance"),
        ("bench/guidance-1e30", b + ["--guidance", "1e30"], "--guidance"),
        ("bench/runs-0", b + ["--runs", "0"], "--runs"),
        ("bench/warmup-negative", b + ["--warmup=-1"], "--warmup"),
        ("bench/preset-unknown", ["bench", "--preset", "huge"], "--preset"),
        ("bench/json-is-dir", ["bench", "--preset", "tiny", "--json", "{tmp}/dir"], "--json"),
        ("bench/markdown-in-file", ["bench", "--preset", "tiny", "--markdown", "{tmp}/file.txt/t.md"], "--markdown"),
        ("bench/device-unknown", b + ["--device", "tpu"], "--device"),
        ("bench/backend-onnx-no-model", ["bench", "--backend", "onnxruntime"], "--model"),
        ("bench-blocks/repeats-0", ["bench-blocks", "--preset", "tiny_sd15", "--out", "{tmp}/t.json", "--repeats", "0"],
         "--repeats"),
        ("bench-blocks/size-100", ["bench-blocks", "--preset", "tiny_sd15", "--out", "{tmp}/t.json", "--size", "100"],
         "--size"),
        ("bench-blocks/out-is-dir", ["bench-blocks", "--preset", "tiny_sd15", "--out", "{tmp}/dir"], "--out"),
    ]
    return [Case(i, a, e) for i, a, e in rows]


def _convert_assemble_prior() -> list[Case]:
    rows = [
        ("convert-sd/missing", ["convert-sd", "{tmp}/nosd", "--out", "{tmp}/sd"], "nosd", True),
        ("convert-sd/garbage", ["convert-sd", "{tmp}/bad.safetensors", "--out", "{tmp}/sd"], "bad.safetensors", True),
        ("convert-sd/truncated", ["convert-sd", "{tmp}/trunc.safetensors", "--out", "{tmp}/sd"], "trunc.safetensors",
         True),
        ("convert-sd/empty-folder", ["convert-sd", "{tmp}/empty", "--out", "{tmp}/sd"], "empty", True),
        ("convert-sd/out-is-file", ["convert-sd", "{tmp}/bad.safetensors", "--out", "{tmp}/file.txt"], "--out", False),
        ("convert-sd/out-empty", ["convert-sd", "{tmp}/bad.safetensors", "--out", ""], "--out", False),
        ("assemble/missing-parts", ["assemble", "--text-encoder", "{tmp}/a", "--vae", "{tmp}/b", "--unet", "{tmp}/c",
                                    "--out", "{tmp}/pipe"], "{tmp}/", True),
        ("assemble/clip-skip-negative", ["assemble", "--text-encoder", "{tmp}/empty", "--vae", "{tmp}/empty", "--unet",
                                         "{tmp}/empty", "--out", "{tmp}/pipe", "--clip-skip=-1"], "--clip-skip", False),
        ("assemble/out-is-file", ["assemble", "--text-encoder", "{tmp}/empty", "--vae", "{tmp}/empty", "--unet",
                                  "{tmp}/empty", "--out", "{tmp}/file.txt"], "--out", False),
        ("train-prior/scenes-0", ["train-prior", "--out", "{tmp}/prior", "--cache", "{tmp}/cache", "--scenes", "0"],
         "--scenes", False),
        ("train-prior/steps-0", ["train-prior", "--out", "{tmp}/prior", "--cache", "{tmp}/cache", "--steps", "0"],
         "--steps", False),
        ("train-prior/lr-nan", ["train-prior", "--out", "{tmp}/prior", "--cache", "{tmp}/cache", "--lr", "nan"],
         "--lr", False),
        ("train-prior/grid-0", ["train-prior", "--out", "{tmp}/prior", "--cache", "{tmp}/cache", "--grid", "0"],
         "--grid", False),
        ("train-prior/batch-size-0", ["train-prior", "--out", "{tmp}/prior", "--cache", "{tmp}/cache",
                                      "--batch-size", "0"], "--batch-size", False),
        ("train-prior/eval-every-0", ["train-prior", "--out", "{tmp}/prior", "--cache", "{tmp}/cache",
                                      "--eval-every", "0"], "--eval-every", False),
        ("train-prior/encode-size-100", ["train-prior", "--out", "{tmp}/prior", "--cache", "{tmp}/cache",
                                         "--encode-size", "100"], "--encode-size", False),
        ("train-prior/out-is-file", ["train-prior", "--out", "{tmp}/file.txt", "--cache", "{tmp}/cache"], "--out",
         False),
        ("train-prior/cache-is-file", ["train-prior", "--out", "{tmp}/prior", "--cache", "{tmp}/file.txt"], "--cache",
         False),
    ]
    return [Case(i, a, e, loads) for i, a, e, loads in rows]


# (command, the options it needs besides --run-dir); each gets the training-option cases below
TRAINERS = [
    ("train-autoencoder", []), ("train-text", []), ("train-unet", ["--from-pipeline", "base"]),
    ("robust-train", []), ("finetune-v", []), ("distill", []), ("distill-decoder", []),
]
TRAIN_CASES = [
    ("batch-size-0", ["--batch-size", "0"], "--batch-size"),
    ("batch-size-huge", ["--batch-size", "1000000"], "--batch-size"),
    ("lr-nan", ["--lr", "nan"], "--lr"),
    ("lr-0", ["--lr", "0"], "--lr"),
    ("lr-negative", ["--lr=-1e-4"], "--lr"),
    ("checkpoint-every-0", ["--checkpoint-every", "0"], "--checkpoint-every"),
    ("log-every-0", ["--log-every", "0"], "--log-every"),
    ("num-workers-negative", ["--num-workers=-1"], "--num-workers"),
    ("max-steps-0", ["--max-steps", "0"], "--max-steps"),
    ("max-steps-negative", ["--max-steps=-1"], "--max-steps"),
    ("ema-decay-5", ["--ema-decay", "5"], "--ema-decay"),
    ("ema-decay-1", ["--ema-decay", "1"], "--ema-decay"),
    ("warmup-negative", ["--warmup-steps=-5"], "--warmup-steps"),
    ("sample-every-negative", ["--sample-every=-1"], "--sample-every"),
    ("max-minutes-nan", ["--max-minutes", "nan"], "--max-minutes"),
    ("seed-2**64", ["--seed", "18446744073709551616"], "--seed"),
    ("mixed-precision-unknown", ["--mixed-precision", "fp8"], "--mixed-precision"),
]
# every training option case on train-text (the smallest), the main ones on every other trainer
TRAIN_ALL = {"train-text"}
TRAIN_MAIN = {"batch-size-0", "lr-nan", "checkpoint-every-0", "max-steps-0", "ema-decay-5", "num-workers-negative"}


def _training() -> list[Case]:
    cases = []
    for cmd, extra in TRAINERS:
        base = [cmd, "--run-dir", "{tmp}/run", *extra]
        for i, opts, expect in TRAIN_CASES:
            if cmd in TRAIN_ALL or i in TRAIN_MAIN:
                cases.append(Case(f"{cmd}/{i}", base + opts, expect))
        cases.append(Case(f"{cmd}/run-dir-is-file", [cmd, "--run-dir", "{tmp}/file.txt", *extra], "--run-dir"))
    unet = ["train-unet", "--run-dir", "{tmp}/run", "--from-pipeline", "base"]
    cases += [
        Case("train-unet/no-parts", ["train-unet", "--run-dir", "{tmp}/run"], "--vae"),
        Case("train-unet/image-size-100", unet + ["--image-size", "100"], "--image-size"),
        Case("train-unet/clip-skip-negative", unet + ["--clip-skip=-1"], "--clip-skip"),
        Case("train-unet/offset-noise-nan", unet + ["--offset-noise", "nan"], "--offset-noise"),
        Case("train-unet/mix-prob-2", unet + ["--mix-prob", "2"], "--mix-prob"),
        Case("train-unet/timestep-bias-portion-2", unet + ["--timestep-bias", "later", "--timestep-bias-portion", "2"],
             "--timestep-bias-portion"),
        Case("train-unet/from-pipeline-missing", ["train-unet", "--run-dir", "{tmp}/run", "--from-pipeline",
                                                  "{tmp}/nopipe"], "nopipe"),
        Case("train-autoencoder/decoder-only-no-init", ["train-autoencoder", "--run-dir", "{tmp}/run",
                                                        "--decoder-only"], "--init"),
        Case("distill/cfg-prob-2", ["distill", "--run-dir", "{tmp}/run", "--cfg-prob", "2"], "--cfg-prob"),
        Case("distill/guidance-range-reversed", ["distill", "--run-dir", "{tmp}/run", "--guidance-min", "9",
                                                 "--guidance-max", "2"], "--guidance"),
        Case("distill/guidance-embed-with-feature-weight", ["distill", "--run-dir", "{tmp}/run", "--guidance-embed",
                                                             "--feature-weight", "0.5"], "--guidance-embed"),
        Case("distill-decoder/ratio-0", ["distill-decoder", "--run-dir", "{tmp}/run", "--ratio", "0"], "--ratio"),
        Case("robust-train/p-res-2", ["robust-train", "--run-dir", "{tmp}/run", "--p-res", "2"], "--p-res"),
    ]
    return cases


def _compress() -> list[Case]:
    rows = [
        ("evolve/budget-nan", ["evolve", "--run-dir", "{tmp}/run", "--table", "{tmp}/bad.json", "--budget", "nan"],
         "--budget"),
        ("evolve/iterations-0", ["evolve", "--run-dir", "{tmp}/run", "--table", "{tmp}/bad.json", "--iterations",
                                 "0"], "--iterations"),
        ("evolve/table-missing", ["evolve", "--run-dir", "{tmp}/run", "--table", "{tmp}/none.json"], "none.json"),
        ("block-importance/num-prompts-0", ["block-importance", "--out", "{tmp}/bi.json", "--num-prompts", "0"],
         "--num-prompts"),
        ("bk-sdm/init-missing", ["bk-sdm", "--init", "{tmp}/nounet", "--out", "{tmp}/bk"], "nounet"),
        ("evolve-apply/log-missing", ["evolve-apply", "--log", "{tmp}/none.jsonl", "--init", "{tmp}/empty", "--out",
                                      "{tmp}/ev"], "none.jsonl"),
        ("reduce-decoder/ratio-0", ["reduce-decoder", "--out", "{tmp}/dec", "--ratio", "0"], "--ratio"),
        ("reduce-decoder/ratio-2", ["reduce-decoder", "--out", "{tmp}/dec", "--ratio", "2"], "--ratio"),
        ("decoder-latents/latent-pool-0", ["decoder-latents", "--latent-pool", "0", "--out", "{tmp}/lat"],
         "--latent-pool"),
        ("eval-decoder/count-0", ["eval-decoder", "{tmp}/empty", "--count", "0"], "--count"),
        ("compress/data-missing", ["compress", "--run-dir", "{tmp}/run", "--data", "{tmp}/nodata", "--architecture",
                                   "bk-sdm"], "nodata"),
        ("compress/prompts-missing", ["compress", "--run-dir", "{tmp}/run", "--prompts", "{tmp}/none.txt"], "none.txt"),
        ("unknown-command", ["paint", "a cat"], "paint"),
        ("no-command", [], "command"),
    ]
    return [Case(i, a, e) for i, a, e in rows]


def _more() -> list[Case]:
    """Cross-option checks, paths and number formats across the commands."""
    g = ["generate", P, "--out", "{tmp}/out.png"]
    e = ["eval", "--out", "{tmp}/ev"]
    b = ["bench", "--preset", "tiny"]
    bb = ["bench-blocks", "--preset", "tiny_sd15", "--out", "{tmp}/t.json"]
    text = ["train-text", "--run-dir", "{tmp}/run"]
    unet = ["train-unet", "--run-dir", "{tmp}/run", "--from-pipeline", "base"]
    dec = ["distill-decoder", "--run-dir", "{tmp}/run"]
    prior = ["train-prior", "--out", "{tmp}/prior", "--cache", "{tmp}/cache"]
    rows = [
        ("generate/seed-exponent", g + ["--seed", "1e3"], "--seed must be an integer"),
        ("generate/num-images-65", g + ["--num-images", "65"], "limit per call is 64"),
        ("generate/height-0", g + ["--height", "0"], "--height"),
        ("generate/size-not-64-step", g + ["--size", "520"], "multiple of 64"),
        ("generate/onnx-no-model", g + ["--backend", "onnxruntime"], "--model"),
        ("generate/negative-nul", g + ["--negative-prompt", "a\x00b"], "--negative-prompt"),
        ("generate/out-newline", ["generate", P, "--out", "{tmp}/a\nb.xyz"], "--out"),
        ("generate/out-jpeg-in-file", ["generate", P, "--out", "{tmp}/file.txt/x.jpg"], "file.txt"),
        ("generate/device-cuda-missing", g + ["--device", "cuda:7"], "--device"),
        ("eval/guidance-and-sweep", e + ["--guidance", "2", "--guidance-sweep", "1,2"], "exactly one"),
        ("eval/num-images-above-set", e + ["--num-images", "100000"], "--num-images 100000 exceeds"),
        ("eval/seeds-per-prompt-text", e + ["--seeds-per-prompt", "two"], "--seeds-per-prompt"),
        ("eval/decoder-missing", e + ["--decoder", "{tmp}/nodecoder"], "nodecoder"),
        ("eval/model-missing", e + ["--model", "{tmp}/nomodel"], "nomodel"),
        ("eval/sweep-too-many", e + ["--guidance-sweep", ",".join(["1"] * 40)], "the limit is 32"),
        ("export/parity-steps-huge", ["export", "--out", "{tmp}/onnx", "--parity-steps", "5000"], "--parity-steps"),
        ("export/batch-huge", ["export", "--out", "{tmp}/onnx", "--batch", "100000"], "--batch"),
        ("bench/runs-text", b + ["--runs", "many"], "--runs"),
        ("bench/json-not-json", b + ["--json", "{tmp}/b.txt"], "--json"),
        ("bench/compile-onnx", ["bench", "--model", "{tmp}/dir", "--backend", "onnxruntime", "--compile"],
         "--compile"),
        ("bench/model-and-preset", b + ["--model", "base"], "exactly one"),
        ("bench/model-missing", ["bench", "--model", "{tmp}/nomodel"], "nomodel"),
        ("bench-blocks/model-and-preset", bb + ["--model", "base"], "exactly one"),
        ("bench-blocks/preset-unknown", ["bench-blocks", "--preset", "huge", "--out", "{tmp}/t.json"], "--preset"),
        ("bench-blocks/out-not-json", ["bench-blocks", "--preset", "tiny_sd15", "--out", "{tmp}/t.txt"], "--out"),
        ("bench-blocks/clock-cpu-threads", bb + ["--clock", "cpu"], "--threads 1"),
        ("train-text/max-steps-text", text + ["--max-steps", "ten"], "--max-steps"),
        ("train-text/lr-2", text + ["--lr", "2"], "--lr"),
        ("train-text/seed-negative", text + ["--seed=-1"], "--seed"),
        ("train-text/num-emoji-0", text + ["--num-emoji", "0"], "--num-emoji"),
        ("train-text/max-minutes-negative", text + ["--max-minutes=-1"], "--max-minutes"),
        ("train-text/run-dir-empty", ["train-text", "--run-dir", ""], "--run-dir"),
        ("train-unet/timestep-bias-range-reversed", unet + ["--timestep-bias", "range", "--timestep-bias-range",
                                                            "500", "100"], "--timestep-bias-range"),
        ("train-unet/timestep-bias-range-alone", unet + ["--timestep-bias-range", "100", "500"], "--timestep-bias"),
        ("train-unet/offset-noise-grid-3", unet + ["--offset-noise-grid", "3"], "power of 2"),
        ("train-unet/mix-prob-nan", unet + ["--mix-prob", "nan"], "--mix-prob"),
        ("train-unet/latent-pool-negative", unet + ["--latent-pool=-1"], "--latent-pool"),
        ("train-unet/vae-missing", ["train-unet", "--run-dir", "{tmp}/run", "--vae", "{tmp}/novae",
                                    "--text-encoder", "{tmp}/notext"], "novae"),
        ("distill/student-steps-0", ["distill", "--run-dir", "{tmp}/run", "--student-steps", "0"], "--student-steps"),
        ("distill/teacher-ratio-0", ["distill", "--run-dir", "{tmp}/run", "--teacher-ratio", "0"], "--teacher-ratio"),
        ("distill/teacher-ratio-1-without-guidance-embed", ["distill", "--run-dir", "{tmp}/run", "--teacher-ratio",
                                                            "1"], "--guidance-embed"),
        ("distill/embedding-only-without-guidance-embed", ["distill", "--run-dir", "{tmp}/run", "--embedding-only"],
         "--embedding-only needs --guidance-embed"),
        ("distill/teacher-ratio-too-many-steps", ["distill", "--run-dir", "{tmp}/run", "--student-steps", "300",
                                                  "--teacher-ratio", "4"], "--teacher-ratio"),
        ("distill/teacher-unet-missing", ["distill", "--run-dir", "{tmp}/run", "--teacher-unet", "{tmp}/nounet"],
         "nounet"),
        ("distill/model-missing", ["distill", "--run-dir", "{tmp}/run", "--model", "{tmp}/nomodel"], "nomodel"),
        ("finetune-v/kd-weight-without-teacher", ["finetune-v", "--run-dir", "{tmp}/run", "--kd-weight", "2"],
         "--kd-unet"),
        ("finetune-v/kd-unet-missing", ["finetune-v", "--run-dir", "{tmp}/run", "--kd-unet", "{tmp}/nounet"],
         "--kd-unet"),
        ("robust-train/init-missing", ["robust-train", "--run-dir", "{tmp}/run", "--init", "{tmp}/noinit"], "noinit"),
        ("robust-train/image-size-0", ["robust-train", "--run-dir", "{tmp}/run", "--image-size", "0"],
         "--image-size"),
        ("distill-decoder/guidance-range-reversed", dec + ["--guidance-range", "9", "2"], "--guidance-range"),
        ("distill-decoder/latent-cache-missing", dec + ["--latent-cache", "{tmp}/none.safetensors"],
         "--latent-cache"),
        ("distill-decoder/tiny-widths-0", dec + ["--student", "tiny", "--tiny-widths", "64", "0"], "--tiny-widths"),
        ("distill-decoder/teacher-missing", dec + ["--teacher", "{tmp}/noteacher"], "noteacher"),
        ("decoder-latents/out-not-safetensors", ["decoder-latents", "--latent-pool", "4", "--out", "{tmp}/lat.bin"],
         "--out"),
        ("eval-decoder/student-missing", ["eval-decoder", "{tmp}/nodecoder"], "nodecoder"),
        ("eval-decoder/pipeline-guidance-nan", ["eval-decoder", "{tmp}/empty", "--pipeline-guidance", "nan"],
         "--pipeline-guidance"),
        ("reduce-decoder/teacher-missing", ["reduce-decoder", "--out", "{tmp}/dec", "--teacher", "{tmp}/noteacher"],
         "noteacher"),
        ("reduce-decoder/norm-groups-0", ["reduce-decoder", "--out", "{tmp}/dec", "--norm-groups", "0"],
         "--norm-groups"),
        ("train-prior/calibrate-above-scenes", prior + ["--scenes", "20", "--calibrate", "50"], "--calibrate"),
        ("train-prior/model-missing", prior + ["--model", "{tmp}/nomodel"], "nomodel"),
        ("train-prior/seed-2**64", prior + ["--seed", "18446744073709551616"], "--seed"),
        ("evolve/table-malformed", ["evolve", "--run-dir", "{tmp}/run", "--table", "{tmp}/bad.json"], "bad.json"),
        ("evolve/budget-2", ["evolve", "--run-dir", "{tmp}/run", "--table", "{tmp}/bad.json", "--budget", "2"],
         "--budget"),
        ("evolve/lr-inf", ["evolve", "--run-dir", "{tmp}/run", "--table", "{tmp}/bad.json", "--lr", "inf"], "--lr"),
        ("block-importance/out-not-json", ["block-importance", "--out", "{tmp}/bi.txt"], "--out"),
        ("bk-sdm/init-without-config", ["bk-sdm", "--init", "{tmp}/empty", "--out", "{tmp}/bk"], "--init"),
        ("evolve-apply/log-not-a-log", ["evolve-apply", "--log", "{tmp}/file.txt", "--init", "{tmp}/empty",
                                        "--out", "{tmp}/ev"], "not a valid evolution log"),
        ("assemble/out-empty", ["assemble", "--text-encoder", "{tmp}/empty", "--vae", "{tmp}/empty", "--unet",
                                "{tmp}/empty", "--out", ""], "--out"),
    ]
    rows += [
        ("serve/port-99999", ["serve", "--port", "99999"], "--port"),
        ("serve/port-text", ["serve", "--port", "http"], "--port"),
        ("serve/timeout-nan", ["serve", "--timeout", "nan"], "--timeout"),
        ("serve/queue-size-0", ["serve", "--queue-size", "0"], "--queue-size"),
        ("serve/max-batch-1000", ["serve", "--max-batch", "1000"], "--max-batch"),
        ("serve/device-unknown", ["serve", "--device", "tpu"], "--device"),
        ("serve/model-missing", ["serve", "--model", "{tmp}/nomodel"], "nomodel"),
        ("compress/run-dir-is-file", ["compress", "--run-dir", "{tmp}/file.txt"], "--run-dir"),
        ("compress/latency-budget-0", ["compress", "--run-dir", "{tmp}/sf", "--latency-budget", "0"],
         "--latency-budget"),
        ("compress/latency-budget-nan", ["compress", "--run-dir", "{tmp}/sf", "--latency-budget", "nan"],
         "--latency-budget"),
        ("compress/max-minutes-nan", ["compress", "--run-dir", "{tmp}/sf", "--max-minutes", "nan"], "--max-minutes"),
        ("compress/stages-unknown", ["compress", "--run-dir", "{tmp}/sf", "--stages", "paint"], "--stages"),
        ("compress/teacher-missing", ["compress", "--run-dir", "{tmp}/sf", "--teacher", "{tmp}/noteacher"],
         "noteacher"),
        ("compress/num-emoji-0", ["compress", "--run-dir", "{tmp}/sf", "--num-emoji", "0"], "--num-emoji"),
        ("compress/teacher-ratio-text", ["compress", "--run-dir", "{tmp}/sf", "--teacher-ratio", "two"],
         "--teacher-ratio"),
        ("compress/device-unknown", ["compress", "--run-dir", "{tmp}/sf", "--device", "tpu"], "--device"),
        ("compress/architecture-unknown", ["compress", "--run-dir", "{tmp}/sf", "--architecture", "random"],
         "--architecture"),
        ("compress/architecture-log-missing", ["compress", "--run-dir", "{tmp}/sf", "--architecture",
                                               "{tmp}/none.jsonl"], "none.jsonl"),
        ("compress/decoder-missing", ["compress", "--run-dir", "{tmp}/sf", "--decoder", "{tmp}/nodecoder"],
         "nodecoder"),
        ("compress/prior-missing", ["compress", "--run-dir", "{tmp}/sf", "--prior", "{tmp}/noprior"], "noprior"),
        ("compress/ship-unknown", ["compress", "--run-dir", "{tmp}/sf", "--ship", "distill-3"], "--ship"),
    ]
    return [Case(i, a, x) for i, a, x in rows]


CASES: list[Case] = (_generate() + _eval() + _export_bench() + _convert_assemble_prior() + _training() + _compress()
                     + _more())
