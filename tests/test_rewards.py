"""Reward models as a library: equality with the reference implementations on random weights in
the official file layouts, gradients, and bad input. (The nodes are tested in test_reward_nodes.)"""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from rewardtune.rewards import (RewardInputError, RewardModelError, as_rgb_bchw, clip_pixels,
                                detect_reward_type, load_reward_model, read_state_dict)
from rewardtune.testing import reward_fixtures as rf

PROMPTS = ["a photo of a cat", "", "A very long prompt " * 20, "Ünïcödé — punctuation!? 123"]


def _load(reward_tree, kind, **kw):
    if kind == "aesthetic":
        kw["clip_vision_path"] = os.path.join(reward_tree["clip_dir"], reward_tree["files"]["clip_vitl"])
    return load_reward_model(os.path.join(reward_tree["dir"], reward_tree["files"][kind]), **kw)


def _reference(reward_tree, kind, prompts, images):
    refs = reward_tree["refs"]
    if kind == "hpsv2":
        return rf.reference_hpsv2(refs["hpsv2"], prompts, images)
    if kind == "pickscore":
        return rf.reference_pickscore(refs["pickscore"], prompts, images)
    return rf.reference_aesthetic(refs["clip_vitl"], refs["aesthetic"], images)


# ------------------------------------------------------------------------- equality: CLIP family
@pytest.mark.parametrize("kind", ["hpsv2", "pickscore", "aesthetic"])
def test_clip_family_equals_reference_at_224(reward_tree, kind):
    model = _load(reward_tree, kind)
    images = rf.test_images(seed=5, size=(224, 224), n=len(PROMPTS))
    ours = model.score(rf.pil_to_comfy(images), PROMPTS)
    ref = _reference(reward_tree, kind, PROMPTS, images)
    assert ours.shape == (len(PROMPTS),) and ours.dtype == torch.float32
    assert ref.std() > 1e-3, "degenerate reference: the test would not see a difference"
    assert (ours - ref).abs().max() <= 1e-4, (ours, ref)


# Non-224 images, max |ours − reference| as a fraction of the reference scores' range. Measured:
# hpsv2 5.0e-4, pickscore 7.2e-4, aesthetic 6.7e-3 (mostly PIL's rounding to uint8 after its
# resize); bilinear instead of bicubic resizing gives 2.2e-3, 8.1e-4, 1.06e-2. Deterministic on
# the CPU, so the tolerance is ~1.3x the measurement.
OTHER_SIZE_TOLERANCE = {"hpsv2": 6.5e-4, "pickscore": 9e-4, "aesthetic": 8.5e-3}


@pytest.mark.parametrize("kind", ["hpsv2", "pickscore", "aesthetic"])
def test_clip_family_other_sizes_close_to_reference(reward_tree, kind):
    """Non-224 images: our differentiable resize vs PIL's uint8 resize (documented tolerance),
    relative to how much the scores differ between images (the range), not to their offset
    (the aesthetic head's scores sit near −20 with a range of 0.7)."""
    model = _load(reward_tree, kind)
    images = rf.test_images(seed=6, size=(320, 256), n=2) + rf.test_images(seed=7, size=(96, 128), n=1)
    prompts = PROMPTS[:3]
    ours = torch.cat([model.score(rf.pil_to_comfy([im]), [p]) for im, p in zip(images, prompts)])
    ref = _reference(reward_tree, kind, prompts, images)
    spread = (ref.max() - ref.min()).item()
    err = (ours - ref).abs().max().item()
    print(f"{kind}: max |diff| {err:.3g} = {err / spread:.3g} of the range {spread:.3g}")
    assert spread > 1e-2, "degenerate reference: the test would not see a difference"
    assert err <= OTHER_SIZE_TOLERANCE[kind] * spread, (ours, ref)


@pytest.mark.slow
def test_hpsv2_full_vit_h14_equals_open_clip(tmp_path):
    """The real HPSv2 architecture (OpenCLIP ViT-H-14, 986M parameters), not only a small one."""
    path = str(tmp_path / "HPS_v2_compressed.pt")
    ref = rf.write_hpsv2(path, seed=11, architecture="ViT-H-14")
    images = rf.test_images(seed=8, size=(224, 224), n=2)
    prompts = ["a red bicycle", "an astronaut riding a horse, oil painting"]
    expected = rf.reference_hpsv2(ref, prompts, images)
    del ref
    model = load_reward_model(path)
    assert model.label == "hpsv2"
    with torch.no_grad():
        ours = model.score(rf.pil_to_comfy(images), prompts)
    assert (ours - expected).abs().max() <= 1e-4, (ours, expected)


def test_clip_tokenizer_matches_hf_clip_tokenizer():
    """PickScore's processor tokenizes with HF's CLIPTokenizer; we use open_clip's copy of the BPE."""
    from rewardtune.rewards.clip_rewards import _clip_tokenizer
    hf = rf.clip_processor().tokenizer
    ours = _clip_tokenizer(77)
    texts = PROMPTS + ["Hello, World!  double  spaces", "emoji 🐱 and CJK 猫", "x" * 500]
    for text in texts:
        ids = ours([text])[0]
        n = int((ids != 0).sum())
        ref = hf(text, truncation=True, max_length=77).input_ids
        assert ids[:n].tolist() == ref, text


# ---------------------------------------------------------------------- equality: ImageReward
@pytest.mark.slow
def test_imagereward_equals_package(imagereward_oracle):
    """Scores of the image-reward package (own venv, PIL path, its score() and inference_rank())
    against RewardTune's loader + scorer on the same random ImageReward.pt."""
    cases = imagereward_oracle["cases"]
    model = load_reward_model(imagereward_oracle["weights"])
    assert model.kind == "imagereward"
    ref, ours = [], []
    with torch.no_grad():
        for case in cases["cases"]:
            image = Image.open(os.path.join(imagereward_oracle["dir"], case["image"] + ".png"))
            ours.append(model.score(rf.pil_to_comfy([image]), case["prompt"]).item())
            ref.append(case["score"])
        for case in cases["lists"]:
            images = [Image.open(os.path.join(imagereward_oracle["dir"], n + ".png")) for n in case["images"]]
            ours += [model.score(rf.pil_to_comfy([i]), case["prompt"]).item() for i in images]
            ref += case["scores"]
    ref, ours = torch.tensor(ref), torch.tensor(ours)
    assert ref.std() > 1e-2
    names = [c["image"] for c in cases["cases"]] + [n for c in cases["lists"] for n in c["images"]]
    exact = torch.tensor([n != "img2" for n in names])
    err_exact, err_resized = (ours - ref)[exact].abs().max().item(), (ours - ref)[~exact].abs().max().item()
    print(f"ImageReward vs package: 224² max |diff| {err_exact:.3g}, 320×256 {err_resized:.3g}")
    # 224² images (RGB, grayscale, RGBA): the same pixels reach the model (measured: bitwise, see
    # the next test), so only float32 rounding differs (measured 4.2e-6); a ViT LayerNorm eps of 1e-5
    # instead of 1e-6 moves the scores ~4e-5, BERT's 1e-5 instead of 1e-12 ~3e-4 (oracle's notes)
    assert err_exact <= 1e-5, (ours, ref)
    # the 320×256 image: torch resize vs PIL's uint8 resize (measured 3.7e-3; bilinear instead of
    # bicubic would be ~0.02)
    assert err_resized <= 5e-3, (ours, ref)


@pytest.mark.slow
def test_imagereward_tokens_and_preprocessing_equal_package(imagereward_oracle):
    with open(os.path.join(imagereward_oracle["dir"], "tokens.json"), encoding="utf-8") as f:
        tokens = json.load(f)
    model = load_reward_model(imagereward_oracle["weights"])
    assert len(tokens["prompts"]) == len(PROMPTS)
    for entry in tokens["prompts"]:
        ids, mask = model.tokenize([entry["prompt"]])
        assert ids[0].tolist() == entry["input_ids"], entry["prompt"]
        assert mask[0].tolist() == entry["attention_mask"]
    for name in ("img0", "img1", "img3", "img4", "img2"):
        ref = torch.from_numpy(np.load(os.path.join(imagereward_oracle["dir"], f"pre_{name}.npy")))
        image = Image.open(os.path.join(imagereward_oracle["dir"], name + ".png"))
        ours = clip_pixels(as_rgb_bchw(rf.pil_to_comfy([image.convert("RGB")])))
        tol = 1e-5 if name != "img2" else 3 / 255 / 0.26
        assert (ours - ref).abs().max() <= tol, name


# --------------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("kind", ["hpsv2", "pickscore", "aesthetic"])
def test_gradient_ascent_raises_score(reward_tree, kind):
    model = _load(reward_tree, kind)
    image = rf.pil_to_comfy(rf.test_images(seed=9, size=(256, 256), n=1)).requires_grad_(True)
    prompt = "a lighthouse at dusk"
    start = model.score(image, prompt)
    start.sum().backward()
    grad = image.grad
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    x = image.detach().clone()
    for _ in range(5):
        x.requires_grad_(True)
        s = model.score(x, prompt).sum()
        (g,) = torch.autograd.grad(s, x)
        x = (x + 0.02 * g / g.abs().max()).clamp(0, 1).detach()
    assert model.score(x, prompt).item() > start.item() + 1e-4


@pytest.mark.slow
def test_imagereward_gradient_ascent_raises_score(imagereward_oracle):
    model = load_reward_model(imagereward_oracle["weights"])
    x = rf.pil_to_comfy(rf.test_images(seed=10, size=(224, 224), n=1))
    start = model.score(x, "a cat").item()
    for _ in range(3):
        x.requires_grad_(True)
        (g,) = torch.autograd.grad(model.score(x, "a cat").sum(), x)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
        x = (x + 0.02 * g / g.abs().max()).clamp(0, 1).detach()
    assert model.score(x, "a cat").item() > start


def test_training_reward_applies_scale_and_offset(reward_tree):
    model = _load(reward_tree, "pickscore")
    x = rf.pil_to_comfy(rf.test_images(seed=12, n=2))
    assert (model.scale, model.offset) == (0.1, -20.0)
    assert torch.allclose(model.training_reward(x, "a"), 0.1 * (model.score(x, "a") - 20.0))


# ------------------------------------------------------------------------------ preprocessing
def test_resize_is_torchvisions_and_its_work_is_bounded_by_the_output():
    """Up to 8:1 the crop is torchvision's Resize(224, bicubic, antialias) + CenterCrop(224) on
    tensors, exactly; beyond it the long side is cut to a centred 8:1 stretch first, so the same
    region comes out (a smooth image within 5e-3: the crop's offset rounds differently) and a
    1 × 300,000 strip costs what a 1 × 8 one does instead of a 224 × 67,200,000 resize (180 GB)."""
    import time
    import torch.nn.functional as F
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    from rewardtune.rewards.preprocess import resize_center_crop

    def torchvision(x):
        x = TF.resize(x, 224, interpolation=InterpolationMode.BICUBIC, antialias=True).clamp(0, 1)
        return TF.center_crop(x, 224)
    gen = torch.Generator().manual_seed(0)
    for h, w in ((256, 320), (100, 800), (800, 100), (30, 31), (500, 300)):
        x = torch.rand(1, 3, h, w, generator=gen)
        assert torch.equal(resize_center_crop(x, 224), torchvision(x)), (h, w)
    for h, w in ((12, 400), (400, 12), (37, 1001), (300, 2900), (1, 50)):
        smooth = F.interpolate(torch.rand(1, 3, 4, 4, generator=gen), size=(h, w), mode="bilinear")
        out = resize_center_crop(smooth, 224)
        assert out.shape == (1, 3, 224, 224) and (out - torchvision(smooth)).abs().max() < 5e-3, (h, w)
    for shape in ((1, 3, 1, 300_000), (1, 3, 300_000, 1)):
        t0 = time.perf_counter()
        assert resize_center_crop(torch.rand(shape), 224).shape == (1, 3, 224, 224)
        assert time.perf_counter() - t0 < 2.0


# -------------------------------------------------------------------------------- bad input
def test_grayscale_rgba_and_channels_first(reward_tree):
    model = _load(reward_tree, "pickscore")
    rgb = rf.pil_to_comfy(rf.test_images(seed=13, n=2))
    gray = rgb.mean(-1, keepdim=True)
    assert torch.allclose(model.score(gray, "a"), model.score(gray.expand(-1, -1, -1, 3), "a"))
    rgba = torch.cat([rgb, torch.rand_like(rgb[..., :1])], -1)
    assert torch.allclose(model.score(rgba, "a"), model.score(rgb, "a"))
    assert torch.allclose(model.score(rgb.movedim(-1, 1), "a", layout="BCHW"), model.score(rgb, "a"))
    assert torch.allclose(model.score(rgb[0], "a"), model.score(rgb[:1], "a"))  # single HWC image


def test_prompt_broadcast_and_mismatch(reward_tree):
    model = _load(reward_tree, "hpsv2")
    x = rf.pil_to_comfy(rf.test_images(seed=14, n=3))
    one = model.score(x, "a dog")
    assert torch.allclose(one, model.score(x, ["a dog"])) and torch.allclose(one, model.score(x, ["a dog"] * 3))
    with pytest.raises(RewardInputError, match="2 prompts for 3 images"):
        model.score(x, ["a", "b"])
    with pytest.raises(RewardInputError, match="give a prompt"):
        model.score(x, None)
    with pytest.raises(RewardInputError, match="channels"):
        model.score(torch.rand(1, 32, 32, 5), "a")
    # batching does not change the scores
    assert torch.allclose(model.score(x, "a dog", batch_size=1), one, atol=1e-6)


def test_detects_other_files(tmp_path, models_tree):
    lora = os.path.join(models_tree["root"], "loras", models_tree["lora"])
    with pytest.raises(RewardModelError, match="LoRA"):
        load_reward_model(lora)
    ckpt = os.path.join(models_tree["root"], "checkpoints", models_tree["sd15"])
    with pytest.raises(RewardModelError, match="Stable Diffusion checkpoint"):
        load_reward_model(ckpt)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(RewardModelError, match="cannot read"):
        load_reward_model(str(junk))
    with pytest.raises(RewardModelError, match="no such file"):
        load_reward_model(str(tmp_path / "missing.pt"))


def test_refuses_pickles_that_run_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"layers.0.weight": Payload()}, f)
    with pytest.raises(RewardModelError) as info:
        read_state_dict(str(path))
    msg = str(info.value)
    # the file is refused because loading it would run code, naming what it asks for; torch's advice
    # to load it with weights_only=False is wrong for such a file and is not passed on
    assert "refused" in msg and "would run code" in msg and "system" in msg, msg
    assert "weights_only" not in msg and "Re-running" not in msg, msg


def test_type_mismatch_and_missing_clip(reward_tree):
    with pytest.raises(RewardModelError, match="looks like a pickscore model, not imagereward"):
        _load(reward_tree, "pickscore", reward_type="imagereward")
    with pytest.raises(RewardModelError, match="CLIP ViT-L/14"):
        load_reward_model(os.path.join(reward_tree["dir"], reward_tree["files"]["aesthetic"]))
    clip = os.path.join(reward_tree["clip_dir"], reward_tree["files"]["clip_vitl"])
    with pytest.raises(RewardModelError, match="CLIP vision model"):
        load_reward_model(clip)
    assert detect_reward_type(read_state_dict(clip)) == "clip_vision"
    # PickScore's CLIP-H gives 64-dim embeddings here, not the head's 768
    pick = os.path.join(reward_tree["dir"], reward_tree["files"]["pickscore"])
    with pytest.raises(RewardModelError, match="expects 768-dim CLIP embeddings"):
        load_reward_model(os.path.join(reward_tree["dir"], reward_tree["files"]["aesthetic"]),
                          clip_vision_path=pick)


def test_truncated_weights_name_the_missing_keys(tmp_path, reward_tree):
    sd = read_state_dict(os.path.join(reward_tree["dir"], reward_tree["files"]["hpsv2"]))
    del sd["ln_final.bias"]
    torch.save({"state_dict": sd}, tmp_path / "broken.pt")
    with pytest.raises(RewardModelError, match="missing 1 weights.*ln_final.bias"):
        load_reward_model(str(tmp_path / "broken.pt"))


def test_bf16_scores_close_to_fp32(reward_tree):
    """dtype control: a bf16 copy (what precision=bf16 gives on a GPU) scores like fp32."""
    x = rf.pil_to_comfy(rf.test_images(seed=15, n=3))
    for kind in ("hpsv2", "pickscore"):
        full = _load(reward_tree, kind).score(x, PROMPTS[:3])
        half = _load(reward_tree, kind, dtype=torch.bfloat16).score(x, PROMPTS[:3])
        assert half.dtype == torch.float32
        assert (half - full).abs().max() <= 0.05 * (full.abs().max() + 1e-3), (kind, full, half)
