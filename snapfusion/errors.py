"""Errors a user can cause. Commands print them as one line and exit non-zero."""


class SnapFusionError(Exception):
    """A user-facing error: bad input, a missing or corrupt file, an invalid config."""


class WeightsError(SnapFusionError):
    """A weight file is missing, corrupt, truncated, or does not match the model (names the key)."""


class ConfigError(SnapFusionError):
    """A config is invalid: unknown keys, wrong types, an impossible block structure."""


class InputError(SnapFusionError):
    """A user-supplied value is out of range or of the wrong type (names the setting)."""
