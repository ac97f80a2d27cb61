"""FlowMatching against hand computation in float64: shift, interpolation, target, timestep laws, Euler."""

import math

import pytest
import torch

from training.config import ObjectiveConfig
from training.objective import FlowMatching, shift_timesteps


def test_shift_matches_formula_and_fixes_endpoints():
    t = torch.rand(100, dtype=torch.float64)
    for s in (1.0, 3.0, 5.0, 0.5):
        expected = torch.tensor([s * v / (1 + (s - 1) * v) for v in t.tolist()], dtype=torch.float64)
        torch.testing.assert_close(shift_timesteps(t, s), expected, rtol=1e-12, atol=1e-12)
    ends = torch.tensor([0.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(shift_timesteps(ends, 5.0), ends)
    assert shift_timesteps(torch.tensor(0.5), 3.0).item() == pytest.approx(0.75)  # 1.5 / 2


def test_loss_is_mse_of_velocity_at_interpolated_point():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 2, 3, 5, generator=g, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    weight = torch.randn(4, 4, generator=g, dtype=torch.float64)
    seen = {}

    def model_fn(x_t, tt, cond):  # a linear map over channels, scaled by t: any fixed function will do
        seen["x_t"], seen["t"], seen["cond"] = x_t, tt, cond
        return torch.einsum("bcfhw,dc->bdfhw", x_t.double(), weight) * tt.double().view(-1, 1, 1, 1, 1)

    loss = FlowMatching(ObjectiveConfig()).loss(model_fn, x0, "cond", t=t, noise=noise)
    # Hand computation, element by element for one entry and vectorised in float64 for the whole.
    b, c, f, h, w = 1, 2, 1, 0, 3
    x_t_entry = (1 - t[b]) * x0[b, c, f, h, w] + t[b] * noise[b, c, f, h, w]
    torch.testing.assert_close(seen["x_t"][b, c, f, h, w].double(), x_t_entry, rtol=1e-6, atol=1e-6)
    x_t = (1 - t.view(-1, 1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1, 1) * noise
    prediction = torch.einsum("bcfhw,dc->bdfhw", x_t, weight) * t.view(-1, 1, 1, 1, 1)
    expected = ((prediction - (noise - x0)) ** 2).mean()
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert seen["cond"] == "cond"
    torch.testing.assert_close(seen["t"].double(), t, rtol=1e-6, atol=0)


def test_perfect_velocity_gives_zero_loss_and_exact_sampling():
    # A model that knows x0 predicts v = (x_t - x0) / t = noise - x0 exactly; Euler then lands on x0.
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(2, 3, 2, 4, 4, generator=g)
    obj = FlowMatching(ObjectiveConfig(shift=3.0))

    def oracle(x_t, t, cond):
        return (x_t - x0) / t.view(-1, 1, 1, 1, 1)

    assert obj.loss(oracle, x0, None, generator=g).item() < 1e-10
    noise = torch.randn(x0.shape, generator=g)
    steps_seen = []
    out = obj.sample(oracle, noise, None, steps=7, on_step=steps_seen.append)
    torch.testing.assert_close(out, x0, rtol=1e-4, atol=1e-4)
    assert steps_seen == list(range(7))


def test_sampling_schedule_and_guidance():
    obj = FlowMatching(ObjectiveConfig(shift=5.0))
    sig = obj.sigmas(4).double()
    expected = [5 * s / (1 + 4 * s) for s in (1.0, 0.75, 0.5, 0.25, 0.0)]
    torch.testing.assert_close(sig, torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    # One Euler step with constant velocities: x1 = x0 + (s1 - s0) * (v_u + g (v_c - v_u)).
    noise = torch.randn(1, 2, 1, 2, 2, dtype=torch.float64)

    def model_fn(x, t, cond):
        return torch.full_like(x, 1.0 if cond == "c" else -2.0)

    out = obj.sample(model_fn, noise, "c", steps=1, guidance=4.0, uncond="u", shift=1.0)
    torch.testing.assert_close(
        out.double(), noise + (0.0 - 1.0) * (-2.0 + 4.0 * (1.0 + 2.0)), rtol=1e-6, atol=1e-6
    )


@pytest.mark.parametrize("law", ["uniform", "logit_normal"])
def test_timestep_distributions(law):
    cfg = ObjectiveConfig(timestep_sampling=law, logit_mean=0.5, logit_std=0.8, shift=1.0)
    t = FlowMatching(cfg).sample_timesteps(20000, generator=torch.Generator().manual_seed(0)).double()
    assert ((t > 0) & (t < 1)).all()
    if law == "uniform":
        assert t.mean().item() == pytest.approx(0.5, abs=0.01)
        assert t.var().item() == pytest.approx(1 / 12, abs=0.005)
    else:  # logit(t) ~ N(0.5, 0.8^2)
        logit = torch.log(t / (1 - t))
        assert logit.mean().item() == pytest.approx(0.5, abs=0.03)
        assert logit.std().item() == pytest.approx(0.8, abs=0.03)
    # Shift maps the median m to s m / (1 + (s - 1) m).
    shifted = FlowMatching(ObjectiveConfig(timestep_sampling=law, logit_mean=0.5, logit_std=0.8, shift=3.0))
    ts = shifted.sample_timesteps(20000, generator=torch.Generator().manual_seed(0)).double()
    m = t.median().item()
    assert ts.median().item() == pytest.approx(3 * m / (1 + 2 * m), abs=1e-6)
    assert not math.isclose(ts.median().item(), m, abs_tol=0.05)
