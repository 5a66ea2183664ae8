"""Noise schedules in continuous time t in [0, 1] (t = 0: clean data, t = 1: pure noise).

Two forward processes (``shared/MDM_SPEC.md``):

* :class:`VPSchedule`, variance preserving, for image latents (and text latents under
  ``text_process: gaussian``)::

      z_t = sqrt(abar(t)) z_0 + sigma(t) eps,      sigma(t)^2 = 1 - abar(t),   eps ~ N(0, I)
      beta(t) = -d log abar(t) / dt                (the VP-SDE rate, Song et al. 2021)
      log_snr(t) = log abar(t) - log sigma(t)^2

  ``linear``: beta(t) = b0 + t (b1 - b0), so log abar(t) = -(b0 t + (b1 - b0) t^2 / 2).
  ``cosine`` (Nichol & Dhariwal 2021, s = 0.008): abar(t) = f(t) / f(0),
  f(t) = cos^2(theta(t)), theta(t) = (t + s) / (1 + s) * pi / 2, so
  beta(t) = pi / (1 + s) * tan(theta(t)).

* :class:`LogLinearNoise`, the total-noise schedule of SEDD's absorbing text process
  (Lou, Meng, Ermon 2023)::

      sigma(t) = -log(1 - (1 - eps) t),   dsigma(t) = (1 - eps) / (1 - (1 - eps) t)
      P(token is MASK at t) = 1 - exp(-sigma(t)) = (1 - eps) t

Every method takes a tensor (or a Python float) and returns a tensor of the same floating dtype
(a float gives float64); the arithmetic runs in float64 so that sigma(t) near t = 0 and the
cosine's tan near t = 1 keep their precision whatever the model dtype.

Endpoint clamps (VP). The cosine has abar(1) = 0 (log-SNR = -inf) and both kinds have
sigma(0) = 0, where eps-prediction and the PF-ODE drift are undefined. So:

* **Noisy end:** time is clamped at ``t_max``, the time where abar reaches ``alpha_bar_min``
  (for the cosine t_max ~ 1 - 6e-4 at the default 1e-6; the default linear never reaches it):
  abar, sigma and beta on [t_max, 1] are those of t_max. beta is *held* there rather than set to
  the 0 that a clamped abar would differentiate to, so the probability-flow drift stays
  continuous at t = 1 (it tends to a finite limit as t -> 1); the mismatch lives on an interval
  of length < 1e-3 that only the first solver step touches.
* **Clean end:** sigma^2 >= ``sigma_min``^2 (and abar = 1 - sigma^2 there); beta is the
  unclamped analytic value (the clamp acts on t < ~1e-7).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from mdm_dist.config import DiffusionConfig

Tensorish = torch.Tensor | float


def _as_f64(t: Tensorish) -> tuple[torch.Tensor, torch.dtype]:
    """(t as float64, dtype to return in)."""
    if isinstance(t, torch.Tensor):
        out_dtype = t.dtype if t.is_floating_point() else torch.float32
        return t.to(torch.float64), out_dtype
    return torch.tensor(float(t), dtype=torch.float64), torch.float64


class VPSchedule:
    """Variance-preserving schedule abar(t), sigma(t), beta(t), log_snr(t); see the module doc.

    Args:
        kind: ``"linear"`` or ``"cosine"``.
        beta_start, beta_end: b0, b1 of the linear kind (ignored by the cosine).
        s: the cosine offset (Nichol & Dhariwal's 0.008).
        alpha_bar_min: abar at the noisy end is at least this (log-SNR >= ~ -13.8 at 1e-6).
        sigma_min: sigma at the clean end is at least this.
    """

    def __init__(
        self,
        kind: str = "cosine",
        beta_start: float = 0.1,
        beta_end: float = 20.0,
        s: float = 0.008,
        alpha_bar_min: float = 1e-6,
        sigma_min: float = 1e-4,
    ) -> None:
        if kind not in ("linear", "cosine"):
            raise ValueError(f"VPSchedule kind = {kind!r}; allowed values: linear, cosine")
        if kind == "linear" and not (0 <= beta_start and beta_start + beta_end > 0 and beta_end >= 0):
            raise ValueError(f"linear VP needs beta_start, beta_end >= 0, got {beta_start}, {beta_end}")
        if not 0 < alpha_bar_min < 1 or not 0 < sigma_min < 1:
            raise ValueError("alpha_bar_min and sigma_min must lie in (0, 1)")
        self.kind, self.beta_start, self.beta_end, self.s = kind, beta_start, beta_end, s
        self.alpha_bar_min, self.sigma_min = alpha_bar_min, sigma_min
        self.t_max = self._t_at_alpha_bar(alpha_bar_min)

    def __repr__(self) -> str:
        return (f"VPSchedule(kind={self.kind!r}, beta_start={self.beta_start}, beta_end={self.beta_end}, "
                f"t_max={self.t_max:.6f})")

    # -- raw (unclamped) formulas, float64 -----------------------------------------------------

    def _theta(self, t: torch.Tensor) -> torch.Tensor:
        return (t + self.s) / (1 + self.s) * (math.pi / 2)

    def _log_alpha_bar_raw(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            b0, b1 = self.beta_start, self.beta_end
            return -(b0 * t + 0.5 * (b1 - b0) * t * t)
        theta0 = self._theta(torch.zeros_like(t))
        return 2 * (torch.log(torch.cos(self._theta(t))) - torch.log(torch.cos(theta0)))

    def _sigma2_raw(self, t: torch.Tensor) -> torch.Tensor:
        """1 - abar without cancellation near t = 0."""
        if self.kind == "linear":
            return -torch.expm1(self._log_alpha_bar_raw(t))
        # cos^2 a - cos^2 b = sin(b - a) sin(b + a)
        th, th0 = self._theta(t), self._theta(torch.zeros_like(t))
        return torch.sin(th - th0) * torch.sin(th + th0) / torch.cos(th0) ** 2

    def _beta_raw(self, t: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return self.beta_start + t * (self.beta_end - self.beta_start)
        return math.pi / (1 + self.s) * torch.tan(self._theta(t))

    def _t_at_alpha_bar(self, a: float) -> float:
        """The time where abar(t) = a, or 1.0 if abar(1) >= a."""
        if self.kind == "linear":
            b0, b1 = self.beta_start, self.beta_end
            c = -math.log(a)  # solve b0 t + (b1 - b0) t^2 / 2 = c
            if b0 + 0.5 * (b1 - b0) <= c:
                return 1.0
            q = 0.5 * (b1 - b0)
            t = c / b0 if abs(q) < 1e-12 else (-b0 + math.sqrt(b0 * b0 + 4 * q * c)) / (2 * q)
            return min(1.0, t)
        theta0 = (self.s / (1 + self.s)) * math.pi / 2
        theta = math.acos(math.sqrt(a) * math.cos(theta0))
        return min(1.0, theta * 2 / math.pi * (1 + self.s) - self.s)

    def _clamp_t(self, t: torch.Tensor) -> torch.Tensor:
        return t.clamp(0.0, self.t_max)

    # -- public ------------------------------------------------------------------------------

    def sigma2(self, t: Tensorish) -> torch.Tensor:
        """sigma(t)^2 = 1 - abar(t), clamped to [sigma_min^2, 1 - alpha_bar_min]."""
        t, dt = _as_f64(t)
        s2 = self._sigma2_raw(self._clamp_t(t))
        return s2.clamp(self.sigma_min**2, 1 - self.alpha_bar_min).to(dt)

    def alpha_bar(self, t: Tensorish) -> torch.Tensor:
        """abar(t), in [alpha_bar_min, 1 - sigma_min^2]; decreasing in t."""
        t, dt = _as_f64(t)
        a = torch.exp(self._log_alpha_bar_raw(self._clamp_t(t)))
        return a.clamp(self.alpha_bar_min, 1 - self.sigma_min**2).to(dt)

    def sigma(self, t: Tensorish) -> torch.Tensor:
        """sigma(t) = sqrt(1 - abar(t)) > 0."""
        return self.sigma2(t).sqrt()

    def beta(self, t: Tensorish) -> torch.Tensor:
        """beta(t) = -d log abar / dt (analytic), evaluated at min(t, t_max)."""
        t, dt = _as_f64(t)
        return self._beta_raw(self._clamp_t(t)).to(dt)

    def log_snr(self, t: Tensorish) -> torch.Tensor:
        """log SNR(t) = log abar(t) - log sigma(t)^2 (decreasing)."""
        t, dt = _as_f64(t)
        a = self.alpha_bar(t)
        return (torch.log(a) - torch.log(self.sigma2(t))).to(dt)


class LogLinearNoise:
    """SEDD's log-linear total noise for the absorbing text process; see the module doc.

    ``eps`` keeps sigma(1) = -log(eps) finite: at t = 1 a token is MASK with probability 1 - eps.
    """

    def __init__(self, eps: float = 1e-3) -> None:
        if not 0 < eps < 1:
            raise ValueError(f"LogLinearNoise eps must lie in (0, 1), got {eps}")
        self.eps = eps

    def __repr__(self) -> str:
        return f"LogLinearNoise(eps={self.eps})"

    def sigma(self, t: Tensorish) -> torch.Tensor:
        """Total noise sigma(t) = -log(1 - (1 - eps) t)."""
        t, dt = _as_f64(t)
        return (-torch.log1p(-(1 - self.eps) * t)).to(dt)

    def dsigma(self, t: Tensorish) -> torch.Tensor:
        """Rate dsigma/dt = (1 - eps) / (1 - (1 - eps) t)."""
        t, dt = _as_f64(t)
        return ((1 - self.eps) / (1 - (1 - self.eps) * t)).to(dt)

    def mask_prob(self, t: Tensorish) -> torch.Tensor:
        """P(MASK at t) = 1 - exp(-sigma(t)) (= (1 - eps) t)."""
        t, dt = _as_f64(t)
        return (-torch.expm1(-self.sigma(t))).to(dt)


class Schedules(NamedTuple):
    """The schedules a :class:`~mdm_dist.config.DiffusionConfig` names."""

    vp: VPSchedule  # image latents; text latents under text_process: gaussian
    text: LogLinearNoise  # absorbing text process


def from_config(cfg: DiffusionConfig) -> Schedules:
    """Build ``Schedules(vp, text)`` from ``cfg.schedule``, ``beta_start``/``beta_end`` and
    ``sedd_eps``."""
    return Schedules(
        vp=VPSchedule(cfg.schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end),
        text=LogLinearNoise(cfg.sedd_eps),
    )


__all__ = ["VPSchedule", "LogLinearNoise", "Schedules", "from_config"]
