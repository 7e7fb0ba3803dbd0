"""The server's generation engine: models loaded once and kept warm, a bounded queue, and one worker thread that
runs queued requests sharing their settings as one ``Pipeline.generate`` batch.

Nothing here knows HTTP: ``submit`` returns a ``Job`` whose ``future`` resolves to a ``JobResult`` (or an error),
and ``cancel`` frees a job's queue slot (a timed-out request, a client that went away).
"""

from __future__ import annotations

import io
import json
import math
import os
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Callable

from snapfusion import validation
from snapfusion.errors import InputError, SnapFusionError


@dataclass(frozen=True)
class Request:
    """One API request's settings, already validated (None: the model's default)."""

    prompt: str
    n: int = 1
    seed: int | None = None           # image k gets seed + k; None: drawn at random
    negative_prompt: str = ""
    steps: int | None = None
    guidance: float | None = None
    guidance_rescale: float | None = None
    guidance_interval: tuple[float, float] | None = None
    sampler: str | None = None
    height: int | None = None
    width: int | None = None
    model: str | None = None          # None: the engine's default model


@dataclass(frozen=True)
class JobResult:
    """A finished request: PNG bytes per image (settings in their text chunks), seeds, settings and timings."""

    pngs: list[bytes]
    seeds: list[int]
    settings: dict
    timings: dict                     # seconds: text_encoder, unet, decoder, total (of the batch), queue_wait


@dataclass(eq=False)
class Job:
    """A queued request and the future its result arrives on."""

    request: Request
    model: str
    seeds: list[int]
    enqueued: float = field(default_factory=time.perf_counter)
    future: Future = field(default_factory=Future)
    cancelled: bool = False


class QueueFull(SnapFusionError):
    """The queue holds its limit of waiting requests; ``retry_after`` estimates when a slot frees (seconds)."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Cancelled(SnapFusionError):
    """The request was cancelled (timed out or its client went away) before it finished."""


def resolve_settings(request: Request, pipe) -> dict:
    """The request's settings with the model's defaults filled in; the size checked against the model's grid."""
    cfg = pipe.config
    pick = lambda value, default: default if value is None else value  # noqa: E731  (0 is a value)
    height, width = pick(request.height, cfg.resolution), pick(request.width, cfg.resolution)
    factor = pipe.latent_factor
    validation.check_side(height, name="height", multiple=factor)
    validation.check_side(width, name="width", multiple=factor)
    guidance = float(pick(request.guidance, cfg.guidance))
    validation.check_negative_prompt_fits(request.negative_prompt, embeds_guidance=pipe.embeds_guidance, model=cfg.name)
    rescale = pipe.resolve_guidance_rescale(request.guidance_rescale)
    steps = pick(request.steps, cfg.steps)
    interval = pipe.resolve_guidance_interval(request.guidance_interval, steps=steps, guidance=guidance)
    return {"steps": steps, "guidance": guidance,
            "guidance_rescale": validation.used_guidance_rescale(rescale, guidance),
            "guidance_interval": list(validation.used_guidance_interval(interval, guidance)),
            "sampler": pick(request.sampler, cfg.sampler),
            "height": height, "width": width, "negative_prompt": request.negative_prompt if guidance != 1.0 else ""}


def png_bytes(image, text: dict) -> bytes:
    """A PIL image as PNG bytes with ``text`` (settings) in tEXt/iTXt chunks."""
    from PIL.PngImagePlugin import PngInfo

    meta = PngInfo()
    for key, value in text.items():
        meta.add_text(key, value if isinstance(value, str) else json.dumps(value))
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=meta)
    return buf.getvalue()


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB (getrusage; kilobytes on Linux, bytes on macOS)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024


def rss_mib() -> float | None:
    """This process's resident memory now in MiB (Linux /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


class Engine:
    """Warm models by name, a queue of at most ``queue_size`` waiting requests and one worker thread."""

    def __init__(self, loaders: dict[str, Callable[[], object]], default: str, *, queue_size: int = 16,
                 max_batch: int = 4):
        if default not in loaders:
            raise InputError(f"default model {default!r} is not among {sorted(loaders)}")
        self.loaders, self.default = dict(loaders), default
        self.queue_size, self.max_batch = queue_size, max_batch
        self.models: dict[str, object] = {}
        self.batches: deque = deque(maxlen=256)   # (model, requests, images) of recent batches, newest last
        self.counts = {"requests": 0, "images": 0, "batches": 0, "rejected": 0, "cancelled": 0, "failed": 0}
        self._queue: list[Job] = []               # waiting jobs, oldest first
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._load_lock = threading.Lock()
        self._batch_seconds = 0.0                 # moving average of a batch's run time (Retry-After)
        self._thread: threading.Thread | None = None
        self._stop = False

    # ---- models -------------------------------------------------------------------------------------------
    def load(self, name: str):
        """The warm pipeline ``name``, loaded now if this is its first use."""
        if name not in self.loaders:
            raise InputError(f"model must be one of {', '.join(sorted(self.loaders))}, got {name!r}")
        with self._load_lock:
            if name not in self.models:
                self.models[name] = self.loaders[name]()
            return self.models[name]

    # ---- the queue ----------------------------------------------------------------------------------------
    def submit(self, request: Request) -> Job:
        """Queue ``request``; ``InputError`` for an unknown model or a size off its grid, ``QueueFull`` when full."""
        model = self.default if request.model is None else request.model
        if model not in self.loaders:
            raise InputError(f"model must be one of {', '.join(sorted(self.loaders))}, got {model!r}")
        if model in self.models:  # a warm model: check the size now, not after the wait
            resolve_settings(request, self.models[model])
        seed = request.seed if request.seed is not None else int.from_bytes(os.urandom(8), "little")
        seeds = [(seed + k) % (validation.MAX_SEED + 1) for k in range(request.n)]
        job = Job(request, model, seeds)
        with self._cond:
            if len(self._queue) >= self.queue_size:
                self.counts["rejected"] += 1
                raise QueueFull(f"the queue is full ({self.queue_size} requests waiting); retry later",
                                self.retry_after())
            self._queue.append(job)
            self.counts["requests"] += 1
            self._cond.notify()
        return job

    def cancel(self, job: Job) -> None:
        """Give up on ``job``: a waiting job leaves the queue at once; a running batch stops at its next step when
        every request in it is cancelled."""
        with self._cond:
            if job.cancelled or job.future.done():
                return
            job.cancelled = True
            self.counts["cancelled"] += 1
            if job in self._queue:
                self._queue.remove(job)
                job.future.set_exception(Cancelled("the request was cancelled"))

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the running batch plus the batches queued ahead."""
        batches = 1 + len(self._queue) / self.max_batch
        return max(1, math.ceil(self._batch_seconds * batches))

    def status(self) -> dict:
        """Queue depth, loaded models, counters, memory now and at its peak (for /health)."""
        with self._cond:
            waiting, running = len(self._queue), sum(j.request.n for j in self._running)
        rss = rss_mib()
        return {"default_model": self.default, "models_loaded": sorted(self.models), "queue_waiting": waiting,
                "queue_capacity": self.queue_size, "images_running": running, "max_batch": self.max_batch,
                **self.counts, "rss_mib": rss and round(rss, 1), "peak_rss_mib": round(peak_rss_mib(), 1)}

    # ---- the worker ---------------------------------------------------------------------------------------
    def start(self) -> "Engine":
        """Start the worker thread (once)."""
        if self._thread is None:
            self._stop = False
            self._thread = threading.Thread(target=self._work, name="snapfusion-serve-worker", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop the worker after its current batch; waiting jobs fail with ``Cancelled``."""
        with self._cond:
            self._stop = True
            for job in self._queue:
                job.future.set_exception(Cancelled("the server is shutting down"))
            self._queue.clear()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _next_batch(self):
        """Wait for a job; return (pipeline, settings, jobs) for it and the queued jobs that share its settings."""
        while True:
            with self._cond:
                while not self._queue and not self._stop:
                    self._cond.wait()
                if self._stop:
                    return None
                first = self._queue.pop(0)
            try:
                pipe = self.load(first.model)
                settings = resolve_settings(first.request, pipe)
                break
            except Exception as err:  # noqa: BLE001  (handed to the request that caused it)
                first.future.set_exception(err)
        with self._cond:
            batch, images = [first], first.request.n
            for job in list(self._queue):
                if job.model != first.model or images + job.request.n > self.max_batch:
                    continue
                try:
                    same = resolve_settings(job.request, pipe) == settings
                except InputError as err:
                    self._queue.remove(job)
                    job.future.set_exception(err)
                    continue
                if same:
                    self._queue.remove(job)
                    batch.append(job)
                    images += job.request.n
            self._running = batch
        return pipe, settings, batch

    def _work(self) -> None:
        while True:
            nxt = self._next_batch()
            if nxt is None:
                return
            try:
                self._run(*nxt)
            except Exception as err:  # noqa: BLE001  (every job of the batch gets the error, the worker lives on)
                for job in nxt[2]:
                    if not job.future.done():
                        job.future.set_exception(err)
                if not isinstance(err, Cancelled):
                    self.counts["failed"] += len(nxt[2])
            finally:
                with self._cond:
                    self._running = []

    def _run(self, pipe, settings: dict, batch: list[Job]) -> None:
        """One ``generate`` call for the whole batch; each job gets its images as PNG bytes."""
        from snapfusion.pipeline import Timings, to_pil

        started = time.perf_counter()
        prompts = [job.request.prompt for job in batch for _ in range(job.request.n)]
        seeds = [s for job in batch for s in job.seeds]

        def stop_if_abandoned(*_):  # called at every sampler step
            if all(job.cancelled for job in batch):
                raise Cancelled("every request of the batch was cancelled")

        timings = Timings()
        images = to_pil(pipe.generate(prompts, seeds, callback=stop_if_abandoned, timings=timings, **settings))
        seconds = time.perf_counter() - started
        self._batch_seconds = seconds if not self._batch_seconds else 0.7 * self._batch_seconds + 0.3 * seconds
        self.batches.append((batch[0].model, len(batch), len(images)))
        self.counts["batches"] += 1
        self.counts["images"] += len(images)
        t = timings.as_dict()
        k = 0
        for job in batch:
            n = job.request.n
            meta = {"prompt": job.request.prompt, "model": job.model, **settings, "software": "snapfusion serve"}
            pngs = [png_bytes(im, {**meta, "seed": str(seed)}) for im, seed in zip(images[k:k + n], job.seeds)]
            k += n
            result = JobResult(pngs, job.seeds, {"model": job.model, **settings},
                               {"text_encoder": t["text_encoder"], "unet": t["unet_total"], "decoder": t["decoder"],
                                "total": t["total"], "queue_wait": started - job.enqueued, "batch_images": len(images)})
            if not job.future.done():
                job.future.set_result(result)
