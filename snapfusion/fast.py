"""Low-latency DDIM generation: the text encoder, every sampling step and the decoder replayed as CUDA graphs over
static input buffers, with optional torch.compile'd networks, channels-last convolutions, a chosen SDPA kernel per
attention shape, a cached unconditional context, split (two batch-1) classifier-free guidance, and the
guidance-embedded UNet (one call per step). ``accelerate(pipe)`` routes ``pipe.generate`` through it.
"""

from __future__ import annotations

import copy
import time
import types
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from snapfusion.errors import ConfigError, SnapFusionError
from snapfusion.prior import start_shift
from snapfusion.sampling import Denoiser, cfg_mix, guidance_steps, guided, sample_ddim, with_guidance_interval
from snapfusion.validation import check_negative_prompt_fits, used_guidance_interval, used_guidance_rescale

SDPA = ("default", "flash", "efficient", "cudnn", "math", "tuned")
MAX_RUNNERS = 2  # runners (static buffers and graphs) kept per pipeline: each holds its graphs' memory


@dataclass(frozen=True)
class FastOptions:
    """Which latency levers ``accelerate`` applies; the defaults are the CUDA defaults of ``generate``."""

    graph: bool = True                # replay text encoder, the whole step loop and the decoder as CUDA graphs
    compile: bool = False             # torch.compile UNet, text encoder and decoder (inductor, default mode)
    dynamic: bool | None = False      # torch.compile's dynamic: False = static shapes, None = automatic
    channels_last: bool = True        # UNet and decoder weights (and so activations) in NHWC
    sdpa: Literal["default", "flash", "efficient", "cudnn", "math", "tuned"] = "default"  # tuned: fastest per shape
    cfg: Literal["batch2", "split"] = "batch2"  # cond + uncond in one UNet call, or two batch-1 calls
    cache_uncond: bool = True         # encode the negative prompt once per runner, not once per call
    cudnn_benchmark: bool = True      # let cuDNN time its convolution algorithms on first use

    def __post_init__(self):
        if self.sdpa not in SDPA:
            raise ConfigError(f"sdpa {self.sdpa!r} is not one of {list(SDPA)}")
        if self.cfg not in ("batch2", "split"):
            raise ConfigError(f"cfg {self.cfg!r} is not one of ['batch2', 'split']")


def accelerate(pipe, options: FastOptions = FastOptions()):
    """Apply ``options`` to ``pipe``'s networks in place and route its DDIM ``generate`` through cached runners."""
    dev = pipe.device
    if options.cudnn_benchmark and dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if options.channels_last:
        for m in (pipe.unet, pipe.decoder):
            m.to(memory_format=torch.channels_last)
    if options.sdpa == "tuned":
        set_attention_backends(pipe.unet, tune_attention(pipe.unet, batch=2 if options.cfg == "batch2" else 1,
                                                         size=pipe.config.resolution // pipe.decoder.config.downscale))
    elif options.sdpa != "default":
        set_attention_backends(pipe.unet, options.sdpa)
    if options.compile:
        compile_pipeline(pipe, dynamic=options.dynamic)
    pipe.fast = FastGenerate(options)
    return pipe


def compile_pipeline(pipe, mode: str = "default", *, everything: bool = True, dynamic: bool | None = None) -> None:
    """torch.compile the pipeline's UNet in place (inductor ``mode``; "reduce-overhead" adds CUDA graphs per
    network); ``everything``: also the text encoder and the decoder's ``images_from_latents``."""
    # CUDA graphs of reduce-overhead / max-autotune reuse their output buffers: the text encoder's cond output would
    # be overwritten by the uncond call. There each call starts a new graph step and hands out a copy.
    graphs = mode in ("reduce-overhead", "max-autotune")
    targets = [(pipe.unet, "forward")]
    if everything:
        targets += [(pipe.text_encoder, "forward"), (pipe.decoder, "images_from_latents")]
    for module, name in targets:
        compiled = torch.compile(getattr(module, name), mode=mode, dynamic=dynamic)
        setattr(module, name, _graph_safe(compiled) if graphs else compiled)


def _graph_safe(fn):
    def run(*args, **kwargs):
        torch.compiler.cudagraph_mark_step_begin()
        return fn(*args, **kwargs).clone()
    return run


# ---- SDPA kernel per attention shape ---------------------------------------------------------------------------

def _backend(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def _attention_forward(backend: str):
    """``layers.Attention.forward`` with its SDPA call pinned to one kernel."""
    from torch.nn.attention import sdpa_kernel

    kernel = _backend(backend)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        b, n, c = x.shape  # (B, N, C)
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (t.view(b, -1, self.heads, c // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, N, D)
        with sdpa_kernel(kernel):
            out = F.scaled_dot_product_attention(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(b, n, c))
    return forward


def attention_shapes(unet, *, batch: int, size: int) -> dict[str, tuple[int, int, int, int, int]]:
    """(B, heads, N_query, N_key, head_dim) of every attention module of ``unet`` for latents of side ``size``."""
    from snapfusion.models.layers import Attention

    shapes: dict[str, tuple[int, int, int, int, int]] = {}
    hooks = [m.register_forward_pre_hook(
        lambda m, args, name=name: shapes.__setitem__(name, (args[0].shape[0], m.heads, args[0].shape[1],
                                                             (args[1] if len(args) > 1 and args[1] is not None
                                                              else args[0]).shape[1], args[0].shape[2] // m.heads)))
        for name, m in unet.named_modules() if isinstance(m, Attention)]
    p = next(unet.parameters())
    c = unet.config
    kwargs = {"guidance": torch.full((batch,), 7.5, device=p.device)} if c.guidance_embed else {}
    try:
        with torch.no_grad():
            unet(torch.randn(batch, c.in_channels, size, size, device=p.device, dtype=p.dtype),
                 torch.full((batch,), 500, device=p.device), torch.randn(batch, 77, c.context_dim, device=p.device,
                                                                        dtype=p.dtype), **kwargs)
    finally:
        for h in hooks:
            h.remove()
    return shapes


def time_attention(shape: tuple[int, int, int, int, int], backend: str, *, device, dtype, reps: int = 20) -> float:
    """Median seconds of one SDPA call of ``shape`` on ``backend`` (inf where the backend refuses the shape)."""
    from torch.nn.attention import sdpa_kernel

    b, h, nq, nk, d = shape
    q = torch.randn(b, h, nq, d, device=device, dtype=dtype)
    k, v = (torch.randn(b, h, nk, d, device=device, dtype=dtype) for _ in range(2))
    try:
        with sdpa_kernel(_backend(backend)):
            F.scaled_dot_product_attention(q, k, v)
            times = []
            for _ in range(reps):
                _sync(q.device)
                t0 = time.perf_counter()
                F.scaled_dot_product_attention(q, k, v)
                _sync(q.device)
                times.append(time.perf_counter() - t0)
    except RuntimeError:  # "No available kernel": the backend does not take this shape, dtype or device
        return float("inf")
    return sorted(times)[len(times) // 2]


def time_attention_shapes(unet, *, batch: int, size: int, backends=("flash", "efficient", "cudnn", "math")
                          ) -> tuple[dict[str, tuple], dict[tuple, dict[str, float]]]:
    """Each attention module's shape, and the seconds of every SDPA backend on each distinct shape."""
    p = next(unet.parameters())
    shapes = attention_shapes(unet, batch=batch, size=size)
    times = {shape: {name: time_attention(shape, name, device=p.device, dtype=p.dtype) for name in backends}
             for shape in sorted(set(shapes.values()))}
    return shapes, times


def default_backend(shape: tuple[int, int, int, int, int], *, device, dtype) -> str:
    """The SDPA backend PyTorch picks by itself for ``shape`` (its priority order and constraints)."""
    b, h, nq, nk, d = shape
    q = torch.randn(b, h, nq, d, device=device, dtype=dtype)
    k = torch.randn(b, h, nk, d, device=device, dtype=dtype)
    choice = int(torch._fused_sdp_choice(q, k, k))  # the index of torch.nn.attention.SDPBackend
    return {0: "math", 1: "flash", 2: "efficient", 3: "cudnn"}.get(choice, "math")


def tune_attention(unet, *, batch: int, size: int) -> dict[str, str]:
    """The fastest SDPA backend for each attention module of ``unet`` (timed once per distinct shape)."""
    shapes, times = time_attention_shapes(unet, batch=batch, size=size)
    return {name: min(times[shape], key=times[shape].get) for name, shape in shapes.items()}


def set_attention_backends(unet, backends: str | dict[str, str]) -> None:
    """Pin the SDPA kernel of every attention module (one name) or of each module (a dict name -> backend)."""
    from snapfusion.models.layers import Attention

    for name, m in unet.named_modules():
        if isinstance(m, Attention):
            choice = backends if isinstance(backends, str) else backends.get(name)
            if choice is not None:
                m.forward = types.MethodType(_attention_forward(choice), m)


# ---- the runner: static buffers, three graphs ------------------------------------------------------------------

class FastGenerate:
    """``Pipeline.generate``'s DDIM path through runners cached per (batch, timesteps, guidance, rescale, interval,
    size, negative prompt, prior)."""

    def __init__(self, options: FastOptions):
        self.options = options
        self.runners: OrderedDict[tuple, Runner] = OrderedDict()
        self.graphed: list[str] = []

    def accepts(self, *, sampler: str, skip) -> bool:
        """Whether the fast path handles these settings (DDIM, no skipped blocks)."""
        return sampler == "ddim" and skip is None

    def generate(self, pipe, prompts, seeds, timesteps, *, guidance, height, width, negative_prompt, use_prior,
                 timings, callback, rescale: float = 0.0,
                 interval: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
        """Images in [0, 1] (B, 3, H, W) as ``Pipeline.generate`` returns them."""
        prior = use_prior and pipe.prior is not None
        rescale = used_guidance_rescale(rescale, guidance)  # no mix at guidance 1: one runner whatever phi
        interval = used_guidance_interval(interval, guidance)  # ... and whatever interval
        guided_steps = tuple(guidance_steps(len(timesteps) - 1, interval))  # intervals that guide the same steps
        key = (len(prompts), tuple(timesteps.tolist()), float(guidance), rescale, guided_steps, height, width,
               negative_prompt, prior)  # share a runner
        runner = self.runners.pop(key, None)
        if runner is None:
            while len(self.runners) >= MAX_RUNNERS:
                self.runners.popitem(last=False)
            runner = Runner(pipe, self.options, batch=len(prompts), timesteps=timesteps, guidance=guidance,
                            height=height, width=width, negative_prompt=negative_prompt, prior=prior, rescale=rescale,
                            interval=interval)
        self.runners[key] = runner
        images = runner(prompts, seeds, timings)
        self.graphed = sorted(k for k, g in runner.stages.items() if g is not None)  # what the last call replayed
        if callback is not None:  # the loop ran on the GPU as a whole: report each step once it is done
            for i, t in enumerate(timesteps[:-1].tolist()):
                callback(i, int(t), runner.latents)
        return images


def _on_device(schedule, device: torch.device):
    """A copy of ``schedule`` whose lookup tables live on ``device`` (no host copies inside a captured graph)."""
    s = copy.copy(schedule)
    s._alpha, s._sigma = schedule._alpha.to(device), schedule._sigma.to(device)
    return s


class Runner:
    """One generation setting: static token and noise buffers, then text / loop / decoder stages, eager on the
    first call (warm-up, compilation), captured as CUDA graphs on the second, replayed from then on."""

    def __init__(self, pipe, options: FastOptions, *, batch: int, timesteps: torch.Tensor, guidance: float,
                 height: int, width: int, negative_prompt: str = "", prior: bool = False, rescale: float = 0.0,
                 interval: tuple[float, float] = (0.0, 1.0)):
        dev = pipe.device
        self.pipe, self.options, self.batch, self.prior = pipe, options, batch, prior
        self.graphed = options.graph and dev.type == "cuda"
        self.timesteps = timesteps.to(dev)
        self.schedule = _on_device(pipe.schedule, dev)
        self.scale = None if guidance == 1.0 else float(guidance)
        self.rescale = float(rescale)  # the guidance rescale phi (two-call models; 0: plain guidance)
        self.interval = interval  # the fractions of the steps that mix guidance (two-call models)
        self.embedded = pipe.embeds_guidance
        check_negative_prompt_fits(negative_prompt, embeds_guidance=self.embedded, model=pipe.config.name)
        down = pipe.decoder.config.downscale
        self.ids = torch.full((batch, pipe.tokenizer.max_length), pipe.tokenizer.eos_id, dtype=torch.long,
                              device=dev)  # (B, 77)
        self.z = torch.zeros(batch, pipe.unet.config.in_channels, height // down, width // down, device=dev)
        self.neg_ids = pipe.tokenizer([negative_prompt]).to(dev)  # (1, 77)
        self.w = torch.full((batch,), 1.0 if self.scale is None else self.scale, device=dev)  # embedded guidance
        self.uncond = None
        if self.scale is not None and not self.embedded and options.cache_uncond:
            with torch.no_grad():
                self.uncond = pipe.text_encoder(self.neg_ids).to(pipe.dtype).clone()  # (1, 77, D)
        self.calls = 0
        self.stages: dict[str, torch.cuda.CUDAGraph | None] = {}  # captured stages (None: that stage runs eagerly)
        self.cond = self.uncond_out = self.latents = self.images = None

    # the three stages, written against the static buffers
    def _text(self):
        cond = self.pipe.text_encoder(self.ids).to(self.pipe.dtype)  # (B, 77, D)
        uncond = self.uncond
        if self.scale is not None and not self.embedded and uncond is None:
            uncond = self.pipe.text_encoder(self.neg_ids).to(self.pipe.dtype)[:1]  # (1, 77, D)
        return cond, uncond

    def _model_fn(self, cond, uncond):
        pipe = self.pipe
        net = pipe.unet
        if self.embedded:  # one call per step: the UNet takes w itself
            denoiser = Denoiser(lambda z, t, c: net(z, t, c, guidance=self.w), self.schedule,
                                net.config.prediction_type, input_dtype=pipe.dtype)
            return lambda z, t: denoiser(z, t, cond)
        denoiser = Denoiser(net, self.schedule, net.config.prediction_type, input_dtype=pipe.dtype)
        if self.scale is None:
            return guided(denoiser, cond)
        if self.options.cfg == "batch2":
            mixed = guided(denoiser, cond, uncond, self.scale, self.rescale)
        else:
            def mixed(z, t):  # two batch-B calls instead of one batch-2B call
                raw_c = denoiser.raw(z, t, cond)
                raw_u = denoiser.raw(z, t, uncond.expand(z.shape[0], *uncond.shape[1:]))
                return denoiser.to_prediction(cfg_mix(raw_c, raw_u, self.scale, self.rescale), z, t)
        return with_guidance_interval(mixed, guided(denoiser, cond), len(self.timesteps) - 1, self.interval)

    def _loop(self, cond, uncond):
        return sample_ddim(self._model_fn(cond, uncond), self.z, self.timesteps, self.schedule)

    def _decode(self, latents):
        images = self.pipe.decoder.images_from_latents(latents.to(self.pipe.dtype)).float()
        return ((images + 1) / 2).clamp(0, 1)  # (B, 3, H, W)

    def _eager(self, clock):
        cond, uncond = self._text()
        clock.mark()
        self._shift(cond)
        latents = self._loop(cond, uncond)
        clock.mark()
        images = self._decode(latents)
        clock.mark()
        return latents, images

    def _shift(self, cond):
        if self.prior:  # the layout prior runs eagerly between the text and loop graphs (snapfusion.prior)
            abar = float(self.schedule.alphas_cumprod[int(self.timesteps[0])])
            self.z.add_(start_shift(self.pipe.prior, cond, tuple(self.z.shape[2:]), abar).to(self.z))

    def _capture(self):
        """Warm up on a side stream, then capture the loop and the decoder (and the text encoder, where it
        captures: a stage that synchronises with the host stays eager, writing into the same static buffers)."""
        pipe = self.pipe
        side = torch.cuda.Stream(pipe.device)
        side.wait_stream(torch.cuda.current_stream(pipe.device))
        z0 = self.z.clone()
        with torch.cuda.stream(side):  # warm-up on a side stream (lazy handles, cuDNN autotuning)
            cond, uncond = self._text()
        torch.cuda.current_stream(pipe.device).wait_stream(side)
        self.cond = cond.clone()  # static inputs of the loop graph
        self.uncond_out = uncond.clone() if uncond is not None else None
        self.stages = {}
        self.stages["text"] = self._try_capture(self._text_into, None)
        pool = self.stages["text"].pool() if self.stages["text"] is not None else None
        self.stages["loop"] = self._try_capture(lambda: setattr(self, "latents", self._loop(self.cond,
                                                                                             self.uncond_out)), pool)
        if self.stages["loop"] is None:
            self.graphed, self.stages = False, {}
            self.z.copy_(z0)
            return
        self.stages["decoder"] = self._try_capture(lambda: setattr(self, "images", self._decode(self.latents)),
                                                   self.stages["loop"].pool())
        self.z.copy_(z0)

    def _text_into(self):
        cond, uncond = self._text()
        self.cond.copy_(cond)
        if uncond is not None:
            self.uncond_out.copy_(uncond)

    def _try_capture(self, fn, pool) -> torch.cuda.CUDAGraph | None:
        side = torch.cuda.Stream(self.pipe.device)
        side.wait_stream(torch.cuda.current_stream(self.pipe.device))
        with torch.cuda.stream(side):  # one eager run of the stage on the side stream before its capture
            fn()
        torch.cuda.current_stream(self.pipe.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=pool):
                fn()
        except RuntimeError:  # the stage synchronises with the host: it stays eager
            torch.cuda.synchronize(self.pipe.device)
            return None
        return graph

    def _replay(self, clock):
        text, loop, dec = (self.stages.get(k) for k in ("text", "loop", "decoder"))
        text.replay() if text is not None else self._text_into()
        clock.mark()
        self._shift(self.cond)
        loop.replay()
        clock.mark()
        dec.replay() if dec is not None else setattr(self, "images", self._decode(self.latents))
        clock.mark()
        return self.latents, self.images

    @torch.no_grad()
    def __call__(self, prompts, seeds, timings) -> torch.Tensor:
        from snapfusion.sampling import initial_noise

        pipe = self.pipe
        clock = _Clock(pipe.device, True)
        clock.start()  # prompt to pixels: tokenizing and the noise draw count
        self.ids.copy_(pipe.tokenizer(list(prompts)))
        self.z.copy_(initial_noise(tuple(self.z.shape[1:]), seeds, "cpu"))
        if self.graphed and self.calls == 1:
            self._capture()
        latents, images = self._replay(clock) if self.stages else self._eager(clock)
        self.latents = latents
        out = images.clone()  # the graphs' buffers are overwritten by the next call
        parts = clock.stop()
        if not torch.isfinite(latents).all():
            raise SnapFusionError(f"sampling diverged (non-finite latents) at guidance {self.scale}: lower the "
                                  "guidance or use fp32")
        self.calls += 1
        timings.text_encoder += parts[0]
        timings.unet_total += parts[1]
        timings.unet_steps += len(self.timesteps) - 1
        timings.decoder += parts[2]
        timings.total += clock.total
        return out


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


class _Clock:
    """Stage times from CUDA events on a GPU (no synchronisation between stages), host time on a CPU."""

    def __init__(self, device: torch.device, enabled: bool):
        self.device, self.enabled, self.cuda = device, enabled, device.type == "cuda"
        self.marks: list = []
        self.t0 = self.total = 0.0

    def start(self):
        self.t0 = time.perf_counter()
        self.marks = [self._now()]

    def _now(self):
        if not self.cuda:
            return time.perf_counter()
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e

    def mark(self):
        if self.enabled and self.marks:
            self.marks.append(self._now())

    def stop(self) -> list[float]:
        _sync(self.device)
        self.total = time.perf_counter() - self.t0
        if self.cuda:
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]
