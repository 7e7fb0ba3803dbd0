"""Safe weight I/O: safetensors only, explicit key-by-key loading with shape checks, atomic sharded saves.

No pickle anywhere. A missing path fails at once with the path in the message; a corrupt or truncated file,
a missing or unexpected key and a shape mismatch each raise ``WeightsError`` naming the file or the key.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from snapfusion.errors import WeightsError
from snapfusion.fileio import atomic_save_safetensors, atomic_write_text

INDEX_SUFFIX = ".index.json"
DEFAULT_MAX_SHARD_BYTES = 15 * 1024 * 1024  # shipped files stay under 16 MiB


def _require_file(path: Path) -> Path:
    if not path.exists():
        raise WeightsError(f"weight file not found: {path}")
    if not path.is_file():
        raise WeightsError(f"not a file: {path}")
    return path


def load_safetensors(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load one ``.safetensors`` file, or every shard named by a ``*.safetensors.index.json``."""
    path = Path(path)
    sharded = path.name.endswith(INDEX_SUFFIX) or ".safetensors.index." in path.name and path.suffix == ".json"
    return dequantize(_load_sharded(path, device) if sharded else _load_file(path, device))


def _load_file(path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    _require_file(path)
    size = path.stat().st_size
    if size < 8:
        raise WeightsError(f"corrupt or truncated safetensors file: {path} ({size} bytes)")
    header_len = int.from_bytes(path.open("rb").read(8), "little")
    if header_len <= 0 or 8 + header_len > size:
        raise WeightsError(f"corrupt or truncated safetensors file: {path} (bad header length)")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            header = json.loads(path.open("rb").read(8 + header_len)[8:])
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            if 8 + header_len + end > size:
                raise WeightsError(f"truncated safetensors file: {path} ({size} bytes, needs {8 + header_len + end})")
            return {k: f.get_tensor(k) for k in f.keys()}
    except WeightsError:
        raise
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise WeightsError(f"corrupt safetensors file: {path} ({type(err).__name__}: {err})") from None


def _load_sharded(index_path: Path, device: str | torch.device) -> dict[str, torch.Tensor]:
    _require_file(index_path)
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise WeightsError(f"malformed shard index {index_path}: {err}") from None
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        if not isinstance(shard, str) or Path(shard).name != shard:  # shards live beside their index, nowhere else
            raise WeightsError(f"malformed shard index {index_path}: shard name {shard!r} is not a file name")
        part = _load_file(index_path.parent / shard, device)  # raw: a weight and its int8 scale may be in two shards
        state.update(part)
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise WeightsError(f"{index_path}: keys listed in the index are missing from the shards: {missing[:5]}")
    return state


QSCALE_SUFFIX = ".__int8_scale__"  # key of the per-output-channel scale of an int8-quantized weight
INT8_MIN_NUMEL = 4096              # smaller tensors (norms, biases, embeddings of a few rows) stay in float


def quantize_int8(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Weight-only int8: every float weight of 2+ dims and at least ``INT8_MIN_NUMEL`` elements becomes int8 with a
    symmetric per-output-channel fp32 scale (key + ``QSCALE_SUFFIX``); the rest is returned unchanged. Halves an fp16
    file; ``dequantize`` (applied by ``load_safetensors``) restores float weights with an error of at most half a
    step (max|w| / 254) per element. Storage only: the networks still compute in float."""
    out: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if not v.is_floating_point() or v.dim() < 2 or v.numel() < INT8_MIN_NUMEL:
            out[k] = v
            continue
        w = v.detach().float()
        scale = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True).clamp_min(1e-12) / 127.0  # (out, 1, ...)
        out[k] = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
        out[k + QSCALE_SUFFIX] = scale
    return out


def dequantize(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of ``quantize_int8`` (float weights in the scales' dtype); a state without scales is unchanged."""
    scales = [k for k in state if k.endswith(QSCALE_SUFFIX)]
    for sk in scales:
        k = sk[: -len(QSCALE_SUFFIX)]
        if k not in state or state[k].dtype != torch.int8:
            raise WeightsError(f"int8 scale {sk!r} without its int8 weight {k!r}")
        w, scale = state[k], state.pop(sk)
        if not scale.is_floating_point() or tuple(scale.shape) != (w.shape[0],) + (1,) * (w.dim() - 1):
            raise WeightsError(f"int8 scale {sk!r} has shape {tuple(scale.shape)} / dtype {scale.dtype}; expected a "
                               f"float tensor of shape {(w.shape[0],) + (1,) * (w.dim() - 1)}")
        state[k] = (w.float() * scale.float()).to(scale.dtype)
    return state


def save_safetensors(
    state: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
    metadata: dict[str, str] | None = None,
    int8: bool = False,
) -> list[Path]:
    """Save ``state`` atomically to ``path`` (``name.safetensors``), sharded when it exceeds ``max_shard_bytes``.

    Sharded output is ``name-00001-of-0000N.safetensors`` plus ``name.safetensors.index.json``. Returns the files.
    ``int8``: weight-only int8 storage of the large weights (``quantize_int8``), the rest in ``dtype``.
    """
    path = Path(path)
    if not path.name.endswith(".safetensors"):
        raise ValueError(f"expected a .safetensors path, got {path}")
    tensors = {}
    for k, v in (quantize_int8(state) if int8 else state).items():
        v = v.detach().to("cpu")
        if dtype is not None and v.is_floating_point() and not k.endswith(QSCALE_SUFFIX):
            v = v.to(dtype)
        tensors[k] = v.contiguous()
    shards = _plan_shards(tensors, max_shard_bytes)
    stale = _existing_outputs(path)  # removed once the new files are in place: never a stale shard set behind
    if len(shards) == 1:
        _atomic_save(tensors, path, metadata)
        _remove(stale, keep=[path])
        return [path]
    stem = path.name[: -len(".safetensors")]
    written, weight_map = [], {}
    for i, keys in enumerate(shards):
        shard_path = path.with_name(f"{stem}-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        _atomic_save({k: tensors[k] for k in keys}, shard_path, metadata)
        weight_map.update({k: shard_path.name for k in keys})
        written.append(shard_path)
    index = path.with_name(path.name + INDEX_SUFFIX)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _atomic_write_text(index, json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    _remove(stale, keep=[*written, index])
    return [*written, index]


def _remove(paths: list[Path], keep: list[Path]) -> None:
    for p in paths:
        if p not in keep:
            p.unlink(missing_ok=True)


def _plan_shards(tensors: Mapping[str, torch.Tensor], max_bytes: int | None) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if max_bytes is not None and shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _existing_outputs(path: Path) -> list[Path]:
    stem = path.name[: -len(".safetensors")]
    found = [p for p in path.parent.glob(f"{stem}-*-of-*.safetensors")]
    for p in (path, path.with_name(path.name + INDEX_SUFFIX)):
        if p.exists():
            found.append(p)
    return found


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None) -> None:
    atomic_save_safetensors(tensors, path, metadata=metadata)


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def resolve_weights(folder: str | os.PathLike, stem: str, *, variants: tuple[str, ...] = ()) -> Path:
    """Return ``folder/stem.safetensors`` or its shard index, whichever exists, else the first variant's
    (``stem.fp16.safetensors``, ``stem.safetensors.index.fp16.json``: diffusers' naming); a clear error if none."""
    folder = Path(folder)
    single, index = folder / f"{stem}.safetensors", folder / f"{stem}.safetensors{INDEX_SUFFIX}"
    candidates = [single, index]
    for v in variants:
        candidates += [folder / f"{stem}.{v}.safetensors", folder / f"{stem}.safetensors.index.{v}.json"]
    for path in candidates:
        if path.is_file():
            return path
    if not folder.exists():
        raise WeightsError(f"model folder not found: {folder}")
    raise WeightsError(f"no weights in {folder}: expected {' or '.join(p.name for p in candidates)}")


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` strings of a ``.safetensors`` file (empty if it has none)."""
    path = _require_file(Path(path))
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for malformed files
        raise WeightsError(f"corrupt safetensors file: {path} ({type(err).__name__}: {err})") from None


def load_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], *, source: str = "weights") -> None:
    """Copy ``state`` into ``module`` key by key; missing/unexpected keys and shape mismatches raise, naming the key."""
    own = module.state_dict()
    _check_state(own, state, source)
    with torch.no_grad():
        for k, target in own.items():
            target.copy_(state[k].to(dtype=target.dtype, device=target.device))


def build_loaded(build: Callable[[], torch.nn.Module], state: Mapping[str, torch.Tensor], *,
                 source: str = "weights", device: str | torch.device = "cpu",
                 dtype: torch.dtype | None = None) -> torch.nn.Module:
    """``build()`` made on the meta device and given ``state``'s tensors: the same module as building it, casting
    its floating tensors to ``dtype`` and ``load_into``, without the random initialisation that loading overwrites.
    The checks are ``load_into``'s; a tensor the state does not hold (a non-persistent buffer) is an error."""
    with torch.device("meta"), _SkipInit():
        module = build()
    own = module.state_dict()
    _check_state(own, state, source)
    # always a fresh tensor from torch's allocator, as load_into's copy gives: kernels may take other paths (and
    # round differently) on a tensor that views a file buffer at an unaligned address
    values = {k: state[k].to(dtype=dtype if dtype is not None and t.is_floating_point() else t.dtype, device=device,
                             copy=True, memory_format=torch.contiguous_format) for k, t in own.items()}
    module.load_state_dict(values, assign=True)
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise WeightsError(f"{source}: '{left[0]}' is not among the saved tensors ({len(left)} in all)")
    return module


class _SkipInit(torch.overrides.TorchFunctionMode):
    """Makes ``torch.nn.init`` calls no-ops. On meta tensors they have nothing to fill, yet some (``normal_``) run
    through torch's Python references, whose first use imports torch._dynamo and sympy (about a second on a 2-core
    CPU); so does arithmetic on meta tensors, hence a module whose constructor computes on its tensors (the layout
    prior's ``randn(...) * 0.02``) is better built plainly and ``load_into``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__module__", None) == "torch.nn.init":
            return args[0] if args else kwargs["tensor"]
        return func(*args, **kwargs)


def _check_state(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise ``WeightsError`` for the first missing or unexpected key, scale-less int8 tensor or shape mismatch."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing:
        raise WeightsError(f"{source}: missing key '{missing[0]}' ({len(missing)} missing in all)")
    if unexpected:
        raise WeightsError(f"{source}: unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected in all)")
    for k, target in own.items():
        value = state[k]
        if value.dtype == torch.int8 and target.is_floating_point():  # quantized, but its scale is missing
            raise WeightsError(f"{source}: '{k}' is stored as int8 without its scale ('{k}{QSCALE_SUFFIX}')")
        if tuple(value.shape) != tuple(target.shape):
            raise WeightsError(
                f"{source}: shape mismatch for '{k}': file has {tuple(value.shape)}, model expects {tuple(target.shape)}"
            )


CONFIG_NAME = "config.json"
WEIGHTS_STEM = "model"


def save_pretrained(
    folder: str | os.PathLike,
    module: torch.nn.Module,
    config: object,
    *,
    kind: str,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int | None = DEFAULT_MAX_SHARD_BYTES,
    int8: bool = False,
) -> Path:
    """Save ``module`` as ``folder/model.safetensors`` (sharded if large) plus ``folder/config.json``."""
    from snapfusion.config import save_json, to_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(module.state_dict(), folder / f"{WEIGHTS_STEM}.safetensors", dtype=dtype,
                     max_shard_bytes=max_shard_bytes, int8=int8)
    save_json({"kind": kind, "config": to_dict(config)}, folder / CONFIG_NAME)
    return folder


def read_config(folder: str | os.PathLike, cls: type, *, kind: str):
    """Read ``folder/config.json`` written by ``save_pretrained`` and check that it holds a ``kind`` model."""
    from snapfusion.config import from_dict, load_json

    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"model folder not found: {folder}")
    data = load_json(folder / CONFIG_NAME)
    if data.get("kind") != kind or "config" not in data:
        raise WeightsError(f"{folder / CONFIG_NAME}: expected a '{kind}' config, found kind {data.get('kind')!r}")
    return from_dict(cls, data["config"], where=str(folder / CONFIG_NAME))
