"""The server's settings, checked once before any model loads."""

from __future__ import annotations

import math
from dataclasses import dataclass

from snapfusion.errors import InputError

TOKEN_ENV = "SNAPFUSION_SERVE_TOKEN"  # the bearer token, when --token is not given


@dataclass(frozen=True)
class ServeConfig:
    """Where to listen, which model to keep warm, and the queue's limits."""

    host: str = "127.0.0.1"
    port: int = 7860
    model: str | None = None          # the default model: None = the embedded SnapFusion model
    device: str = "auto"              # auto, cpu or cuda[:N]
    dtype: str = "fp32"               # fp32, fp16 or bf16
    preload: bool = False             # also load the other embedded model at start, not on first use
    queue_size: int = 16              # requests waiting (not yet running) before 429
    max_batch: int = 4                # images generated together in one call
    timeout: float = 120.0            # seconds per request, queue wait included (504 after)
    token: str | None = None          # bearer token; None = no authentication

    def check(self) -> "ServeConfig":
        """The config itself, or ``InputError`` naming the first bad option (nothing loaded yet)."""
        if not self.host or any(c.isspace() for c in self.host):
            raise InputError(f"--host must be a host name or address, got {self.host!r}")
        if not 0 <= self.port <= 65535:
            raise InputError(f"--port must be between 0 and 65535, got {self.port}")
        if self.dtype not in ("fp32", "fp16", "bf16"):
            raise InputError(f"--dtype must be one of fp32, fp16, bf16, got {self.dtype!r}")
        if not 1 <= self.queue_size <= 10_000:
            raise InputError(f"--queue-size must be between 1 and 10000, got {self.queue_size}")
        if not 1 <= self.max_batch <= 64:
            raise InputError(f"--max-batch must be between 1 and 64, got {self.max_batch}")
        if not (math.isfinite(self.timeout) and self.timeout > 0):
            raise InputError(f"--timeout must be a positive number of seconds, got {self.timeout}")
        if self.token is not None and (not self.token or any(c.isspace() for c in self.token)):
            raise InputError("--token must be a non-empty string without spaces")
        return self
