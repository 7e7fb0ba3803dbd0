"""The recipe's config, its per-stage settings and the two presets: ``full`` (the step counts behind the shipped
student, docs/efficient_unet.md and docs/step_distillation.md) and ``tiny`` (a few steps everywhere, for tests)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from snapfusion.errors import InputError


@dataclass(frozen=True)
class Train:
    """One training run of the loop: global batch (split over the processes), steps, optimizer, EMA."""

    steps: int
    batch: int                      # global batch: each of N processes gets batch // N
    lr: float
    warmup: int = 50
    ema: float = 0.998              # 0: export the trained weights themselves
    latent_pool: int = 0            # scenes encoded once (0: encode every batch)


@dataclass(frozen=True)
class Common:
    """Settings every training stage shares."""

    image_size: int = 512
    num_emoji: int | None = 40      # the base model's training domain (docs/base_model.md)
    offset_noise: float = 0.1       # every shipped run used 0.1 (docs/step_distillation.md)
    mixed_precision: str = "bf16"
    num_workers: int = 8
    checkpoint_every: int = 500
    log_every: int = 50


@dataclass(frozen=True)
class Latency:
    """bench-blocks: the per-block latency table of the teacher's UNet on the target device."""

    warmup: int = 3
    repeats: int = 10
    threads: int = 1                # CPU: 1 thread and the process CPU clock (docs/efficient_unet.md); 0: torch's
    cuda_graphs: bool = True        # CUDA: replayed graphs, whose parts add up to the whole (within 2.4 %)


@dataclass(frozen=True)
class Evolution:
    """evolve: SnapFusion Alg. 1 with robust-training chunks between steps."""

    iterations: int = 8
    actions_per_step: int = 4
    num_prompts: int = 16
    eval_steps: int = 10
    eval_batch: int = 16
    guidance: float = 7.5
    chunk_steps: int = 60           # robust-training steps between evolution steps
    chunk_batch: int = 32
    chunk_lr: float = 5e-5


@dataclass(frozen=True)
class Decoder:
    """reduce-decoder, decoder-latents, distill-decoder (SnapFusion §3.2)."""

    ratio: float = 0.5
    latents: int = 2048             # teacher latents generated once (DPM-Solver++, 12 steps, w ~ U[1, 10.5])
    latent_steps: int = 12
    latent_batch: int = 64
    train: Train = field(default_factory=lambda: Train(steps=2420, batch=16, lr=5e-4, warmup=100, ema=0.99))


@dataclass(frozen=True)
class Prior:
    """train-prior: the terminal layout prior (docs/base_model.md)."""

    scenes: int = 10000
    steps: int = 3000
    batch: int = 256
    lr: float = 1e-3
    eval_every: int = 250
    encode_size: int = 128
    calibrate: int = 64


@dataclass(frozen=True)
class Evaluation:
    """eval: the assembled student and the teacher on held-out test prompts."""

    prompts: int = 485
    seeds_per_prompt: int = 4
    guidance: float = 7.5
    teacher_steps: int = 50         # 0: do not evaluate the teacher
    batch: int = 64


@dataclass(frozen=True)
class Scale:
    """Every stage's settings."""

    name: str
    common: Common = field(default_factory=Common)
    latency: Latency = field(default_factory=Latency)
    robust: Train = field(default_factory=lambda: Train(steps=450, batch=64, lr=5e-5, warmup=200, ema=0.0,
                                                        latent_pool=16384))
    evolution: Evolution = field(default_factory=Evolution)
    kd: Train = field(default_factory=lambda: Train(steps=1800, batch=64, lr=1e-4, warmup=100, latent_pool=16384))
    kd_feature_weight: float = 1.0  # BK-SDM feature KD: what brought the 20 % UNet to the base (docs/efficient_unet.md)
    kd_prediction: str = "v_prediction"  # kd-finetune trains the student to v directly (v-student is then not run);
                                         # "epsilon": eps with KD, then v-student (the paper's order)
    v_teacher: Train = field(default_factory=lambda: Train(steps=1500, batch=64, lr=5e-5, latent_pool=16384))
    v_student: Train = field(default_factory=lambda: Train(steps=1048, batch=64, lr=1e-4, warmup=200, ema=0.999))
    distill: Train = field(default_factory=lambda: Train(steps=600, batch=32, lr=1e-4, warmup=200, ema=0.995,
                                                         latent_pool=8192))
    # the guidance-embedded student: the shipped snapfusion's copy run (3,656 steps x 32 in 9 H100 minutes at lr 2e-5,
    # EMA 0.999, w ~ U[1, 8]; docs/step_distillation.md)
    guidance_student: Train = field(default_factory=lambda: Train(steps=3600, batch=32, lr=2e-5, warmup=20,
                                                                  ema=0.999, latent_pool=8192))
    guidance_range: tuple[float, float] = (1.0, 8.0)    # the guidance-embedded student's w ~ U[1, 8]
    guidance_teacher: str = "student"  # distill-guidance's teacher: "student" (one guided step of the two-call student
                                       # per step, its one-call copy: Meng et al. 2023's first stage) or "v-teacher"
                                       # (teacher_ratio guided steps of the v teacher per step)
    half: Train = field(default_factory=lambda: Train(steps=400, batch=32, lr=1e-4, warmup=100, ema=0.995,
                                                      latent_pool=8192))
    student_steps: int = 8          # the teacher runs teacher_ratio x as many
    teacher_ratio: int = 4          # teacher DDIM steps per student step of distill and distill-guidance: 4 (32 -> 8)
                                    # behind the shipped snapfusion-cfg; 2 is the paper's 16 -> 8 (docs/recipe.md)
    cfg_prob: float = 0.1           # SnapFusion §4: L_cfg with p = 0.1, else L_vani
    feature_weight: float = 0.5     # the distillation's feature term (docs/step_distillation.md)
    decoder: Decoder = field(default_factory=Decoder)
    prior: Prior = field(default_factory=Prior)
    evaluation: Evaluation = field(default_factory=Evaluation)


def _tiny() -> Scale:
    """A few steps everywhere at 64 px: the whole chain in about a minute on a CPU."""
    few = Train(steps=2, batch=2, lr=1e-3, warmup=1, ema=0.9)
    return Scale(
        name="tiny",
        common=Common(image_size=64, num_emoji=40, mixed_precision="no", num_workers=0, checkpoint_every=1,
                      log_every=1),
        latency=Latency(warmup=1, repeats=2, threads=0, cuda_graphs=False),
        robust=replace(few, ema=0.0),
        evolution=Evolution(iterations=2, actions_per_step=2, num_prompts=2, eval_steps=2, eval_batch=2,
                            guidance=3.0, chunk_steps=1, chunk_batch=2, chunk_lr=1e-3),
        kd=few, v_teacher=few, v_student=few, distill=few, guidance_student=few, half=few,
        decoder=Decoder(latents=4, latent_steps=2, latent_batch=4, train=few),
        prior=Prior(scenes=20, steps=4, batch=8, eval_every=2, encode_size=32, calibrate=4),
        evaluation=Evaluation(prompts=2, seeds_per_prompt=1, guidance=3.0, teacher_steps=2, batch=2),
    )


SCALES = {"full": Scale(name="full"), "tiny": _tiny()}


def scale_preset(name: str) -> Scale:
    """The named preset; ``InputError`` for an unknown name."""
    if name not in SCALES:
        raise InputError(f"--scale {name!r}: unknown (known: {', '.join(SCALES)})")
    return SCALES[name]


@dataclass(frozen=True)
class RecipeConfig:
    """The recipe: which teacher, where, to what latency, on which device, how long per call, which stages, which
    preset (printed at the start and saved as the run folder's recipe.json)."""

    teacher: str                     # 'base' or a pipeline folder with text_encoder/, unet/, vae_encoder/, vae_decoder/
    run_dir: str                     # every stage's folder and manifest.json
    latency_budget: float = 0.3      # the evolved UNet's latency as a fraction of the teacher's, per step on `device`
    device: str = "auto"             # target device of the latency table, and where single-process stages run
    max_minutes: float = 0.0         # > 0: stop this invocation after about this long (training stops at a checkpoint)
    stages: tuple[str, ...] = ()     # run only these (table order); empty: all
    scale: Scale = field(default_factory=lambda: SCALES["full"])
    data_folder: str | None = None   # your own images (images + metadata.jsonl) in place of the built-in scenes
    prompts: str | None = None       # the decoder's and own-data evaluation's prompts (a prompt file or an image
                                     # folder); None: data_folder's captions, else the scenes'
    architecture: str = "evolve"     # "evolve": Alg. 1 scored by the scene evaluators; "bk-sdm": BK-SDM's fixed rule;
                                     # or an evolution log (.jsonl) found earlier, replayed on the teacher's weights
    decoder: str | None = None       # a distilled decoder folder to use instead of the three decoder stages
    prior: str | None = None         # a layout prior folder ("teacher": the teacher's prior/) instead of train-prior
    v_teacher: str | None = None     # a v-prediction teacher UNet folder (e.g. another run's v-teacher/final)
                                     # instead of the v-teacher stage
    ship: str = "distill"            # the UNet assembled: distill (n steps, two calls per step with guidance),
                                     # distill-guidance (guidance embedded: one call) or distill-half (n/2 steps)


ARCHITECTURES = ("evolve", "bk-sdm")
SHIPPABLE = ("distill", "distill-guidance", "distill-half")
GUIDANCE_TEACHERS = ("v-teacher", "student")
