"""CLIP-family rewards: HPSv2/HPSv2.1 (OpenCLIP), PickScore (transformers CLIP), LAION aesthetic.

Architectures are read from tensor shapes (or an HF ``config.json`` beside the weights), so the
official ViT-H-14 / ViT-L/14 files and the tests' small random models go through the same code.
Text features do not depend on the image, so they are cached per prompt.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .base import PreferenceMLP, RewardModel, build_with_weights
from .checkpoint import RewardModelError, count_indices

# Attention heads per width where they are not width/64 (OpenCLIP / LAION / OpenAI towers).
_VISION_HEADS = {768: 12, 1024: 16, 1280: 16, 1408: 16, 1664: 16}


def _clip_tokenizer(context_length: int):
    # open_clip ships CLIP's BPE vocabulary (the same byte-pair merges as OpenAI's and LAION's
    # CLIPTokenizer): no tokenizer files from the hub.
    from open_clip.tokenizer import SimpleTokenizer
    return SimpleTokenizer(context_length=context_length)


class _TextCache:
    """Normalised text features per prompt (prompts repeat across a training run)."""

    def __init__(self, encode: Callable[[list[str]], torch.Tensor], limit: int = 4096):
        self.encode, self.limit, self.features = encode, limit, {}

    def __call__(self, prompts: list[str], device, dtype) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self.features]
        if todo:
            with torch.no_grad():
                feats = F.normalize(self.encode(todo).float(), dim=-1)
            if len(self.features) + len(todo) > self.limit:
                self.features.clear()
            self.features.update(zip(todo, feats))
        return torch.stack([self.features[p] for p in prompts]).to(device, dtype)

    def clear(self):
        self.features.clear()


# --------------------------------------------------------------------------------------- HPSv2
def open_clip_config(sd) -> dict:
    """open_clip ``CLIP(**cfg)`` arguments for an OpenCLIP-layout state dict."""
    try:
        width = sd["visual.conv1.weight"].shape[0]
        patch = sd["visual.conv1.weight"].shape[-1]
        grid = int(round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5))
        text_width = sd["ln_final.weight"].shape[0]
        heads = _VISION_HEADS.get(width, width // 64)
        return {
            "embed_dim": sd["visual.proj"].shape[1],
            "vision_cfg": {
                "image_size": grid * patch, "patch_size": patch, "width": width,
                "layers": count_indices(sd, r"visual\.transformer\.resblocks\.(\d+)\."),
                "head_width": width // heads,
                "mlp_ratio": sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / width},
            "text_cfg": {
                "context_length": sd["positional_embedding"].shape[0],
                "vocab_size": sd["token_embedding.weight"].shape[0], "width": text_width,
                "heads": text_width // 64,
                "layers": count_indices(sd, r"transformer\.resblocks\.(\d+)\."),
                "mlp_ratio": sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0] / text_width},
        }
    except KeyError as e:
        raise RewardModelError(f"not an OpenCLIP (HPSv2) file: it lacks {e.args[0]}") from e


class HPSv2(RewardModel):
    """HPS v2 / v2.1 (Wu et al. 2023): OpenCLIP ViT-H-14 fine-tuned on human preferences.
    Score = cosine(image, text), as the official ``hpsv2.score`` returns it (≈0.2–0.35)."""

    kind = "hpsv2"
    # s·(R + o) with s = 10, o = −0.2: the ×100 "HPS" scale with PickScore's ImageReFL mapping
    # 0.1·(100·R − 20), so a typical image lands near 0–1.5 like the other rewards.
    scale, offset = 10.0, -0.2

    def __init__(self, clip, context_length: int, label: str = "hpsv2"):
        super().__init__()
        self.clip = clip
        self.kind = self.label = label
        self.input_size = clip.visual.image_size[0] if isinstance(clip.visual.image_size, tuple) \
            else clip.visual.image_size
        self.tokenizer = _clip_tokenizer(context_length)
        self.text_features = _TextCache(self._encode_text)

    def _encode_text(self, prompts):
        return self.clip.encode_text(self.tokenizer(prompts).to(self.device))

    def _score_pixels(self, pixels, prompts):
        image = F.normalize(self.clip.encode_image(pixels).float(), dim=-1)
        text = self.text_features(prompts, pixels.device, torch.float32)
        return (image * text).sum(-1)


def load_hpsv2(sd, label: str = "hpsv2") -> HPSv2:
    from open_clip.model import CLIP
    cfg = open_clip_config(sd)
    # ViT-H-14 uses exact GELU (quick_gelu=False), as open_clip's own ViT-H-14 config.
    clip = build_with_weights(lambda: CLIP(**cfg), sd, "HPSv2 (OpenCLIP)")
    return HPSv2(clip, cfg["text_cfg"]["context_length"], label)


# ----------------------------------------------------------------------- transformers CLIP family
def hf_clip_config(sd, folder_config: dict | None, quick_gelu: bool):
    """``CLIPConfig`` from config.json beside the weights, else from tensor shapes."""
    from transformers import CLIPConfig
    if folder_config is not None and folder_config.get("model_type") == "clip":
        return CLIPConfig(**{k: v for k, v in folder_config.items() if k != "transformers_version"})
    vision = hf_clip_vision_config(sd, quick_gelu).to_dict()
    try:
        words = sd["text_model.embeddings.token_embedding.weight"]
        width = words.shape[1]
        text = dict(vocab_size=words.shape[0], hidden_size=width,
                    intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
                    num_hidden_layers=count_indices(sd, r"text_model\.encoder\.layers\.(\d+)\."),
                    num_attention_heads=width // 64,
                    max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
                    hidden_act=vision["hidden_act"], eos_token_id=49407, bos_token_id=49406,
                    pad_token_id=1)
        return CLIPConfig(text_config=text, vision_config=vision,
                          projection_dim=sd["text_projection.weight"].shape[0])
    except KeyError as e:
        raise RewardModelError(f"not a CLIP model file: it lacks {e.args[0]}") from e


def hf_clip_vision_config(sd, quick_gelu: bool):
    from transformers import CLIPVisionConfig
    try:
        patch_w = sd["vision_model.embeddings.patch_embedding.weight"]
        width, patch = patch_w.shape[0], patch_w.shape[-1]
        n_pos = sd["vision_model.embeddings.position_embedding.weight"].shape[0]
        proj = sd.get("visual_projection.weight")
        return CLIPVisionConfig(
            hidden_size=width, patch_size=patch, image_size=int(round((n_pos - 1) ** 0.5)) * patch,
            intermediate_size=sd["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=count_indices(sd, r"vision_model\.encoder\.layers\.(\d+)\."),
            num_attention_heads=_VISION_HEADS.get(width, width // 64),
            projection_dim=proj.shape[0] if proj is not None else width,
            hidden_act="quick_gelu" if quick_gelu else "gelu")
    except KeyError as e:
        raise RewardModelError(f"not a CLIP vision file: it lacks {e.args[0]}") from e


class PickScore(RewardModel):
    """PickScore (Kirstain et al. 2023): CLIP-H fine-tuned on Pick-a-Pic.
    Score = logit_scale.exp() · cosine(image, text) (≈100·cos, typically 18–24)."""

    kind = "pickscore"
    scale, offset = 0.1, -20.0  # ImageReFL's s = 0.1, o = −20

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.input_size = clip.config.vision_config.image_size
        self.tokenizer = _clip_tokenizer(clip.config.text_config.max_position_embeddings)
        self.text_features = _TextCache(self._encode_text)

    def _encode_text(self, prompts):
        ids = self.tokenizer(prompts).to(self.device)
        # Attention stops at the end-of-text token, as the PickScore processor's padding mask does
        eot = (ids == self.tokenizer.eot_token_id).int().argmax(-1)
        mask = (torch.arange(ids.shape[1], device=ids.device)[None] <= eot[:, None]).long()
        out = self.clip.text_model(input_ids=ids, attention_mask=mask)
        return self.clip.text_projection(out.pooler_output)

    def _score_pixels(self, pixels, prompts):
        out = self.clip.vision_model(pixel_values=pixels)
        image = F.normalize(self.clip.visual_projection(out.pooler_output).float(), dim=-1)
        text = self.text_features(prompts, pixels.device, torch.float32)
        return self.clip.logit_scale.exp().float() * (image * text).sum(-1)


def load_pickscore(sd, folder_config=None) -> PickScore:
    from transformers import CLIPModel
    config = hf_clip_config(sd, folder_config, quick_gelu=False)  # CLIP-H (LAION): exact GELU
    clip = build_with_weights(lambda: CLIPModel(config), sd, "PickScore (CLIP)")
    return PickScore(clip)


class Aesthetic(RewardModel):
    """LAION improved aesthetic predictor: CLIP ViT-L/14 image embedding, L2-normalised, → MLP.
    Scores ≈ 1–10 (most images 4–7). No prompt."""

    kind = "aesthetic"
    needs_prompt = False
    scale, offset = 1.0, -5.0  # centre a typical image (≈5) at 0; unit scale

    def __init__(self, image_encoder: nn.Module, mlp: PreferenceMLP, input_size: int = 224,
                 mean=None, std=None):
        super().__init__()
        self.image_encoder, self.mlp, self.input_size = image_encoder, mlp, input_size
        if mean is not None:
            self.mean, self.std = tuple(mean), tuple(std)

    def _score_pixels(self, pixels, prompts):
        emb = F.normalize(self.image_encoder(pixels).float(), dim=-1)
        return self.mlp(emb.to(self.mlp.layers[0].weight.dtype)).float().squeeze(-1)


class HFClipImageEmbedder(nn.Module):
    """CLIPVisionModelWithProjection-style image embedding from transformers' CLIP vision tower."""

    def __init__(self, vision_model, visual_projection):
        super().__init__()
        self.vision_model, self.visual_projection = vision_model, visual_projection

    def forward(self, pixels):
        return self.visual_projection(self.vision_model(pixel_values=pixels).pooler_output)


class ComfyClipVisionEmbedder(nn.Module):
    """ComfyUI's own CLIP_VISION model (``comfy.clip_vision.ClipVisionModel``) as the image
    encoder, called with RewardTune's differentiable preprocessing."""

    def __init__(self, clip_vision):
        super().__init__()
        self.model = clip_vision.model  # registered, so .to() and .parameters() reach it

    def forward(self, pixels):
        return self.model(pixel_values=pixels, intermediate_output=-2)[2]


def clip_vision_embedder(sd, folder_config=None, quick_gelu: bool = True) -> HFClipImageEmbedder:
    """Image tower + projection from a CLIP file (full CLIPModel or vision-only)."""
    from transformers import CLIPVisionModel
    if folder_config is not None and folder_config.get("model_type") == "clip":
        from transformers import CLIPVisionConfig
        vcfg = CLIPVisionConfig(**{**folder_config["vision_config"],
                                   "projection_dim": folder_config.get("projection_dim", 512)})
    elif folder_config is not None and folder_config.get("model_type") == "clip_vision_model":
        from transformers import CLIPVisionConfig
        vcfg = CLIPVisionConfig(**{k: v for k, v in folder_config.items() if k != "transformers_version"})
    else:
        vcfg = hf_clip_vision_config(sd, quick_gelu)
    if "visual_projection.weight" not in sd:
        raise RewardModelError("the CLIP vision file has no visual_projection: the aesthetic "
                               "predictor needs the projected image embedding (CLIP ViT-L/14 with projection)")
    vision_sd = {k[len("vision_model."):]: v for k, v in sd.items() if k.startswith("vision_model.")}
    vision = build_with_weights(lambda: CLIPVisionModel(vcfg), vision_sd, "CLIP vision",
                                ignore=("embeddings.position_ids",))
    proj = build_with_weights(lambda: nn.Linear(vcfg.hidden_size, vcfg.projection_dim, bias=False),
                              {"weight": sd["visual_projection.weight"]}, "CLIP projection")
    return HFClipImageEmbedder(vision, proj)


def load_aesthetic(mlp_sd, image_encoder: nn.Module, input_size=224, mean=None, std=None) -> Aesthetic:
    width = mlp_sd["layers.0.weight"].shape[1]
    mlp = build_with_weights(lambda: PreferenceMLP(width), mlp_sd, "aesthetic predictor head")
    return Aesthetic(image_encoder, mlp, input_size, mean, std)
