"""ImageReward (Xu et al. 2023): BLIP ViT-L/16 image encoder, BERT-base text encoder that
cross-attends to the image, and an MLP head on the [CLS] feature, standardised by the official
mean/std.

Built on transformers' BLIP classes, whose parameters map one to one onto BLIP's original
layout (the official ``ImageReward.pt``): ``BlipVisionModel`` for ``blip.visual_encoder`` and
``BlipTextModel`` (BERT with cross-attention, no token-type embeddings) for
``blip.text_encoder``. Sizes are read from the file, so the official ViT-L/BERT-base and the
tests' small random models load through the same code.
"""
from __future__ import annotations

import inspect
import os
import re

import torch
from transformers import BertTokenizerFast, BlipTextConfig, BlipVisionConfig, BlipVisionModel
from transformers.models.blip.modeling_blip_text import BlipTextModel

from .base import PreferenceMLP, RewardModel, build_with_weights
from .checkpoint import RewardModelError, count_indices

MEAN = 0.16717362830052426  # official standardisation constants
STD = 1.0333394966054072
MAX_TOKENS = 35  # the official scorer pads/truncates prompts to 35 tokens
VOCAB = os.path.join(os.path.dirname(__file__), "vocab", "bert-base-uncased-vocab.txt")

_VIT = "blip.visual_encoder."
_TXT = "blip.text_encoder."
_VIT_RENAMES = [  # BLIP/timm ViT names → transformers' BLIP vision names
    (r"^cls_token$", "embeddings.class_embedding"),
    (r"^pos_embed$", "embeddings.position_embedding"),
    (r"^patch_embed\.proj\.", "embeddings.patch_embedding."),
    (r"^blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
    (r"^blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."),
    (r"^blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
    (r"^blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
    (r"^blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."),
    (r"^norm\.", "post_layernorm."),
]


def configs_from_state_dict(sd):
    """transformers configs for the vision and text towers, from tensor shapes."""
    try:
        width = sd[_VIT + "pos_embed"].shape[-1]
        patch = sd[_VIT + "patch_embed.proj.weight"].shape[-1]
        n_pos = sd[_VIT + "pos_embed"].shape[1]
        vision = BlipVisionConfig(
            hidden_size=width, intermediate_size=sd[_VIT + "blocks.0.mlp.fc1.weight"].shape[0],
            num_hidden_layers=count_indices(sd, re.escape(_VIT) + r"blocks\.(\d+)\."),
            num_attention_heads=width // 64, patch_size=patch,
            image_size=int(round((n_pos - 1) ** 0.5)) * patch,
            layer_norm_eps=1e-6, hidden_act="gelu")  # BLIP's ViT: LayerNorm eps 1e-6, exact GELU
        words = sd[_TXT + "embeddings.word_embeddings.weight"]
        hidden = words.shape[1]
        text = BlipTextConfig(
            vocab_size=words.shape[0], hidden_size=hidden,
            encoder_hidden_size=sd[_TXT + "encoder.layer.0.crossattention.self.key.weight"].shape[1],
            intermediate_size=sd[_TXT + "encoder.layer.0.intermediate.dense.weight"].shape[0],
            num_hidden_layers=count_indices(sd, re.escape(_TXT) + r"encoder\.layer\.(\d+)\."),
            num_attention_heads=hidden // 64,
            max_position_embeddings=sd[_TXT + "embeddings.position_embeddings.weight"].shape[0],
            layer_norm_eps=1e-12, hidden_act="gelu", pad_token_id=0,
            # the BERT ids; BlipTextConfig's defaults name BLIP's [DEC] token, unknown to small vocabularies
            bos_token_id=None, eos_token_id=None, sep_token_id=None)
    except KeyError as e:
        raise RewardModelError(f"not an ImageReward file: it lacks {e.args[0]}") from e
    return vision, text


def load_tokenizer(folder: str | None = None) -> BertTokenizerFast:
    """bert-base-uncased WordPiece plus BLIP's [DEC] and [ENC] tokens (vocabulary 30,524)."""
    vocab = os.path.join(folder, "vocab.txt") if folder else None
    vocab = vocab if vocab and os.path.isfile(vocab) else VOCAB
    if "vocab_file" in inspect.signature(BertTokenizerFast.__init__).parameters:  # transformers 4
        tok = BertTokenizerFast(vocab_file=vocab, do_lower_case=True)
    else:  # transformers 5 takes the vocabulary itself (a path there is silently not read)
        with open(vocab, encoding="utf-8") as f:
            words = {line.rstrip("\n"): i for i, line in enumerate(f)}
        tok = BertTokenizerFast(vocab=words, do_lower_case=True)
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


class ImageReward(RewardModel):
    kind = "imagereward"
    # Already standardised (mean 0, std 1 over the ImageReward data): used as is, as in ReFL.
    scale, offset = 1.0, 0.0

    def __init__(self, vision: BlipVisionModel, text: BlipTextModel, mlp: PreferenceMLP,
                 tokenizer: BertTokenizerFast):
        super().__init__()
        self.vision, self.text, self.mlp, self.tokenizer = vision, text, mlp, tokenizer
        self.input_size = vision.config.image_size

    def tokenize(self, prompts: list[str]):
        t = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=MAX_TOKENS,
                           return_tensors="pt")
        return t.input_ids.to(self.device), t.attention_mask.to(self.device)

    def _score_pixels(self, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.tokenize(prompts)
        image_embeds = self.vision(pixel_values=pixels).last_hidden_state
        image_mask = torch.ones(image_embeds.shape[:-1], dtype=torch.long, device=pixels.device)
        text = self.text(input_ids=ids, attention_mask=mask, encoder_hidden_states=image_embeds,
                         encoder_attention_mask=image_mask, is_decoder=False).last_hidden_state
        cls = text[:, 0, :]
        reward = self.mlp(cls.to(self.mlp.layers[0].weight.dtype)).float().squeeze(-1)
        return (reward - MEAN) / STD


def load_imagereward(sd: dict[str, torch.Tensor], folder: str | None = None) -> ImageReward:
    vision_cfg, text_cfg = configs_from_state_dict(sd)
    vision_sd, text_sd, mlp_sd = {}, {}, {}
    for k, v in sd.items():
        if k.startswith(_VIT):
            name = k[len(_VIT):]
            for pattern, repl in _VIT_RENAMES:
                name, n = re.subn(pattern, repl, name)
                if n:
                    break
            vision_sd[name] = v
        elif k.startswith(_TXT):
            text_sd[k[len(_TXT):]] = v
        elif k.startswith("mlp."):
            mlp_sd[k[len("mlp."):]] = v
    # BLIP_Pretrain's contrastive projections (vision_proj/text_proj) are not used by the score.
    vision = build_with_weights(lambda: BlipVisionModel(vision_cfg), vision_sd, "ImageReward image encoder")
    text = build_with_weights(lambda: BlipTextModel(text_cfg, add_pooling_layer=False), text_sd,
                              "ImageReward text encoder", ignore=("embeddings.position_ids",))
    mlp = build_with_weights(lambda: PreferenceMLP(text_cfg.hidden_size), mlp_sd, "ImageReward head")
    tokenizer = load_tokenizer(folder)
    if tokenizer.convert_tokens_to_ids("the") != 1996:  # bert-base-uncased's id; [UNK] if unread
        raise RewardModelError("the BERT vocabulary did not load (is vocab.txt a bert-base-uncased vocabulary?)")
    if len(tokenizer) > text_cfg.vocab_size:
        raise RewardModelError(
            f"the tokenizer has {len(tokenizer)} tokens but the text encoder only {text_cfg.vocab_size}")
    return ImageReward(vision, text, mlp, tokenizer)
