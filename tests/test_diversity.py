"""Diversity metrics and embedders as a library: known answers, properties, bad input."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from rewardtune.metrics import DiversityError, cosine_diversity, mean_pairwise_distance, vendi_score
from rewardtune.metrics.embedders import PixelEmbedder, load_embedder
from rewardtune.metrics.plot import pareto_front, tradeoff_plot


def test_known_answers():
    same = torch.randn(1, 16).repeat(6, 1)
    assert cosine_diversity(same).value == pytest.approx(0.0, abs=1e-9)
    assert vendi_score(same).value == pytest.approx(1.0, abs=1e-9)
    eye = torch.eye(7)
    assert cosine_diversity(eye).value == pytest.approx(1.0, abs=1e-12)
    assert vendi_score(eye).value == pytest.approx(7.0, abs=1e-9)
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert cosine_diversity(opposite).value == pytest.approx(2.0)
    # groups: two identical prompts' worth and one orthogonal group → mean of 0 and 1
    emb = torch.cat([same[:3], torch.eye(3, 16)])
    report = cosine_diversity(emb, per_group=3)
    assert report.per_group == pytest.approx([0.0, 1.0], abs=1e-9) and report.value == pytest.approx(0.5)
    assert vendi_score(emb, per_group=3).per_group == pytest.approx([1.0, 3.0], abs=1e-9)
    # mean pairwise L2 of the corners of a unit square: (4·1 + 2·√2) / 6
    sq = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert mean_pairwise_distance(sq).value == pytest.approx((4 + 2 * math.sqrt(2)) / 6)


def test_cosine_matches_the_definition():
    emb = torch.randn(12, 5, dtype=torch.float64)
    u = emb / emb.norm(dim=1, keepdim=True)
    groups = [0, 1, 2] * 4
    expected = []
    for g in range(3):
        x = u[[i for i, gg in enumerate(groups) if gg == g]]
        sim = x @ x.T
        n = x.shape[0]
        expected.append(1 - (sim.sum() - n) / (n * (n - 1)))
    report = cosine_diversity(emb, groups)
    assert report.per_group == pytest.approx([e.item() for e in expected], abs=1e-12)
    # Vendi against the N×N kernel's eigenvalues
    k = (u @ u.T) / 12
    lam = torch.linalg.eigvalsh(k).clamp(min=0)
    lam = lam[lam > 1e-12]
    assert vendi_score(emb).value == pytest.approx(torch.exp(-(lam * lam.log()).sum()).item(), rel=1e-9)


finite = st.floats(-10, 10, allow_nan=False, width=32).filter(lambda v: abs(v) > 1e-3)


@settings(max_examples=60, deadline=None)
@given(arrays("float32", st.tuples(st.integers(2, 12), st.integers(1, 8)), elements=finite),
       st.floats(0.01, 100), st.randoms(use_true_random=False))
@pytest.mark.slow
def test_properties(arr, scale, rnd):
    emb = torch.from_numpy(arr)
    if (emb.norm(dim=1) == 0).any():
        return
    n = emb.shape[0]
    div, ven = cosine_diversity(emb).value, vendi_score(emb).value
    assert 0.0 <= div <= 2.0
    assert 1.0 - 1e-6 <= ven <= n + 1e-6
    assert cosine_diversity(emb * scale).value == pytest.approx(div, abs=1e-6)        # scale invariance
    assert vendi_score(emb * scale).value == pytest.approx(ven, rel=1e-6)
    order = list(range(n))
    rnd.shuffle(order)
    assert cosine_diversity(emb[order]).value == pytest.approx(div, abs=1e-9)         # order invariance
    assert vendi_score(emb[order]).value == pytest.approx(ven, rel=1e-6)
    d = mean_pairwise_distance(emb).value
    assert d >= 0 and mean_pairwise_distance(emb[order]).value == pytest.approx(d, rel=1e-9)


def test_bad_input():
    with pytest.raises(DiversityError, match="at least 2 images"):
        cosine_diversity(torch.randn(1, 4))
    with pytest.raises(DiversityError, match="NaN"):
        cosine_diversity(torch.tensor([[1.0, float("nan")], [0.0, 1.0]]))
    with pytest.raises(DiversityError, match="single image"):
        vendi_score(torch.randn(5, 3), groups=[0, 0, 1, 1, 2])
    with pytest.raises(DiversityError, match="not a multiple of 3"):
        cosine_diversity(torch.randn(5, 3), per_group=3)
    with pytest.raises(DiversityError, match="all zeros"):
        cosine_diversity(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    with pytest.raises(DiversityError, match="2 group ids for 3"):
        cosine_diversity(torch.randn(3, 2), groups=["a", "b"])
    # groups of unequal size are allowed: every prompt counts once (documented)
    r = cosine_diversity(torch.cat([torch.eye(4), torch.ones(2, 4)]), groups=[0, 0, 0, 0, 1, 1])
    assert r.group_sizes == [4, 2] and r.value == pytest.approx(0.5)


def test_pixel_embedder_and_plot():
    img = torch.rand(3, 40, 48, 3)
    same = img[:1].repeat(3, 1, 1, 1)
    e = PixelEmbedder()
    assert cosine_diversity(e.embed(same)).value == pytest.approx(0.0, abs=1e-6)
    assert cosine_diversity(e.embed(img)).value > 0.5
    assert e.embed(img[..., :1]).shape == (3, 32 * 32 * 3)  # grayscale accepted
    assert pareto_front([(0.1, 1.0), (0.5, 0.5), (0.3, 0.3), (0.9, 0.1)]) == [0, 1, 3]
    plot = tradeoff_plot([0.1, 0.5, 0.3], [1.0, 0.5, 0.3], ["k=0", "k=20", "k=40"], x_label="x", y_label="y",
                         title="t", width=640, height=400)
    assert plot.size == (640, 400) and len(np.unique(np.asarray(plot).reshape(-1, 3), axis=0)) > 3


def test_dino_file_equals_timm(tmp_path):
    """The original DINO release layout (timm's ViT keys) loads and embeds like timm's model."""
    from timm.models.vision_transformer import VisionTransformer
    from rewardtune.rewards.preprocess import clip_pixels
    from rewardtune.testing.reward_fixtures import perturb_
    torch.manual_seed(0)
    ref = perturb_(VisionTransformer(img_size=224, patch_size=16, embed_dim=384, depth=12, num_heads=6,
                                     qkv_bias=True, num_classes=0), 0)
    torch.save(ref.state_dict(), tmp_path / "dino_deitsmall16_pretrain.pth")
    emb = load_embedder(str(tmp_path / "dino_deitsmall16_pretrain.pth"))
    images = torch.rand(3, 224, 224, 3)
    with torch.no_grad():
        expected = ref(clip_pixels(images.movedim(-1, 1), 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)))
    assert emb.embed(images, batch_size=2).shape == (3, 384)
    assert (emb.embed(images) - expected).abs().max() <= 1e-4


def test_hf_vit_folder_equals_transformers(tmp_path):
    """A transformers ViT folder (the layout of facebook/dino-vits16) embeds as ViTModel's CLS."""
    from transformers import ViTConfig, ViTModel
    from rewardtune.rewards.preprocess import clip_pixels
    from rewardtune.testing.reward_fixtures import perturb_
    torch.manual_seed(1)
    cfg = ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=256,
                    image_size=224, patch_size=16)
    ref = perturb_(ViTModel(cfg, add_pooling_layer=False), 1)
    ref.save_pretrained(tmp_path / "dino-vits16")
    emb = load_embedder(str(tmp_path / "dino-vits16" / "model.safetensors"))
    images = torch.rand(2, 200, 260, 3)
    with torch.no_grad():
        px = clip_pixels(images.movedim(-1, 1), 224, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
        expected = ref(pixel_values=px).last_hidden_state[:, 0]
    assert (emb.embed(images) - expected).abs().max() <= 1e-4
