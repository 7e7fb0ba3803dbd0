"""The losses module: the diffusion loss's weighting and target are chosen once, at construction."""

from typing import get_args

import pytest
import torch

from snapfusion.errors import ConfigError
from snapfusion.losses import PREDICTION_TYPES, WEIGHTINGS, DiffusionLoss, eps_mse_min_snr, v_mse_min_snr, v_weights
from snapfusion.sampling import PredictionType
from snapfusion.schedule import NoiseSchedule


def test_the_trained_prediction_types_are_the_ones_the_denoiser_converts():
    assert PREDICTION_TYPES == get_args(PredictionType)


def test_the_diffusion_loss_is_the_chosen_weighting_of_the_chosen_target():
    schedule = NoiseSchedule()
    gen = torch.Generator().manual_seed(0)
    x0, eps, pred = (torch.randn(4, 4, 8, 8, generator=gen) for _ in range(3))
    t = torch.tensor([0, 300, 700, 999])
    alpha, sigma = schedule.alpha_sigma(t)
    snr = (alpha / sigma) ** 2
    torch.testing.assert_close(DiffusionLoss(schedule, "epsilon", "min-snr", 5.0)(pred, x0, eps, t),
                               eps_mse_min_snr(pred, eps, snr, 5.0))
    v = schedule.velocity(x0, eps, t)
    torch.testing.assert_close(DiffusionLoss(schedule, "v_prediction", "min-snr", 5.0)(pred, x0, eps, t),
                               v_mse_min_snr(pred, v, snr, 5.0))
    # the v weighting on a v model: the plain v MSE, brought to eps space and weighted 1 / alpha^2 / mean
    got = DiffusionLoss(schedule, "v_prediction", "v", 5.0)(pred, x0, eps, t)
    torch.testing.assert_close(got, v_mse_min_snr(pred, v, snr, 0.0) * alpha ** 2 * v_weights(alpha, schedule))
    assert set(WEIGHTINGS) == {"min-snr", "v", "hybrid"}
    with pytest.raises(ConfigError, match="--loss-weighting"):
        DiffusionLoss(schedule, "epsilon", "snr")
    with pytest.raises(ConfigError, match="this one predicts sample"):
        DiffusionLoss(schedule, "sample")
