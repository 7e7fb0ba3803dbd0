"""A diffusers ``scheduler/scheduler_config.json`` -> our sampling defaults and noise schedule.

Used: ``num_train_timesteps``, ``beta_start``, ``beta_end``, ``beta_schedule`` (linear, scaled_linear),
``timestep_spacing`` (leading, trailing, linspace), ``steps_offset``, ``prediction_type`` (epsilon, v_prediction),
``set_alpha_to_one`` (DDIM) and the class: DDIMScheduler samples with our DDIM, DPMSolverMultistepScheduler
(dpmsolver++, second order) with our DPM-Solver++(2M); any other class (SD-v1.5 folders name PNDMScheduler) keeps its
noise schedule and samples with DDIM. A value that would change the images and that we do not implement
(``trained_betas``, another beta schedule, ``clip_sample``, ``thresholding``, ``rescale_betas_zero_snr``, Karras
sigmas, another solver) is refused in one line instead of being ignored.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from snapfusion.errors import ConfigError
from snapfusion.schedule import ScheduleConfig

SUPPORTED = {"beta_schedule": ("linear", "scaled_linear"), "timestep_spacing": ("leading", "trailing", "linspace"),
             "prediction_type": ("epsilon", "v_prediction")}
# option -> the only value we reproduce
FIXED = {"trained_betas": None, "clip_sample": False, "thresholding": False, "rescale_betas_zero_snr": False,
         "use_karras_sigmas": False, "use_exponential_sigmas": False, "use_beta_sigmas": False,
         "use_lu_lambdas": False}
DPM_FIXED = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint", "lower_order_final": True,
             "final_sigmas_type": "zero", "euler_at_final": False, "variance_type": None}
# diffusers 0.42's defaults for a key the file leaves out (a config without "_class_name": SD-v1.5's values)
_COMMON = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
           "steps_offset": 0, "prediction_type": "epsilon", "timestep_spacing": "leading", "set_alpha_to_one": False,
           "clip_sample": False}
CLASS_DEFAULTS = {
    None: {**_COMMON, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "steps_offset": None},
    "DDIMScheduler": {**_COMMON, "clip_sample": True, "set_alpha_to_one": True},
    "DDPMScheduler": {**_COMMON, "clip_sample": True},
    "PNDMScheduler": _COMMON,
    "DPMSolverMultistepScheduler": {**_COMMON, "timestep_spacing": "linspace"},
    "EulerDiscreteScheduler": {**_COMMON, "timestep_spacing": "linspace"},
    "EulerAncestralDiscreteScheduler": {**_COMMON, "timestep_spacing": "linspace"},
    "LMSDiscreteScheduler": {**_COMMON, "timestep_spacing": "linspace"},
}


def scheduler_settings(data: Mapping[str, Any], *, where: str = "scheduler/scheduler_config.json") -> dict[str, Any]:
    """{"schedule": ScheduleConfig, "sampler", "timestep_spacing", "steps_offset", "set_alpha_to_one",
    "prediction_type"} from a diffusers scheduler config dict (keys it leaves out take the class's diffusers
    defaults); ``ConfigError`` for what we cannot reproduce."""
    cls = data.get("_class_name")
    if cls not in CLASS_DEFAULTS:
        raise ConfigError(f"{where}: scheduler class {cls!r} is not supported (one of "
                          f"{', '.join(c for c in CLASS_DEFAULTS if c)})")
    d = {**CLASS_DEFAULTS[cls], **{k: v for k, v in data.items() if not k.startswith("_")}}
    for key, allowed in SUPPORTED.items():
        if d[key] not in allowed:
            raise ConfigError(f"{where}: {key}={d[key]!r} is not supported (only {', '.join(allowed)})")
    for key, value in FIXED.items():
        if d.get(key, value) not in (value, None):
            raise ConfigError(f"{where}: {key}={d[key]!r} is not supported (only {value!r})"
                              + (" (diffusers' default for this class)" if key not in data else ""))
    sampler = "ddim"
    if cls == "DPMSolverMultistepScheduler":
        for key, value in DPM_FIXED.items():
            if key in d and d[key] != value:
                raise ConfigError(f"{where}: {cls} with {key}={d[key]!r} is not supported (only {value!r})")
        sampler = "dpmpp_2m"
    try:
        schedule = ScheduleConfig(num_train_timesteps=int(d["num_train_timesteps"]), beta_start=float(d["beta_start"]),
                                  beta_end=float(d["beta_end"]), beta_schedule=d["beta_schedule"])
        offset = None if d["steps_offset"] is None else int(d["steps_offset"])
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: bad value ({err})") from None
    if offset is not None and offset < 0:
        raise ConfigError(f"{where}: steps_offset must be >= 0, got {offset}")
    return {"schedule": schedule, "sampler": sampler, "timestep_spacing": d["timestep_spacing"],
            "steps_offset": offset, "set_alpha_to_one": bool(d["set_alpha_to_one"]) and sampler == "ddim",
            "prediction_type": d["prediction_type"]}
