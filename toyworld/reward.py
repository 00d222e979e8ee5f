"""The toy world's learned reward: a small CLIP trained from scratch on noisy comparisons made with
the hidden true preference, saved as a PickScore folder (``config.json`` + ``model.safetensors``),
the layout RewardTune's Load Reward Model already reads — so the reward nodes and the trainers use
it exactly as they would a user's PickScore.

Score = exp(logit_scale) · cos(image, caption), as PickScore's; logit_scale is fixed at ln 100 so
scores sit where PickScore's do (RewardTune trains on s·(R + o) with PickScore's s = 0.1, o = −20).

Training data (``comparisons``): pictures of the training distribution's scenes — rendered, then
passed through the world's VAE so they look like what the diffusion model decodes — in pairs that
share a caption. One picture of a pair may show another caption's scene (so the reward learns
text alignment). The label is the true preference's choice with Bradley–Terry noise
(P(a ≻ b) = σ((T_a − T_b)/``LABEL_TEMPERATURE``)): the reward sees only who won, never the scores,
and never a picture outside the training distribution (no shape past radius 15, none touching the
border, no artefacts). That is what makes it over-optimisable.
"""
from __future__ import annotations

import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F

from . import scenes as S
from .preference import score_scene

LABEL_TEMPERATURE = 0.5
LOGIT_SCALE = math.log(100.0)
CONTEXT_LENGTH = 24           # tokens: the longest caption (three shapes) is 15 with its start and end


def clip_config(image_size: int = S.SIZE) -> dict:
    """A small CLIPConfig (as config.json) for ``image_size``² pictures, CLIP's 49,408-token vocabulary."""
    return {
        "model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": 64,
        "logit_scale_init_value": LOGIT_SCALE,
        "text_config": {"model_type": "clip_text_model", "vocab_size": 49408, "hidden_size": 96,
                        "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 2,
                        "max_position_embeddings": CONTEXT_LENGTH, "hidden_act": "gelu",
                        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 1},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 128, "intermediate_size": 512,
                          "num_hidden_layers": 4, "num_attention_heads": 2, "image_size": image_size,
                          "patch_size": 8, "hidden_act": "gelu"},
    }


def vocabulary_ids() -> list[int]:
    """The CLIP token ids the caption grammar uses (start and end included)."""
    from open_clip.tokenizer import SimpleTokenizer
    tok = SimpleTokenizer(context_length=CONTEXT_LENGTH)
    words = {"a", "and", ","} | set(S.COLOURS) | set(S.SHAPES) | {w for r in S.RELATIONS for w in r.split()}
    ids = {tok.sot_token_id, tok.eot_token_id}
    for w in words:
        ids.update(tok.encode(w))
    return sorted(ids)


def build(seed: int):
    """A fresh CLIPModel: transformers' own initialisation, then the word vectors the grammar does not
    use set to zero (so the saved file, mostly unused vocabulary, compresses to little)."""
    from transformers import CLIPConfig, CLIPModel
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(**clip_config()))
    with torch.no_grad():
        table = model.text_model.embeddings.token_embedding.weight
        keep = torch.zeros(table.shape[0], dtype=torch.bool)
        keep[vocabulary_ids()] = True
        table[~keep] = 0.0
        model.logit_scale.fill_(LOGIT_SCALE)
    model.logit_scale.requires_grad_(False)
    return model


def comparisons(rng: np.random.Generator, n: int, other_caption: float = 0.25):
    """``n`` comparisons of the training distribution: (scene a, scene b, caption, P(a ≻ b)) with
    b showing another caption's scene with probability ``other_caption``. P is the true
    preference's Bradley–Terry probability; the label drawn from it is the noisy choice."""
    out = []
    for _ in range(n):
        a = S.sample_scene(rng)
        pairs, relation = S.parse_caption(a.caption)
        b = S.sample_scene(rng) if rng.random() < other_caption else S.sample_scene(rng, pairs=pairs, relation=relation)
        ta, tb = score_scene(a), score_scene(S.Scene(b.background, b.shapes, b.relation, a.caption))
        out.append((a, b, a.caption, 1.0 / (1.0 + math.exp(-(ta - tb) / LABEL_TEMPERATURE))))
    return out


def tokenize(captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids and the attention mask (up to the end token) as RewardTune's PickScore feeds them."""
    from open_clip.tokenizer import SimpleTokenizer
    tok = SimpleTokenizer(context_length=CONTEXT_LENGTH)
    ids = tok(captions)
    eot = (ids == tok.eot_token_id).int().argmax(-1)
    mask = (torch.arange(ids.shape[1])[None] <= eot[:, None]).long()
    return ids, mask


def score(model, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """PickScore's score on preprocessed pixels (the same computation as rewards.clip_rewards.PickScore)."""
    image = F.normalize(model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output), dim=-1)
    text = F.normalize(model.text_projection(model.text_model(input_ids=ids, attention_mask=mask).pooler_output), dim=-1)
    return model.logit_scale.exp() * (image * text).sum(-1)


BT_SCALE = 0.1   # the learned reward's score difference that counts as one unit of log-odds


def train_reward(taesd, recipe: dict, seed: int, log=print):
    """The learned reward, trained with the Bradley–Terry loss on ``comparisons``: the probability the
    reward gives a's win is σ(BT_SCALE · (score(a) − score(b))), fitted to the noisy 0/1 choices.
    Pictures go through the world's VAE first (what the diffusion model decodes looks like that).
    Returns the model and its agreement with the true preference on fresh comparisons (noise-free
    choices: the fraction of pairs the reward ranks as the true preference does)."""
    from .train import decode_latents, encode_images
    from ..rewards.preprocess import CLIP_MEAN, CLIP_STD
    import time
    r = recipe
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)

    def pictures(scenes):
        return decode_latents(taesd, encode_images(taesd, S.render_batch(scenes)))

    def prepare(batch):
        a, b, caps, p = zip(*batch)
        imgs = torch.from_numpy(pictures(list(a) + list(b))).permute(0, 3, 1, 2)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (imgs - mean) / std, list(caps), torch.tensor(p, dtype=torch.float32)

    t0 = time.perf_counter()
    train = prepare(comparisons(rng, r["pairs"]))
    held = prepare(comparisons(rng, r["held_out_pairs"]))
    log(f"reward: {r['pairs']} comparisons rendered and passed through the VAE ({time.perf_counter() - t0:.0f} s)")
    model = build(seed)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=r["lr"], weight_decay=r["weight_decay"])
    pix, caps, prob = train
    n = len(caps)
    ids, mask = tokenize(caps)
    for step in range(r["steps"]):
        for group in opt.param_groups:
            group["lr"] = r["lr"] * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / r["steps"]))
        idx = torch.randint(0, n, (r["batch"],), generator=gen)
        label = (torch.rand(r["batch"], generator=gen) < prob[idx]).float()   # the noisy choice
        s = score(model, torch.cat([pix[idx], pix[n + idx]]), ids[idx].repeat(2, 1), mask[idx].repeat(2, 1))
        logit = BT_SCALE * (s[:r["batch"]] - s[r["batch"]:])
        loss = F.binary_cross_entropy_with_logits(logit, label)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % 500 == 0 or step + 1 == r["steps"]:
            log(f"reward step {step + 1}/{r['steps']}: loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)")
    model.eval().requires_grad_(False)
    pix, caps, prob = held
    m = len(caps)
    ids, mask = tokenize(caps)
    with torch.no_grad():
        s = score(model, pix, ids.repeat(2, 1), mask.repeat(2, 1))
    decided = (prob - 0.5).abs() > 1e-6
    agree = ((s[:m] > s[m:]) == (prob > 0.5))[decided].float().mean().item()
    return model, {"agreement": agree, "score_mean": s.mean().item(), "score_std": s.std().item()}


def save_pickscore(model, folder: str) -> None:
    """The PickScore folder layout: config.json + model.safetensors (transformers' key names)."""
    from safetensors.torch import save_file
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as f:
        json.dump(clip_config(), f, indent=1, sort_keys=True)
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    save_file(sd, os.path.join(folder, "model.safetensors"))
