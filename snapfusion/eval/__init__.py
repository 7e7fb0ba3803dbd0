"""Evaluation: scene-domain evaluators (CLIP score, domain FID, attribute probe), standard metrics, the runner.

See docs/evaluation.md. The domain FID is computed on the project's own scene-CLIP features, not Inception's.
"""

from snapfusion.eval.attributes import attribute_accuracy, check_scene
from snapfusion.eval.evaluators import (Evaluators, clip_features, clip_scores, domain_fid, evaluate_images,
                                        load_evaluators)
from snapfusion.eval.frechet import GaussianStats, fid_from_features, frechet_distance, gaussian_stats
from snapfusion.eval.runner import evaluate, parse_guidance_sweep, run_eval_command

__all__ = [
    "Evaluators", "GaussianStats", "attribute_accuracy", "check_scene", "clip_features", "clip_scores",
    "domain_fid", "evaluate", "evaluate_images", "fid_from_features", "frechet_distance", "gaussian_stats",
    "load_evaluators", "parse_guidance_sweep", "run_eval_command",
]
