"""EMA: diffusers' decay warm-up (numerically, against diffusers' EMAModel), old ema.pt files still load
with their constant decay, and under ZeRO-3 (gathered shards) the average equals ZeRO-2's."""

import torch
from diffusers.training_utils import EMAModel
from test_train import cache, make_cfg  # noqa: F401  (cache: the module's latent cache)

from training.ema import EMA


def test_warmup_matches_diffusers_ema_model_and_old_states_keep_the_constant_decay():
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ours, theirs = EMA(model, decay=0.99), EMAModel(model.parameters(), decay=0.99)
    for _ in range(30):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model)
        theirs.step(model.parameters())
    for (n, _), shadow in zip(model.named_parameters(), theirs.shadow_params, strict=True):
        torch.testing.assert_close(ours.shadow[n], shadow, rtol=1e-6, atol=1e-6)
    assert ours.current_decay == min(0.99, 31 / 40)

    old = {n: t.clone() for n, t in ours.state_dict().items() if not n.startswith("__")}  # no count
    resumed = EMA(model, decay=0.99)
    resumed.load_state_dict(old)
    assert resumed.current_decay == 0.99  # as the run that wrote it averaged


def test_zero3_ema_equals_zero2_ema_after_two_steps(cache, tmp_path):  # noqa: F811
    from train import train

    emas = {}
    for stage in ("zero2", "zero3"):
        cfg = make_cfg(
            cache, f"deepspeed={stage}", "ema.enabled=true", "ema.decay=0.9", "train.steps=2",
            "eval.every=0", "sample.every=0",
        )  # fmt: skip
        train(cfg, tmp_path / stage)
        emas[stage] = torch.load(tmp_path / stage / "checkpoints/step_000002/ema.pt")
    assert emas["zero3"].keys() == emas["zero2"].keys() and int(emas["zero3"]["__ema_updates__"]) == 2
    for k, v in emas["zero2"].items():
        torch.testing.assert_close(emas["zero3"][k], v, rtol=1e-5, atol=1e-6, msg=k)
