"""The optional packages each export format needs, checked before any work (``pip install "snapfusion[export]"``)."""

from __future__ import annotations

import importlib.util

from snapfusion.errors import SnapFusionError

EXTRA = 'pip install "snapfusion[export]"'
# format -> packages it imports (onnxruntime: the parity check and the fp16/int8 conversions)
NEEDS = {"onnx": ("onnx", "onnxruntime"), "coreml": ("coremltools",)}  # diffusers, single-file: none


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None  # None also when sys.modules[name] is None
    except (ImportError, ValueError):
        return False


def require_export_packages(fmt: str) -> None:
    """Raise one line naming the first missing package of ``fmt`` and the extra that installs it."""
    for name in NEEDS.get(fmt, ()):
        if not _installed(name):
            raise SnapFusionError(f"export --format {fmt} needs the Python package '{name}', which is not "
                                  f"installed: {EXTRA}")
