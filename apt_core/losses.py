"""GAN loss terms of APT and AAPT, one function per term, all written for minimisation.

Logits are D's raw outputs [B] (one per sample). Every term returns a 0-d tensor: the batch mean.

- Non-saturating GAN (Goodfellow et al. 2014; APT eq. 3-4):
  `L_D = softplus(-D(x)) + softplus(D(G(z)))`, `L_G = softplus(-D(G(z)))`.
- Relativistic pairing (Jolicoeur-Martineau 2019; AAPT / SeedVR2, R3GAN):
  `L_D = softplus(-(D(x) - D(G(z))))`, `L_G = softplus(-(D(G(z)) - D(x)))`, real i paired with fake i.
- Approximated R1 (APT eq. 5): `L_aR1 = ||D(x, c) - D(x + sigma n, c)||^2`, n ~ N(0, I), the SAME t
  and c in both passes. `sigma` is used as the STANDARD DEVIATION of the perturbation (the paper's
  text says "variance"; public re-implementations use the std). For small sigma,
  `E_n L_aR1 ~= sigma^2 ||grad_x D(x)||^2`, i.e. the exact R1 penalty times sigma^2. The paper does
  NOT divide by sigma^2, so its lambda = 100 with sigma = 0.01 (images) / 0.1 (video) is an exact-R1
  weight of lambda * sigma^2; we keep the paper's semantics. The same term on fakes is "R2".
- Hinge (Lim & Ye 2017; SF-V): `L_D = relu(1 - D(x)) + relu(1 + D(G(z)))`, `L_G = -D(G(z))`.
- Exact R1 (Mescheder et al. 2018): `||grad_x D(x)||^2` by double backward, the reference aR1
  approximates (it needs create_graph, so it does not mix with FSDP / fused attention kernels).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
import torch.nn.functional as F


def d_loss_nonsaturating(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating D loss `mean softplus(-D(x)) + mean softplus(D(G(z)))`."""
    return d_loss_real(real) + d_loss_fake(fake)


def d_loss_real(real: torch.Tensor) -> torch.Tensor:
    """The real half of the non-saturating D loss, `mean softplus(-D(x))`."""
    return F.softplus(-real.float()).mean()


def d_loss_fake(fake: torch.Tensor) -> torch.Tensor:
    """The fake half of the non-saturating D loss, `mean softplus(D(G(z)))`."""
    return F.softplus(fake.float()).mean()


def g_loss_nonsaturating(fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating G loss `mean softplus(-D(G(z)))`."""
    return F.softplus(-fake.float()).mean()


def d_loss_relativistic(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing D loss `mean softplus(-(D(x) - D(G(z))))` (pairs share index)."""
    _check_pairs(real, fake)
    return F.softplus(-(real.float() - fake.float())).mean()


def g_loss_relativistic(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Relativistic pairing G loss `mean softplus(-(D(G(z)) - D(x)))` (pairs share index)."""
    _check_pairs(real, fake)
    return F.softplus(-(fake.float() - real.float())).mean()


def d_loss_hinge(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """Hinge D loss (SF-V) `mean relu(1 - D(x)) + mean relu(1 + D(G(z)))`."""
    return F.relu(1 - real.float()).mean() + d_loss_hinge_fake(fake)


def d_loss_hinge_fake(fake: torch.Tensor) -> torch.Tensor:
    """The fake half of the hinge D loss, `mean relu(1 + D(G(z)))`."""
    return F.relu(1 + fake.float()).mean()


def g_loss_hinge(fake: torch.Tensor) -> torch.Tensor:
    """Hinge G loss (SF-V) `-mean D(G(z))`."""
    return -fake.float().mean()


def _check_pairs(real: torch.Tensor, fake: torch.Tensor) -> None:
    if real.shape != fake.shape:
        raise ValueError(f"relativistic pairing needs real and fake logits of one shape, got {tuple(real.shape)} and {tuple(fake.shape)}")


def perturb(x: torch.Tensor, sigma: float, noise: torch.Tensor | None = None) -> torch.Tensor:
    """`x + sigma * n`, n ~ N(0, I) (or the given noise); sigma is a standard deviation."""
    if noise is None:
        noise = torch.randn_like(x)
    if noise.shape != x.shape:
        raise ValueError(f"perturbation noise must have x's shape {tuple(x.shape)}, got {tuple(noise.shape)}")
    return x + sigma * noise.to(x.dtype)


def approx_r1(d_clean: torch.Tensor, d_perturbed: torch.Tensor) -> torch.Tensor:
    """Approximated R1 (APT eq. 5): `mean_b (D(x_b) - D(x_b + sigma n_b))^2`, NOT divided by sigma^2.

    Use the same t and c for both logits; gradients flow through both passes. On fakes it is "aR2".
    """
    if d_clean.shape != d_perturbed.shape:
        raise ValueError(f"clean and perturbed logits must match, got {tuple(d_clean.shape)} and {tuple(d_perturbed.shape)}")
    return (d_clean.float() - d_perturbed.float()).pow(2).mean()


def exact_r1(
    discriminator: Callable[..., torch.Tensor], x: torch.Tensor, cond: Any, t: torch.Tensor
) -> torch.Tensor:
    """Exact R1: `mean_b ||grad_x D(x_b, c_b, t_b)||^2` by autograd.grad(create_graph=True).

    Samples are independent in D (no batch statistics), so the gradient of the summed logits
    holds each sample's own input gradient. Attention runs on SDPA's math kernel: the fused
    kernels (flash on CPU and CUDA, cuDNN, efficient) have no double backward.
    """
    x = x.detach().requires_grad_(True)
    with math_attention(x.device):
        return r1_penalty(discriminator(x, cond, t), x)


def r1_penalty(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`mean_b ||d logits_b / d x_b||^2` with create_graph=True; x must require grad and feed logits."""
    (grad,) = torch.autograd.grad(logits.sum(), x, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


def math_attention(device: torch.device | None = None) -> AbstractContextManager:
    """Context forcing SDPA's math kernel (the one with a double backward) on CPU and CUDA."""
    if device is not None and device.type not in ("cpu", "cuda"):
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


def d_accuracy(real: torch.Tensor, fake: torch.Tensor, relativistic: bool = False) -> torch.Tensor:
    """How often D is right: mean of [D(x) > 0] and [D(G) < 0], or [D(x) > D(G)] when relativistic."""
    if relativistic:
        return (real > fake).float().mean()
    return 0.5 * ((real > 0).float().mean() + (fake < 0).float().mean())
