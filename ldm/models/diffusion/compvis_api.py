"""The CompVis / SD 2 sampling and logging surface of ``DDPM`` and ``LatentDiffusion``.

Tools written against CompVis' ``ldm`` call these methods by name: ``q_posterior``, ``p_mean_variance``,
``p_sample``, ``p_sample_loop``, ``sample``, ``progressive_denoising``, ``sample_log``,
``get_unconditional_conditioning`` and ``log_images`` (what image-logging callbacks save).

The sampler here is the ancestral one of Ho et al. (2020), over every trained timestep:
x_{t-1} ~ q(x_{t-1} | x_t, x0_hat), the Gaussian posterior of the forward process around the
network's clean estimate x0_hat. Its tables are the schedule buffers (``schedule.schedule_tables``),
x0_hat comes from the network output with the same conversion training uses (``schedule.to_x0_eps``,
eps / v / x0), and one step (:func:`posterior_draw`) and one loop (``_reverse_chain``) serve every
entry point. Fast samplers (DDIM, PLMS, DPM-Solver, ...) live in ``ldm.models.diffusion.sampling``.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from omegaconf import OmegaConf
from tqdm.auto import tqdm

from ldm.models.diffusion import schedule as sched
from ldm.util import isimage, ismap, log_txt_as_img

TEXT_KEYS = ("caption", "txt")
CLASS_KEYS = ("class_label", "cls")


def extract(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``table[t]`` per batch item, shaped [B, 1, ...] to broadcast against ``like``."""
    return table[t].to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def noise_like(like: torch.Tensor, repeat: bool = False) -> torch.Tensor:
    """Standard normal noise of ``like``'s shape; ``repeat``: one draw shared by the whole batch."""
    if repeat:
        one = torch.randn((1, *like.shape[1:]), device=like.device, dtype=like.dtype)
        return one.repeat(like.shape[0], *([1] * (like.dim() - 1)))
    return torch.randn_like(like)


def posterior_draw(mean: torch.Tensor, log_variance: torch.Tensor, t: torch.Tensor, repeat_noise: bool = False,
                   temperature: float = 1.0, noise_dropout: float = 0.0) -> torch.Tensor:
    """One ancestral step: ``mean + exp(log_variance / 2) * temperature * noise``, no noise where t == 0."""
    noise = noise_like(mean, repeat_noise) * temperature
    if noise_dropout > 0.0:
        noise = F.dropout(noise, p=noise_dropout)
    nonzero = (t != 0).to(mean.dtype).reshape(-1, *([1] * (mean.dim() - 1)))
    return mean + nonzero * (0.5 * log_variance).exp() * noise


def cut_batch(cond: Any, n: int) -> Any:
    """The first ``n`` items of a conditioning: a tensor, a list of tensors / captions, or a dict of those."""
    if cond is None:
        return None
    if isinstance(cond, dict):
        return {k: cut_batch(v, n) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        if cond and all(isinstance(c, (torch.Tensor, dict, list, tuple)) for c in cond):
            return [cut_batch(c, n) for c in cond]
        return list(cond)[:n]
    return cond[:n] if hasattr(cond, "__getitem__") else cond


def repeat_batch(c: Any, n: int, device: Any) -> Any:
    """A conditioning of batch 1 (or already ``n``) as batch ``n`` on ``device``."""
    if isinstance(c, dict):
        return {k: repeat_batch(v, n, device) for k, v in c.items()}
    if isinstance(c, (list, tuple)):
        return [repeat_batch(v, n, device) for v in c]
    if c.shape[0] == n:
        return c.to(device)
    if c.shape[0] != 1:
        raise ValueError(f"the null conditioning has batch {c.shape[0]}; give one null label (batch 1) or {n}")
    return c.repeat(n, *([1] * (c.dim() - 1))).to(device)


class GuidedConditioning:
    """Conditioning with classifier-free guidance for the ancestral sampler: the network output is
    ``out(uncond) + scale * (out(cond) - out(uncond))``, both branches in one batched call."""

    def __init__(self, cond: Any, uncond: Any, scale: float):
        self.cond, self.uncond, self.scale = cond, uncond, float(scale)


def select_keys(log: dict, return_keys: Optional[Sequence[str]]) -> dict:
    """CompVis' ``return_keys``: the named entries, or everything when none of them was logged."""
    if not return_keys:
        return log
    picked = {k: log[k] for k in return_keys if k in log}
    return picked or log


def rows_grid(images: torch.Tensor) -> torch.Tensor:
    """[n_steps, B, C, H, W] -> one grid image, a row of ``n_steps`` images per batch item."""
    from ldm.image_io import make_grid

    n_steps = images.shape[0]
    return make_grid(rearrange(images, "n b c h w -> (b n) c h w"), n_steps)


class DDPMSamplingMixin:
    """Posterior, ancestral sampling and ``log_images`` of an unconditional ``DDPM`` (data space)."""

    # ---- the forward process and its posterior ------------------------------------------
    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """q(x_t | x_0): (mean, variance, log_variance)."""
        mean = extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
        variance = extract(1.0 - self.alphas_cumprod, t, x_start)
        log_variance = extract(self.log_one_minus_alphas_cumprod, t, x_start)
        return mean, variance, log_variance

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """q(x_{t-1} | x_t, x_0): (mean, variance, log_variance_clipped); variance 0 (log clipped) at t = 0."""
        mean = extract(self.posterior_mean_coef1, t, x_t) * x_start + extract(self.posterior_mean_coef2, t, x_t) * x_t
        return mean, extract(self.posterior_variance, t, x_t), extract(self.posterior_log_variance_clipped, t, x_t)

    def predict_x0_from_output(self, x_t: torch.Tensor, t: torch.Tensor, model_out: torch.Tensor) -> torch.Tensor:
        """The clean estimate implied by a network output of this model's parameterization (eps, v or x0)."""
        return sched.to_x0_eps(model_out, x_t, self.alphas_cumprod[t], self.parameterization)[0]

    def _predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        a = extract(self.alphas_cumprod, t, x_t)
        return (x_t - a.sqrt() * pred_xstart) / (1 - a).sqrt()

    # ---- ancestral sampling (unconditional DDPM signatures) -------------------------------
    def p_mean_variance(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool):
        x_recon = self.predict_x0_from_output(x, t, self.model(x, t))
        if clip_denoised:
            x_recon = x_recon.clamp(-1.0, 1.0)
        return self.q_posterior(x_start=x_recon, x_t=x, t=t)

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True, repeat_noise: bool = False):
        mean, _, log_variance = self.p_mean_variance(x=x, t=t, clip_denoised=clip_denoised)
        return posterior_draw(mean, log_variance, t, repeat_noise)

    @torch.no_grad()
    def p_sample_loop(self, shape: Sequence[int], return_intermediates: bool = False):
        img = torch.randn(tuple(shape), device=self.betas.device)

        def step(x, ts):
            return self.p_sample(x, ts, clip_denoised=self.clip_denoised), None

        out, logged = self._reverse_chain(img, self.num_timesteps, step, desc="Sampling t", verbose=True,
                                          log_every_t=self.log_every_t)
        return (out, [img, *logged]) if return_intermediates else out

    @torch.no_grad()
    def sample(self, batch_size: int = 16, return_intermediates: bool = False):
        shape = (batch_size, self.channels, self.image_size, self.image_size)
        return self.p_sample_loop(shape, return_intermediates=return_intermediates)

    def _reverse_chain(self, img: torch.Tensor, steps: int, step: Callable, *, desc: str, verbose: bool,
                       log_every_t: int, callback: Optional[Callable] = None, img_callback: Optional[Callable] = None,
                       mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
                       record_x0: bool = False) -> tuple[torch.Tensor, list]:
        """Run ``step(x_t, t) -> (x_{t-1}, x0_hat)`` for t = steps-1 .. 0.

        Logs x_{t-1} (or x0_hat with ``record_x0``) where ``t % log_every_t == 0`` and at the first step.
        ``mask`` (1 = keep): after each step the kept region is ``x0`` noised to the level just reached
        (``x0`` itself after the last step), so it ends exactly at ``x0``.
        """
        if not 1 <= steps <= self.num_timesteps:
            raise ValueError(f"timesteps must be in [1, {self.num_timesteps}], got {steps}")
        if mask is not None:
            if x0 is None:
                raise ValueError("mask needs x0 (the latent whose masked-in region is kept)")
            mask, x0 = mask.to(img), x0.to(img)
        logged = []
        for i in tqdm(range(steps - 1, -1, -1), desc=desc, total=steps, disable=not verbose, leave=False):
            ts = torch.full((img.shape[0],), i, device=img.device, dtype=torch.long)
            img, x0_hat = step(img, ts)
            if mask is not None:
                known = x0 if i == 0 else self.q_sample(x0, ts - 1)
                img = known * mask + (1.0 - mask) * img
            if i % log_every_t == 0 or i == steps - 1:
                logged.append(x0_hat if record_x0 else img)
            if callback:
                callback(i)
            if img_callback:
                img_callback(img, i)
        return img, logged

    # ---- logging ----------------------------------------------------------------------
    def _get_rows_from_list(self, samples: Sequence[torch.Tensor]) -> torch.Tensor:
        return rows_grid(torch.stack(list(samples)))

    def _diffusion_steps(self) -> list[int]:
        return [t for t in range(self.num_timesteps) if t % self.log_every_t == 0 or t == self.num_timesteps - 1]

    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, n_row: int = 2, sample: bool = True, return_keys=None, **kwargs):
        """inputs, diffusion_row (forward noising), samples and denoise_row (reverse chain)."""
        log = {}
        x = self.get_input(batch, self.first_stage_key)
        N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
        x = x.to(self.device)[:N]
        log["inputs"] = x
        x_start = x[:n_row]
        row = []
        for t in self._diffusion_steps():
            ts = torch.full((n_row,), t, device=self.device, dtype=torch.long)
            row.append(self.q_sample(x_start=x_start, t=ts, noise=torch.randn_like(x_start)))
        log["diffusion_row"] = self._get_rows_from_list(row)
        if sample:
            with self.ema_scope("Plotting"):
                samples, denoise_row = self.sample(batch_size=N, return_intermediates=True)
            log["samples"] = samples
            log["denoise_row"] = self._get_rows_from_list(denoise_row)
        return select_keys(log, return_keys)


class LatentSamplingMixin:
    """The conditional (``LatentDiffusion``) signatures: ancestral sampling with conditioning, DDIM through
    ``sample_log``, the null conditioning of classifier-free guidance and ``log_images``."""

    # CompVis' shortened conditioning schedules (num_timesteps_cond > 1) are not supported.
    shorten_cond_schedule = False

    def _model_output(self, x: torch.Tensor, t: torch.Tensor, c: Any) -> torch.Tensor:
        if not isinstance(c, GuidedConditioning):
            return self.apply_model(x, t, c)
        from ldm.models.diffusion.sampling.guidance import _cat_cond

        out_uncond, out_cond = self.apply_model(torch.cat([x, x]), torch.cat([t, t]), _cat_cond(c.uncond, c.cond)).chunk(2)
        return out_uncond + c.scale * (out_cond - out_uncond)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        quantize = getattr(self.first_stage_model, "quantize", None)
        if not callable(quantize):
            raise NotImplementedError(f"quantize_denoised needs a VQ first stage (with .quantize); this model's is "
                                      f"{type(self.first_stage_model).__name__}")
        return quantize(x)[0]

    def p_mean_variance(self, x: torch.Tensor, c: Any, t: torch.Tensor, clip_denoised: bool, return_codebook_ids: bool = False,
                        quantize_denoised: bool = False, return_x0: bool = False, score_corrector=None, corrector_kwargs=None):
        """The posterior around the network's x0 estimate: (mean, variance, log_variance[, x0])."""
        if return_codebook_ids:
            raise NotImplementedError("return_codebook_ids: codebook prediction is not supported")
        model_out = self._model_output(x, t, c)
        if score_corrector is not None:
            if self.parameterization != "eps":
                raise ValueError("score_corrector needs an eps-prediction model")
            plain = c.cond if isinstance(c, GuidedConditioning) else c
            model_out = score_corrector.modify_score(self, model_out, x, t, plain, **(corrector_kwargs or {}))
        x_recon = self.predict_x0_from_output(x, t, model_out)
        if clip_denoised:
            x_recon = x_recon.clamp(-1.0, 1.0)
        if quantize_denoised:
            x_recon = self._quantize(x_recon)
        mean, variance, log_variance = self.q_posterior(x_start=x_recon, x_t=x, t=t)
        if return_x0:
            return mean, variance, log_variance, x_recon
        return mean, variance, log_variance

    @torch.no_grad()
    def p_sample(self, x: torch.Tensor, c: Any, t: torch.Tensor, clip_denoised: bool = False, repeat_noise: bool = False,
                 return_codebook_ids: bool = False, quantize_denoised: bool = False, return_x0: bool = False,
                 temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector=None, corrector_kwargs=None):
        """x_{t-1} ~ q(x_{t-1} | x_t, x0_hat) (and x0_hat with ``return_x0``)."""
        out = self.p_mean_variance(x=x, c=c, t=t, clip_denoised=clip_denoised, return_codebook_ids=return_codebook_ids,
                                   quantize_denoised=quantize_denoised, return_x0=return_x0,
                                   score_corrector=score_corrector, corrector_kwargs=corrector_kwargs)
        sample = posterior_draw(out[0], out[2], t, repeat_noise, temperature, noise_dropout)
        return (sample, out[3]) if return_x0 else sample

    @torch.no_grad()
    def progressive_denoising(self, cond: Any, shape: Sequence[int], verbose: bool = True, callback=None,
                              quantize_denoised: bool = False, img_callback=None, mask=None, x0=None, temperature=1.0,
                              noise_dropout: float = 0.0, score_corrector=None, corrector_kwargs=None,
                              batch_size: Optional[int] = None, x_T: Optional[torch.Tensor] = None,
                              start_T: Optional[int] = None, log_every_t: Optional[int] = None):
        """Ancestral sampling that logs the x0 estimates: (x_0, [x0_hat at the logged steps]).

        With ``batch_size``, ``shape`` is one item's (C, H, W); else the batch's. ``temperature``: a number
        or one value per timestep."""
        log_every_t = log_every_t or self.log_every_t
        timesteps = self.num_timesteps if start_T is None else min(self.num_timesteps, start_T)
        if batch_size is not None:
            shape = [batch_size, *shape]
        else:
            batch_size = shape[0]
        img = torch.randn(tuple(shape), device=self.device) if x_T is None else x_T.to(self.device)
        cond = cut_batch(cond, batch_size)
        temps = [float(temperature)] * self.num_timesteps if isinstance(temperature, (int, float)) else list(temperature)

        def step(x, ts):
            return self.p_sample(x, cond, ts, clip_denoised=self.clip_denoised, quantize_denoised=quantize_denoised,
                                 return_x0=True, temperature=temps[int(ts[0])], noise_dropout=noise_dropout,
                                 score_corrector=score_corrector, corrector_kwargs=corrector_kwargs)

        return self._reverse_chain(img, timesteps, step, desc="Progressive Generation", verbose=verbose,
                                   log_every_t=log_every_t, callback=callback, img_callback=img_callback,
                                   mask=mask, x0=x0, record_x0=True)

    @torch.no_grad()
    def p_sample_loop(self, cond: Any, shape: Sequence[int], return_intermediates: bool = False, x_T=None, verbose: bool = True,
                      callback=None, timesteps: Optional[int] = None, quantize_denoised: bool = False, mask=None, x0=None,
                      img_callback=None, start_T: Optional[int] = None, log_every_t: Optional[int] = None):
        """Ancestral sampling from ``x_T`` (default: fresh noise of ``shape``) over ``timesteps`` steps.

        Returns x_0, and with ``return_intermediates`` also [x_T, x_{t-1} at the logged steps]."""
        log_every_t = log_every_t or self.log_every_t
        img = torch.randn(tuple(shape), device=self.betas.device) if x_T is None else x_T.to(self.betas.device)
        timesteps = self.num_timesteps if timesteps is None else timesteps
        if start_T is not None:
            timesteps = min(timesteps, start_T)

        def step(x, ts):
            return self.p_sample(x, cond, ts, clip_denoised=self.clip_denoised, quantize_denoised=quantize_denoised), None

        out, logged = self._reverse_chain(img, timesteps, step, desc="Sampling t", verbose=verbose, log_every_t=log_every_t,
                                          callback=callback, img_callback=img_callback, mask=mask, x0=x0)
        return (out, [img, *logged]) if return_intermediates else out

    @torch.no_grad()
    def sample(self, cond: Any, batch_size: int = 16, return_intermediates: bool = False, x_T=None, verbose: bool = True,
               timesteps: Optional[int] = None, quantize_denoised: bool = False, mask=None, x0=None, shape=None, *,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
               eta: Optional[float] = None, callback=None, img_callback=None, start_T: Optional[int] = None,
               log_every_t: Optional[int] = None):
        """Ancestral sampling of ``batch_size`` latents (``shape``: the full [B, C, H, W], default from the config).

        Beyond CompVis' arguments: classifier-free guidance (``unconditional_guidance_scale`` with
        ``unconditional_conditioning``) and ``p_sample_loop``'s callbacks. ``eta`` is accepted because
        ``sample_log`` passes it; it changes nothing (the step noise is the posterior's). Any other keyword is
        a TypeError."""
        if shape is None:
            shape = (batch_size, self.channels, self.image_size, self.image_size)
        cond = cut_batch(cond, batch_size)
        if unconditional_conditioning is not None and unconditional_guidance_scale != 1.0:
            cond = GuidedConditioning(cond, cut_batch(unconditional_conditioning, batch_size), unconditional_guidance_scale)
        return self.p_sample_loop(cond, shape, return_intermediates=return_intermediates, x_T=x_T, verbose=verbose,
                                  timesteps=timesteps, quantize_denoised=quantize_denoised, mask=mask, x0=x0,
                                  callback=callback, img_callback=img_callback, start_T=start_T, log_every_t=log_every_t)

    @torch.no_grad()
    def sample_log(self, cond: Any, batch_size: int, ddim: bool, ddim_steps: int, **kwargs):
        """(samples, intermediates): ``DDIMSampler(self).sample`` in ``ddim_steps`` steps when ``ddim``, else
        :meth:`sample` (ancestral, every timestep). ``kwargs`` go to the chosen sampler."""
        if ddim:
            from ldm.models.diffusion.ddim import DDIMSampler

            shape = (self.channels, self.image_size, self.image_size)
            return DDIMSampler(self).sample(ddim_steps, batch_size, shape, cond, verbose=False, **kwargs)
        return self.sample(cond=cond, batch_size=batch_size, return_intermediates=True, **kwargs)

    @torch.no_grad()
    def get_unconditional_conditioning(self, batch_size: int, null_label: Any = None):
        """The conditioning of ``null_label`` (encoded once, repeated ``batch_size`` times), as classifier-free
        guidance uses it. Without a label: the class embedder's null class, the ``ucg_training`` null value of
        the conditioning key, or the empty caption "" for a text encoder."""
        key = self.cond_stage_key
        if null_label is None:
            stage_null = getattr(self.cond_stage_model, "get_unconditional_conditioning", None)
            if key in CLASS_KEYS and callable(stage_null):
                return self.get_learned_conditioning(stage_null(batch_size, device=self.device))
            spec = self.ucg_training.get(key) or {}
            if "val" in spec:
                null_label = spec["val"]
            elif hasattr(self.cond_stage_model, "tokenizer"):
                null_label = ""
            else:
                raise NotImplementedError(f"no null conditioning known for cond_stage_key {key!r}; pass null_label")
        xc = null_label
        if OmegaConf.is_config(xc):  # e.g. unconditional_guidance_label from a YAML config
            xc = OmegaConf.to_container(xc)
        if isinstance(xc, str):
            xc = [xc]
        elif hasattr(xc, "to"):
            xc = xc.to(self.device)
        return repeat_batch(self.get_learned_conditioning(xc), batch_size, self.device)

    # ---- logging ----------------------------------------------------------------------
    def _get_denoise_row_from_list(self, samples: Sequence[torch.Tensor], desc: str = "",
                                   force_no_decoder_quantization: bool = False) -> torch.Tensor:
        rows = [self.decode_first_stage(z.to(self.device), force_not_quantize=force_no_decoder_quantization)
                for z in tqdm(samples, desc=desc, disable=True)]
        return rows_grid(torch.stack(rows))

    @torch.no_grad()
    def to_rgb(self, x: torch.Tensor) -> torch.Tensor:
        """A many-channel map as a 3-channel image in [-1, 1] (a fixed random projection)."""
        x = x.float()
        if "colorize" not in self.__dict__:
            self.__dict__["colorize"] = torch.randn(3, x.shape[1], 1, 1)
        x = F.conv2d(x, weight=self.__dict__["colorize"].to(x))
        return 2.0 * (x - x.min()) / (x.max() - x.min()) - 1.0

    def _conditioning_images(self, log: dict, batch: dict, c: Any, xc: Any, x: torch.Tensor) -> None:
        if self.model.conditioning_key is None or self.cond_stage_model is None:
            return
        # CompVis' caption size (H // 25), legible on small images too; (W, H) so the image matches x's shape.
        key, n, hw, size = self.cond_stage_key, x.shape[0], (x.shape[3], x.shape[2]), max(x.shape[2] // 25, 6)
        if hasattr(self.cond_stage_model, "decode") and isinstance(c, torch.Tensor):
            log["conditioning"] = self.cond_stage_model.decode(c)
        elif key in TEXT_KEYS or (hasattr(self.cond_stage_model, "tokenizer") and isinstance(xc, (list, tuple))):
            log["conditioning"] = log_txt_as_img(hw, list(batch[key])[:n], size=size).to(x.device)
        elif key in CLASS_KEYS:
            if "human_label" in batch:
                log["conditioning"] = log_txt_as_img(hw, list(batch["human_label"])[:n], size=size).to(x.device)
        elif isimage(xc):
            log["conditioning"] = xc
        if ismap(xc):
            log["original_conditioning"] = self.to_rgb(xc)

    @torch.no_grad()
    def log_images(self, batch: dict, N: int = 8, n_row: int = 4, sample: bool = True, ddim_steps: Optional[int] = 50,
                   ddim_eta: float = 0.0, return_keys=None, quantize_denoised: bool = True, inpaint: bool = True,
                   plot_denoise_rows: bool = False, plot_progressive_rows: bool = True, plot_diffusion_rows: bool = True,
                   unconditional_guidance_scale: float = 1.0, unconditional_guidance_label=None,
                   use_ema_scope: bool = True, **kwargs):
        """Image tensors [B, 3, H, W] in [-1, 1] (grids: [3, H', W']) for image-logging callbacks:
        inputs, reconstruction, conditioning, diffusion_row, samples, samples_cfg_scale_<s>,
        samples_inpainting / mask / samples_outpainting, progressive_row (and denoise_row).

        ``ddim_steps=None`` samples with the ancestral sampler over every timestep. Extra keywords
        (e.g. a logger's ``split``) are ignored."""
        ema_scope = self.ema_scope if use_ema_scope else nullcontext
        use_ddim = ddim_steps is not None
        log: dict[str, Any] = {}
        z, c, x, xrec, xc = self.get_input(batch, self.first_stage_key, return_first_stage_outputs=True,
                                           force_c_encode=True, return_original_cond=True, bs=N)
        if x is None:  # cached latents: the decoded latents stand in for the images
            x = xrec
        N, n_row = min(x.shape[0], N), min(x.shape[0], n_row)
        log["inputs"] = x
        log["reconstruction"] = xrec
        self._conditioning_images(log, batch, c, xc, x)

        if plot_diffusion_rows:
            z_start = z[:n_row]
            row = []
            for t in self._diffusion_steps():
                ts = torch.full((n_row,), t, device=self.device, dtype=torch.long)
                row.append(self.decode_first_stage(self.q_sample(x_start=z_start, t=ts, noise=torch.randn_like(z_start))))
            log["diffusion_row"] = rows_grid(torch.stack(row))

        if sample:
            with ema_scope("Sampling"):
                samples, z_denoise_row = self.sample_log(cond=c, batch_size=N, ddim=use_ddim, ddim_steps=ddim_steps, eta=ddim_eta)
            log["samples"] = self.decode_first_stage(samples)
            if plot_denoise_rows:
                steps = z_denoise_row["x_inter"] if isinstance(z_denoise_row, dict) else z_denoise_row
                log["denoise_row"] = self._get_denoise_row_from_list(steps)
            fs = self.first_stage_model
            if quantize_denoised and callable(getattr(fs, "quantize", None)) and type(fs).__name__ != "AutoencoderKL":
                with ema_scope("Plotting Quantized Denoised"):
                    quantize = {"quantize_x0": True} if use_ddim else {"quantize_denoised": True}  # each sampler's name
                    samples, _ = self.sample_log(cond=c, batch_size=N, ddim=use_ddim, ddim_steps=ddim_steps, eta=ddim_eta,
                                                 **quantize)
                log["samples_x0_quantized"] = self.decode_first_stage(samples.to(self.device))

        if unconditional_guidance_scale > 1.0:
            uc = self.get_unconditional_conditioning(N, unconditional_guidance_label)
            if isinstance(c, dict) and not isinstance(uc, dict):  # hybrid / adm models: only the text part is nulled
                uc = {**c, "c_crossattn": [uc]}
            with ema_scope("Sampling with classifier-free guidance"):
                samples_cfg, _ = self.sample_log(cond=c, batch_size=N, ddim=use_ddim, ddim_steps=ddim_steps, eta=ddim_eta,
                                                 unconditional_guidance_scale=unconditional_guidance_scale,
                                                 unconditional_conditioning=uc)
            log[f"samples_cfg_scale_{unconditional_guidance_scale:.2f}"] = self.decode_first_stage(samples_cfg)

        if inpaint:
            h, w = z.shape[2], z.shape[3]
            mask = torch.ones(N, 1, h, w, device=self.device)
            mask[:, :, h // 4:3 * h // 4, w // 4:3 * w // 4] = 0.0  # zeros are filled in
            with ema_scope("Plotting Inpaint"):
                samples, _ = self.sample_log(cond=c, batch_size=N, ddim=use_ddim, eta=ddim_eta, ddim_steps=ddim_steps,
                                             x0=z[:N], mask=mask)
            log["samples_inpainting"] = self.decode_first_stage(samples.to(self.device))
            log["mask"] = mask
            with ema_scope("Plotting Outpaint"):
                samples, _ = self.sample_log(cond=c, batch_size=N, ddim=use_ddim, eta=ddim_eta, ddim_steps=ddim_steps,
                                             x0=z[:N], mask=1.0 - mask)
            log["samples_outpainting"] = self.decode_first_stage(samples.to(self.device))

        if plot_progressive_rows:
            with ema_scope("Plotting Progressives"):
                _, progressives = self.progressive_denoising(c, shape=(self.channels, self.image_size, self.image_size),
                                                             batch_size=N, verbose=False)
            log["progressive_row"] = self._get_denoise_row_from_list(progressives, desc="Progressive Generation")

        return select_keys(log, return_keys)
