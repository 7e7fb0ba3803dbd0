"""Full-size SD-v1.5 parity: our UNet vs diffusers UNet2DConditionModel on the same random weights (CPU, fp32).

Usage: HF_HUB_OFFLINE=1 PYTHONPATH=. nice python scripts/check_unet_parity_full.py [--size 32]   (~8 GB RAM, a few minutes)
"""

import argparse
import time

import torch
from diffusers import UNet2DConditionModel

from snapfusion.convert.unet_keys import diffusers_config_from_ours, diffusers_to_ours, unet_config_from_diffusers
from snapfusion.models.unet import UNet, num_parameters, sd15, snapfusion


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=32, help="latent height and width (64 = 512x512 images)")
    args = parser.parse_args()
    with torch.device("meta"):
        print(f"parameters: sd15 {num_parameters(UNet(sd15())):,}  snapfusion {num_parameters(UNet(snapfusion())):,}")
    torch.manual_seed(0)
    cfg = sd15()
    ref = UNet2DConditionModel.from_config(diffusers_config_from_ours(cfg)).eval()
    assert unet_config_from_diffusers(dict(ref.config)) == cfg
    with torch.no_grad():  # perturb every weight so that zero-initialised layers cannot hide a wrong mapping
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = UNet(cfg).eval()
    ours.load_state_dict(diffusers_to_ours(ref.state_dict(), cfg), strict=True)
    print(f"diffusers parameters {num_parameters(ref):,}")
    g = torch.Generator().manual_seed(1)
    z = torch.randn(1, 4, args.size, args.size, generator=g)
    ctx = torch.randn(1, 77, 768, generator=g)
    t = torch.tensor([500.0])
    with torch.no_grad():
        a, b = ours(z, t, ctx), ref(z, t, ctx).sample
    print(f"latent 1x4x{args.size}x{args.size}: max |ours - diffusers| = {(a - b).abs().max().item():.3e}, "
          f"max |output| = {b.abs().max().item():.3f}, mean |output| = {b.abs().mean().item():.3f}")
    print(f"CPU seconds per forward, second call: ours {_seconds(ours, z, t, ctx):.1f}, "
          f"diffusers {_seconds(ref, z, t, ctx):.1f}")


def _seconds(model: torch.nn.Module, *inputs: torch.Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        model(*inputs)
        return time.perf_counter() - start


if __name__ == "__main__":
    main()
