"""evaluation.metrics: each sample-fidelity metric against a case computable by hand or an independent implementation."""

import json
import logging

import numpy as np
import pytest
import scipy.linalg
import torch
from skimage.metrics import structural_similarity

from evaluation import metrics
from evaluation.metrics import FeatureMetricsConfig


def _video(gen, shape=(2, 3, 4, 24, 20), lo=-1.0, hi=1.0):
    return torch.rand(shape, generator=gen) * (hi - lo) + lo


# ----------------------------------------------------------------------------- PSNR / SSIM


def test_psnr_of_a_known_mse():
    gen = torch.Generator().manual_seed(0)
    a = _video(gen, lo=-0.5, hi=0.5)
    signs = torch.randint(0, 2, a.shape, generator=gen) * 2 - 1
    # In [0, 1] units video 0 differs by 0.1 everywhere (MSE 1e-2 -> 20 dB), video 1 by 0.01 (40 dB).
    delta = torch.tensor([0.2, 0.02]).view(2, 1, 1, 1, 1)
    b = a + signs * delta
    torch.testing.assert_close(metrics.psnr(a, b), torch.tensor([20.0, 40.0]), atol=1e-3, rtol=0)
    assert torch.isinf(metrics.psnr(a, a)).all()


def test_ssim_identical_is_one_and_matches_skimage():
    gen = torch.Generator().manual_seed(1)
    a = _video(gen)
    b = (a + 0.3 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
    torch.testing.assert_close(metrics.ssim(a, a), torch.ones(2), atol=1e-5, rtol=0)

    got = metrics.ssim(a, b)
    ua, ub = ((a + 1) / 2).double().numpy(), ((b + 1) / 2).double().numpy()
    expected = [
        np.mean(
            [
                structural_similarity(
                    ua[i, :, f], ub[i, :, f], data_range=1.0, channel_axis=0,
                    gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                )
                for f in range(a.shape[2])
            ]
        )
        for i in range(a.shape[0])
    ]  # fmt: skip
    assert 0.05 < got.min() and got.max() < 0.95  # a non-trivial case
    torch.testing.assert_close(got.double(), torch.tensor(expected), atol=1e-5, rtol=0)


def test_pixel_metrics_reject_bad_shapes():
    a = torch.zeros(1, 3, 2, 16, 16)
    with pytest.raises(ValueError, match=r"psnr: expected two videos \[B, C, F, H, W\]"):
        metrics.psnr(a, a[:, :, :1])
    with pytest.raises(ValueError, match="at least 11x11"):
        metrics.ssim(a[..., :8, :8], a[..., :8, :8])


# ----------------------------------------------------------------------------- Frechet distance


def _scipy_frechet(mu1, s1, mu2, s2):
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


@pytest.mark.parametrize("dim", [1, 7, 32])
def test_frechet_distance_matches_scipy(dim):
    rng = np.random.default_rng(dim)
    mu1, mu2 = rng.normal(size=dim), rng.normal(size=dim)
    a, b = rng.normal(size=(dim, dim + 3)), rng.normal(size=(dim, dim + 3))
    s1, s2 = a @ a.T / dim, b @ b.T / dim
    got = metrics.frechet_distance(*(torch.from_numpy(x) for x in (mu1, s1, mu2, s2)))
    assert got == pytest.approx(_scipy_frechet(mu1, s1, mu2, s2), rel=1e-8, abs=1e-8)
    # Same Gaussian: zero (up to the square root's rounding).
    assert metrics.frechet_distance(*(torch.from_numpy(x) for x in (mu1, s1, mu1, s1))) == pytest.approx(
        0.0, abs=1e-6 * np.trace(s1)
    )


def test_frechet_distance_of_1d_gaussians_by_hand():
    # N(0, 4) vs N(3, 1): (0 - 3)^2 + (2 - 1)^2 = 10.
    t = torch.tensor
    assert metrics.frechet_distance(t([0.0]), t([[4.0]]), t([3.0]), t([[1.0]])) == pytest.approx(10.0)
    with pytest.raises(ValueError, match="frechet_distance: expected mu"):
        metrics.frechet_distance(t([0.0, 1.0]), t([[4.0]]), t([3.0]), t([[1.0]]))


def test_gaussian_stats_match_numpy():
    feats = torch.randn(9, 5, generator=torch.Generator().manual_seed(3))
    mu, sigma = metrics.gaussian_stats(feats)
    np.testing.assert_allclose(mu.numpy(), feats.double().numpy().mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma.numpy(), np.cov(feats.double().numpy(), rowvar=False), rtol=1e-12)


# ----------------------------------------------------------------------------- feature networks


class _TinyI3D(torch.nn.Module):
    """Stands in for I3D: same call convention as StyleGAN-V's TorchScript export."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 6, kernel_size=3, stride=2)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = True
    ):
        return torch.tanh(self.conv(x)).mean(dim=(2, 3, 4))  # [B, 6]


@pytest.mark.filterwarnings("ignore:`torch.jit")
def test_fvd_is_the_frechet_distance_of_i3d_features(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "i3d.pt"
    torch.jit.script(_TinyI3D()).save(str(path))
    nets = metrics.load_feature_networks(FeatureMetricsConfig(i3d=str(path), i3d_size=32))
    gen = torch.Generator().manual_seed(4)
    a, b = _video(gen, (8, 3, 5, 24, 20)), _video(gen, (8, 3, 5, 24, 20), lo=-0.2)

    got = metrics.fidelity(a, b, networks=nets)["fvd"]
    ref_net = _TinyI3D()
    ref_net.load_state_dict(torch.jit.load(str(path)).state_dict())

    def feats(v):
        frames = v.permute(0, 2, 1, 3, 4).reshape(-1, 3, 24, 20)
        # Shorter side 20 -> 32: 24x20 becomes 38x32 (24 * 1.6 = 38.4), center crop rows 3..34.
        frames = torch.nn.functional.interpolate(frames, size=(38, 32), mode="bilinear")[:, :, 3:35]
        return ref_net(frames.reshape(8, 5, 3, 32, 32).permute(0, 2, 1, 3, 4)).double().detach().numpy()

    fa, fb = feats(a), feats(b)
    ref = _scipy_frechet(fa.mean(0), np.cov(fa, rowvar=False), fb.mean(0), np.cov(fb, rowvar=False))
    assert ref > 1e-3 and got == pytest.approx(ref, rel=1e-5)
    assert metrics.fvd(nets.i3d, a, a, 32, {}) == pytest.approx(0.0, abs=1e-6)


def test_lpips_with_a_local_random_alexnet_matches_the_formula(tmp_path):
    torchvision = pytest.importorskip("torchvision")
    import torchmetrics.functional.image.lpips as tm_lpips

    torch.manual_seed(0)
    alex = torchvision.models.alexnet(weights=None).eval()
    torch.save(alex.state_dict(), tmp_path / "alexnet.pth")
    nets = metrics.load_feature_networks(FeatureMetricsConfig(lpips_backbone=str(tmp_path / "alexnet.pth")))
    gen = torch.Generator().manual_seed(5)
    a = _video(gen, (2, 3, 2, 64, 64))
    b = (a + 0.5 * torch.randn(a.shape, generator=gen)).clamp(-1, 1)
    got = metrics.lpips(nets.lpips, a, b)

    # Reference: LPIPS by its definition, on the torchvision network itself.
    lins = torch.load(
        tm_lpips.__file__.replace("lpips.py", "lpips_models/alex.pth"), map_location="cpu", weights_only=True
    )
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)

    def taps(x):  # outputs of the five ReLUs LPIPS reads
        out, h = [], (x - shift) / scale
        for i, layer in enumerate(alex.features):
            h = layer(h)
            if i in (1, 4, 7, 9, 11):
                out.append(h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def frames(v):
        return v.permute(0, 2, 1, 3, 4).reshape(-1, 3, 64, 64)

    with torch.no_grad():
        fa, fb = taps(frames(a)), taps(frames(b))
        per_frame = sum(
            torch.nn.functional.conv2d((x - y).square(), lins[f"lin{k}.model.1.weight"]).mean(dim=(1, 2, 3))
            for k, (x, y) in enumerate(zip(fa, fb))
        )
    expected = per_frame.reshape(2, 2).mean(dim=1)
    assert expected.min() > 0
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
    assert metrics.lpips(nets.lpips, a, a).abs().max() < 1e-6


def _tiny_clip(path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    path.mkdir()
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"))
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    layers = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(vocab), max_position_embeddings=32, bos_token_id=0, eos_token_id=1, **layers
        ),
        vision_config=dict(image_size=32, patch_size=8, **layers),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(path)


def test_clip_score_of_a_local_tiny_clip_matches_the_models_own_similarity(tmp_path):
    _tiny_clip(tmp_path / "clip")
    nets = metrics.load_feature_networks(FeatureMetricsConfig(clip=str(tmp_path / "clip")))
    model, processor = nets.clip
    gen = torch.Generator().manual_seed(6)
    videos = _video(gen, (2, 3, 3, 40, 48))
    prompts = ["a red cat", "dogs run on grass"]
    got = metrics.clip_score(model, processor, videos, prompts)

    # Reference: CLIPModel.forward's logits_per_image / logit_scale is the cosine of every (frame, prompt).
    frames = ((videos + 1) / 2 * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).reshape(-1, 40, 48, 3)
    inputs = processor(text=prompts, images=list(frames.numpy()), return_tensors="pt", padding=True)
    with torch.no_grad():
        cos = model(**inputs).logits_per_image / model.logit_scale.exp()  # [B*F, B]
    cos = cos.reshape(2, 3, 2)[torch.arange(2), :, torch.arange(2)]  # frame of video i vs prompt i
    expected = (100 * cos.clamp(min=0)).mean(dim=1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="2 videos but 1 prompts"):
        metrics.clip_score(model, processor, videos, prompts[:1])


def test_missing_weights_skip_feature_metrics_with_a_note(tmp_path, caplog):
    cfg = FeatureMetricsConfig(i3d=str(tmp_path / "nope.pt"), clip=str(tmp_path / "no_clip"))
    with caplog.at_level(logging.INFO, logger="evaluation.metrics"):
        nets = metrics.load_feature_networks(cfg)
    assert nets.lpips is None and nets.i3d is None and nets.clip is None
    text = caplog.text
    assert "lpips_backbone is not set" in text and "nope.pt is not a file" in text and "no_clip" in text
    gen = torch.Generator().manual_seed(7)
    a = _video(gen)
    assert set(metrics.fidelity(a, a.flip(0), ["x", "y"], nets)) == {"psnr", "ssim"}
    with pytest.raises(ValueError, match="lpips_net: got 'resnet'"):
        FeatureMetricsConfig(lpips_net="resnet")
