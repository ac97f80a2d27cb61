"""Rectified-flow (flow matching) objective with Wan's timestep shift; used by training and sampling.

Convention (diffusers' FlowMatchEulerDiscreteScheduler, Wan): flow time `t` in [0, 1], `t = 1` is pure
noise. `x_t = (1 - t) * x_0 + t * noise`, and the model predicts the velocity `noise - x_0`, so an Euler
step from `t` to `t'` is `x_t' = x_t + (t' - t) * v`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # the objective needs only the values, not the config package's imports
    from training.config import ObjectiveConfig

# model_fn(x_t [B, C, F, H, W], t [B] in [0, 1], cond) -> velocity prediction [B, C, F, H, W]
ModelFn = Callable[[torch.Tensor, torch.Tensor, object], torch.Tensor]


SCHEDULERS = ("euler", "unipc")


def shift_timesteps(t: torch.Tensor, shift: float) -> torch.Tensor:
    """Wan's shift `t' = s t / (1 + (s - 1) t)`: s > 1 moves time toward the noisy end. Any shape."""
    return shift * t / (1 + (shift - 1) * t)


def unipc_scheduler(shift: float, num_train_timesteps: int):
    """diffusers' `UniPCMultistepScheduler` as Wan-2.1's released pipeline configures it (WanPipeline's
    default; flow prediction, flow sigmas, `flow_shift=shift`): the `unipc` sampler and the scheduler
    every checkpoint's pipeline export writes (training.export)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        num_train_timesteps=num_train_timesteps,
        flow_shift=shift,
    )


class FlowMatching:
    """The training loss and the Euler sampler of rectified flow, configured by `ObjectiveConfig`."""

    def __init__(self, cfg: ObjectiveConfig):
        self.cfg = cfg

    def sample_timesteps(
        self, batch: int, *, device: torch.device | str = "cpu", generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training flow times `t [batch]` float32 in (0, 1): uniform or logit-normal, then shifted."""
        if self.cfg.timestep_sampling == "uniform":
            t = torch.rand(batch, device=device, generator=generator)
        else:
            z = torch.randn(batch, device=device, generator=generator)
            t = torch.sigmoid(self.cfg.logit_mean + self.cfg.logit_std * z)
        return shift_timesteps(t, self.cfg.shift)

    @staticmethod
    def interpolate(latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """`x_t [B, C, F, H, W] = (1 - t) x_0 + t noise` for `latents, noise [B, C, F, H, W]`, `t [B]`."""
        t = t.view(-1, *([1] * (latents.dim() - 1)))
        return (1 - t) * latents + t * noise

    def loss(
        self,
        model_fn: ModelFn,
        latents: torch.Tensor,
        cond: object,
        *,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Mean squared error between `model_fn`'s velocity and `noise - latents`, a float32 scalar.

        latents: `[B, C, F, H, W]` clean latents. t: `[B]` flow times (used as given, no shift); drawn
        with `sample_timesteps` when None. noise: `[B, C, F, H, W]`; standard normal from `generator`
        when None. cond is passed to `model_fn` untouched.
        """
        latents = latents.float()
        if t is None:
            t = self.sample_timesteps(latents.shape[0], device=latents.device, generator=generator)
        if noise is None:
            noise = torch.randn(latents.shape, device=latents.device, generator=generator)
        x_t = self.interpolate(latents, noise.float(), t.float())
        prediction = model_fn(x_t, t.float(), cond)
        return F.mse_loss(prediction.float(), noise.float() - latents)

    def sigmas(self, steps: int, shift: float | None = None) -> torch.Tensor:
        """The sampling schedule `[steps + 1]`: `linspace(1, 0)` shifted (`shift` None = `cfg.shift`)."""
        return shift_timesteps(
            torch.linspace(1.0, 0.0, steps + 1), self.cfg.shift if shift is None else shift
        )

    @torch.no_grad()
    def sample(
        self,
        model_fn: ModelFn,
        noise: torch.Tensor,
        cond: object,
        steps: int,
        guidance: float = 1.0,
        uncond: object | None = None,
        on_step: Callable[[int], None] | None = None,
        shift: float | None = None,
        scheduler: str = "euler",
    ) -> torch.Tensor:
        """Integrate from `noise [B, C, F, H, W]` (t = 1) to latents `[B, C, F, H, W]` (t = 0).

        `scheduler="euler"`: Euler steps over `sigmas(steps, shift)`. `"unipc"`: diffusers'
        `UniPCMultistepScheduler` (`unipc_scheduler`, WanPipeline's default) steps `model_fn`'s velocity,
        the transformer seeing the scheduler's integer timesteps as WanPipeline feeds them.
        With `guidance > 1` and `uncond` given, classifier-free guidance `v_u + g (v_c - v_u)`.
        `on_step(i)` is called before step `i` (0-based), e.g. to tell VMoBA the denoising step.
        """
        shift = self.cfg.shift if shift is None else shift

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            v = model_fn(x, t, cond).float()
            if guidance != 1.0 and uncond is not None:
                v_uncond = model_fn(x, t, uncond).float()
                v = v_uncond + guidance * (v - v_uncond)
            return v

        x = noise.float()
        if scheduler == "unipc":
            solver = unipc_scheduler(shift, self.cfg.num_train_timesteps)
            solver.set_timesteps(steps, device=noise.device)
            for i, timestep in enumerate(solver.timesteps):
                if on_step is not None:
                    on_step(i)
                t = (timestep.float() / self.cfg.num_train_timesteps).expand(x.shape[0])
                x = solver.step(velocity(x, t), timestep, x, return_dict=False)[0]
            return x
        if scheduler != "euler":
            raise ValueError(f"scheduler must be one of {list(SCHEDULERS)}, got {scheduler!r}")
        sigmas = self.sigmas(steps, shift).to(noise.device)
        for i in range(steps):
            if on_step is not None:
                on_step(i)
            x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, sigmas[i].expand(x.shape[0]))
        return x
