"""Random-weight reward models in the official file layouts, and the reference scorers.

Each ``write_*`` builds the *reference* implementation (open_clip, transformers' CLIP) with random
weights, perturbs every LayerNorm and bias so a wrong eps or a dropped bias shows in the scores,
and saves the state dict the way the official file is saved. The ``reference_*`` functions score
PIL images the way the official code does (PIL preprocessing, the reference tokenizer), so a test
compares RewardTune's loader + scorer against an independent path.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch import nn

TINY_OPEN_CLIP = {"embed_dim": 64,
                  "vision_cfg": {"image_size": 224, "layers": 2, "width": 128, "patch_size": 32,
                                 "head_width": 64},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 128, "heads": 2,
                               "layers": 2}}


def perturb_(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or "ln_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_images(seed: int = 0, size=(224, 224), n: int = 3) -> list[Image.Image]:
    """Smooth random colour fields (so resizing behaves like on real pictures) plus noise."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        w, h = size
        small = rng.uniform(0, 255, (max(h // 16, 2), max(w // 16, 2), 3)).astype(np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
        out.append(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)))
    return out


def pil_to_comfy(images: list[Image.Image]) -> torch.Tensor:
    """PIL images → ComfyUI IMAGE (B, H, W, C) float in [0, 1], as LoadImage makes them."""
    return torch.stack([torch.from_numpy(np.asarray(i.convert("RGB"), dtype=np.float32) / 255.0)
                        for i in images])


# ----------------------------------------------------------------------------------- HPSv2
def write_hpsv2(path: str, seed: int = 0, architecture: str | dict = "tiny"):
    import open_clip
    from open_clip.model import CLIP
    torch.manual_seed(seed)
    if architecture == "ViT-H-14":
        model = open_clip.create_model("ViT-H-14", pretrained=None)
    else:
        model = CLIP(**(TINY_OPEN_CLIP if architecture == "tiny" else architecture))
    perturb_(model, seed)
    with torch.no_grad():
        model.logit_scale.fill_(4.6)
    # HPS_v2_compressed.pt holds {"state_dict": ...}
    torch.save({"state_dict": model.state_dict()}, path)
    return model


def reference_hpsv2(model, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
    """hpsv2.score's recipe: open_clip val transform on PIL, open_clip tokenizer, cosine."""
    import open_clip
    from open_clip.transform import image_transform
    size = model.visual.image_size
    preprocess = image_transform(size[0] if isinstance(size, tuple) else size, is_train=False)
    tok = open_clip.tokenizer.SimpleTokenizer(context_length=model.context_length)
    with torch.no_grad():
        img = torch.stack([preprocess(i) for i in images])
        feats_i = model.encode_image(img, normalize=True)
        feats_t = model.encode_text(tok(prompts), normalize=True)
        return torch.diagonal(feats_i @ feats_t.T)


# -------------------------------------------------------------------- transformers CLIP family
def tiny_clip_config(hidden_act: str, projection_dim: int = 64):
    from transformers import CLIPConfig
    return CLIPConfig(
        text_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=77, hidden_act=hidden_act,
                         vocab_size=49408, eos_token_id=2, bos_token_id=0, pad_token_id=1),
        vision_config=dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                           num_attention_heads=2, image_size=224, patch_size=32, hidden_act=hidden_act),
        projection_dim=projection_dim)


def write_hf_clip(folder_or_file: str, seed: int = 0, hidden_act: str = "gelu", projection_dim: int = 64):
    """An HF CLIPModel: a folder (config.json + model.safetensors, like PickScore_v1) or, for a
    path ending in .safetensors, its vision tower + projection alone (the layout of ComfyUI's
    clip_vision files, CLIPVisionModelWithProjection)."""
    from transformers import CLIPModel
    torch.manual_seed(seed)
    model = perturb_(CLIPModel(tiny_clip_config(hidden_act, projection_dim)), seed)
    with torch.no_grad():
        model.logit_scale.fill_(4.6)
    if folder_or_file.endswith(".safetensors"):
        import safetensors.torch
        safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()
                                     if k.startswith(("vision_model.", "visual_projection."))},
                                    folder_or_file)
    else:
        model.save_pretrained(folder_or_file, safe_serialization=True)
    return model


def clip_processor():
    """CLIPProcessor built offline: CLIP's image processor defaults and the CLIP BPE tokenizer
    from ComfyUI's own sd1_tokenizer folder (the files PickScore's processor uses)."""
    from transformers import CLIPImageProcessor, CLIPProcessor, CLIPTokenizer
    from .comfy_host import comfyui_dir
    tok = CLIPTokenizer.from_pretrained(os.path.join(comfyui_dir(), "comfy", "sd1_tokenizer"))
    return CLIPProcessor(image_processor=CLIPImageProcessor(), tokenizer=tok)


def reference_pickscore(model, prompts: list[str], images: list[Image.Image]) -> torch.Tensor:
    """PickScore's published inference recipe."""
    proc = clip_processor()
    with torch.no_grad():
        img = proc(images=images, return_tensors="pt")
        txt = proc(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        fi = model.get_image_features(**img)
        ft = model.get_text_features(**txt)
        fi = getattr(fi, "pooler_output", fi)
        ft = getattr(ft, "pooler_output", ft)
        fi = fi / fi.norm(dim=-1, keepdim=True)
        ft = ft / ft.norm(dim=-1, keepdim=True)
        return model.logit_scale.exp() * (fi * ft).sum(-1)


def aesthetic_head(seed: int = 0, width: int = 768) -> nn.Sequential:
    """improved-aesthetic-predictor's MLP, as its simple_inference.py defines it."""
    torch.manual_seed(seed)
    head = nn.Sequential(nn.Linear(width, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
                         nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))
    with torch.no_grad():  # large enough that different images get clearly different scores
        for layer in head:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0, 3.0 / layer.in_features ** 0.5)
                layer.bias.normal_(0, 0.5)
    return head.eval()


def write_aesthetic(path: str, seed: int = 0, width: int = 768) -> nn.Sequential:
    wrapper = nn.Module()
    wrapper.layers = aesthetic_head(seed, width)
    torch.save(wrapper.state_dict(), path)  # keys layers.0.weight … layers.7.bias, as the .pth
    return wrapper.layers


def reference_aesthetic(clip, head, images: list[Image.Image]) -> torch.Tensor:
    proc = clip_processor()
    with torch.no_grad():
        fi = clip.get_image_features(**proc(images=images, return_tensors="pt"))
        fi = getattr(fi, "pooler_output", fi)
        fi = fi / fi.norm(dim=-1, keepdim=True)
        return head(fi).squeeze(-1)


def write_clip_vitl14_vision(path: str, seed: int = 0):
    """OpenAI CLIP ViT-L/14 vision tower + projection at full size (304M parameters), random, in
    the layout of ComfyUI's clip_vision files: the smallest CLIP ComfyUI's CLIPVisionLoader detects."""
    import safetensors.torch
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    torch.manual_seed(seed)
    cfg = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                           num_attention_heads=16, image_size=224, patch_size=14, projection_dim=768,
                           hidden_act="quick_gelu")
    model = perturb_(CLIPVisionModelWithProjection(cfg), seed)
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model
