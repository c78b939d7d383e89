"""Gaussian diffusion math shared by training (the learned-sigma VB term) and sampling.

Follows DiT/IDDPM: the model predicts eps and, with learned sigma, a value v in
[-1, 1] per element that interpolates the log variance between the clipped
posterior variance and beta_t. The model knows nothing about noise; this module
turns its output into means, variances and loss terms.

Tables are copied to the device once (float64, T entries each); a lookup
gathers B values and computes in float32 as DiT does.
"""

from __future__ import annotations

import math

import torch

from .schedule import NoiseSchedule


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def approx_standard_normal_cdf(x):
    """A fast tanh approximation of the standard normal CDF (as IDDPM)."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    """log-likelihood of data x in [-1, 1] discretised to 256 bins under N(means, e^(2 log_scales))."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999,
        log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


def mean_flat(x):
    """Mean over all non-batch dimensions."""
    return x.mean(dim=list(range(1, x.ndim)))


class GaussianDiffusion:
    """Posterior, model mean/variance and VB terms for one schedule on one device.

    `timestep_map` maps this diffusion's step indices to the step the model was
    trained on (identity for training; a respaced sampler passes the kept steps)."""

    _TABLES = (
        "betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod", "sqrt_one_minus_alphas_cumprod",
        "sqrt_recip_alphas_cumprod", "sqrt_recipm1_alphas_cumprod", "posterior_variance",
        "posterior_log_variance_clipped", "posterior_mean_coef1", "posterior_mean_coef2",
    )

    def __init__(self, schedule: NoiseSchedule, device="cpu", learn_sigma: bool = True,
                 timestep_map: torch.Tensor | None = None):
        self.schedule = schedule
        self.T = schedule.T
        self.device = torch.device(device)
        self.learn_sigma = learn_sigma
        for name in self._TABLES:
            setattr(self, name, getattr(schedule, name).to(self.device))  # (T,) float64
        self.log_betas = torch.log(self.betas)
        if timestep_map is None:
            timestep_map = torch.arange(self.T)
        if timestep_map.shape != (self.T,):
            raise ValueError(f"timestep_map must have shape ({self.T},), got {tuple(timestep_map.shape)}")
        self.timestep_map = timestep_map.to(device=self.device, dtype=torch.int64)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as float32, broadcastable against `like` ([B, 1, 1, ...])."""
        return table[t].float().view(-1, *([1] * (like.ndim - 1)))

    def q_sample(self, x0, t, noise):
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise (unfused; for sampling and tests)."""
        return self._at(self.sqrt_alphas_cumprod, t, x0) * x0 + self._at(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def q_posterior_mean_variance(self, x0, x_t, t):
        """Mean, variance and clipped log variance of q(x_{t-1} | x_t, x0)."""
        mean = self._at(self.posterior_mean_coef1, t, x_t) * x0 + self._at(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, self._at(self.posterior_variance, t, x_t), self._at(self.posterior_log_variance_clipped, t, x_t)

    def pred_xstart_from_eps(self, x_t, t, eps):
        return self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps

    def eps_from_pred_xstart(self, x_t, t, pred_xstart):
        return (self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart) / self._at(
            self.sqrt_recipm1_alphas_cumprod, t, x_t)

    def split_output(self, model_out, x_t):
        """(eps, v) from the model output: [B, 2C, ...] with learned sigma, [B, C, ...] without."""
        C = x_t.shape[1]
        if self.learn_sigma:
            if model_out.shape[1] != 2 * C:
                raise ValueError(f"learned sigma expects {2 * C} output channels, got {model_out.shape[1]}")
            return model_out[:, :C], model_out[:, C:]
        if model_out.shape[1] != C:
            raise ValueError(f"expected {C} output channels, got {model_out.shape[1]}")
        return model_out, None

    def p_mean_variance(self, model_out, x_t, t, clip_denoised: bool = False, denoised_fn=None):
        """The model's p(x_{t-1} | x_t): dict of mean, variance, log_variance, pred_xstart, eps (float32)."""
        eps, v = self.split_output(model_out.float(), x_t)
        if v is not None:
            min_log = self._at(self.posterior_log_variance_clipped, t, x_t)
            max_log = self._at(self.log_betas, t, x_t)
            frac = (v + 1.0) / 2.0
            log_variance = frac * max_log + (1.0 - frac) * min_log
        else:
            # Fixed "large" variance as DiT without learned sigma: beta_t, with the posterior's at t = 0.
            fixed = torch.cat([self.posterior_variance[1:2], self.betas[1:]])
            log_variance = torch.log(self._at(fixed, t, x_t)).expand_as(x_t)
        pred_xstart = self.pred_xstart_from_eps(x_t.float(), t, eps)
        if denoised_fn is not None:
            pred_xstart = denoised_fn(pred_xstart)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x_t.float(), t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def vb_terms_bpd(self, model_out, x0, x_t, t):
        """Per-sample variational bound term in bits per dimension: KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t))
        for t > 0 and the discretised decoder NLL at t = 0. Pass model_out with eps detached so that
        only the variance learns from this term (DiT/IDDPM's hybrid loss)."""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x0.float(), x_t.float(), t)
        out = self.p_mean_variance(model_out, x_t, t)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"])) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0.float(), out["mean"], 0.5 * out["log_variance"]))
        nll = nll / math.log(2.0)
        return torch.where(t == 0, nll, kl)

    def training_losses(self, model, x0, y, fused, step: int, offset: int = 0,
                        drop: torch.Tensor | None = None, strategy_step: int | None = None,
                        text: tuple | None = None) -> dict:
        """The DiT/IDDPM hybrid objective on one micro-batch, built on the fused SpeeD step.

        x0 [B, C, H, W] clean latents, y int64 [B] labels, drop bool [B] or None (label dropout
        decided by the caller, for reproducible runs); a text-to-image model gets `text` = (tokens [B, L, D],
        pooled [B, D]) instead of y (caption dropout applied by the caller). `fused` (speed_fast.ops.FusedSpeeD) draws
        t from the strategy's P(t) and eps from the counter RNG at (step, offset), and computes
        the weighted MSE (a step-dependent P(t) is taken at `strategy_step`, default `step`); the
        learned-sigma VB term is added unweighted, with eps detached so
        that only the variance output learns from it (as IDDPM). Returns
            loss  fp32 [] differentiable: mean_b w(t_b) mse_b + mean_b vb_b
            mse   fp32 [B] unweighted per-sample MSE of eps (detached)
            vb    fp32 [B] per-sample VB term in bits/dim (zeros without learned sigma; detached)
            t     int64 [B]
        """
        t, x_t = fused.sample_and_noise(x0, step=step, offset=offset, strategy_step=strategy_step)  # (B,), (B,C,H,W)
        if text is not None:
            out = model(x_t, t, *text)  # (B, 2C or C, H, W)
        else:
            out = model(x_t, t, y, drop) if drop is not None else model(x_t, t, y)
        eps, v = self.split_output(out, x_t)
        mse_loss, mse = fused.loss(eps, t, step=step, offset=offset)
        if v is None:
            return {"loss": mse_loss, "mse": mse, "vb": torch.zeros_like(mse), "t": t}
        vb = self.vb_terms_bpd(torch.cat([eps.detach(), v], dim=1), x0, x_t, t)  # (B,)
        return {"loss": mse_loss + vb.mean(), "mse": mse, "vb": vb.detach(), "t": t}
