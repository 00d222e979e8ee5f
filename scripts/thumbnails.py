"""Make the Templates dialog's pictures: run every example workflow headless on the toy world
(docs/toyworld.md: a tiny SD3-family model of coloured shapes with a learned reward; the same runs
as scripts/demo.py, through a real ComfyUI server) and turn each run's output into
``example_workflows/<name>.jpg`` (256×256; the dialog fetches ``<name>.jpg`` next to the JSON).

The pictures are the toy world's (64×64 shapes for toy-world captions such as "a red circle above
a blue square"), the plots, curves and scores are its learned reward's. Run it after changing a
workflow:  .venv/bin/python scripts/thumbnails.py
"""
from __future__ import annotations

import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SIZE = 256


def main() -> int:
    import argparse
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", help="the templates to redo, by key: combined best_of_n sweep diversity "
                                              "train_imagerefl train_sqdf combined_sd35 (default: all)")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    import demo
    models = demo.toy_models()   # also imports the pack as ``rewardtune``
    from rewardtune.testing.comfy_host import ComfyServer
    from rewardtune.testing.workflow import EXAMPLES, example_path

    server_dir = os.path.join(ROOT, ".rt", "thumbnails")
    shutil.rmtree(server_dir, ignore_errors=True)
    os.makedirs(server_dir)
    with ComfyServer(server_dir, models["yaml"]) as srv:
        prompts = demo.template_prompts(srv.get("/object_info"), models, server_dir, only=args.only)
        for key, prompt in prompts.items():
            entry = srv.wait(srv.queue(prompt), timeout=900)
            if entry["status"].get("status_str") != "success":
                print(f"[thumbnails] {EXAMPLES[key]} failed: {json.dumps(entry['status'])[:3000]}")
                return 1
            images, texts = outputs(entry, prompt, server_dir)
            picture = compose(key, images, texts)
            picture.save(example_path(EXAMPLES[key])[:-len(".json")] + ".jpg", quality=88)
            print(f"[thumbnails] {EXAMPLES[key]}.jpg")
    return 0


def outputs(entry, prompt, server_dir):
    """{node id: [PIL images]} and {node id: [texts]} of a finished prompt."""
    from PIL import Image
    images, texts = {}, {}
    for node_id, out in entry["outputs"].items():
        for img in out.get("images", []):
            base = os.path.join(server_dir, "temp", "temp") if img["type"] == "temp" else os.path.join(server_dir, "output")
            images.setdefault(node_id, []).append(Image.open(os.path.join(base, img["subfolder"], img["filename"])).convert("RGB"))
        texts.setdefault(node_id, []).extend(out.get("text", []))
    return images, texts


def grid(tiles, cols, cell):
    from PIL import Image
    rows = (len(tiles) + cols - 1) // cols
    out = Image.new("RGB", (cols * cell, rows * cell), "white")
    for i, tile in enumerate(tiles):
        out.paste(tile.resize((cell, cell)), ((i % cols) * cell, (i // cols) * cell))
    return out


def fit(image, box, background="white"):
    """``image`` scaled into a box×box square, centred."""
    from PIL import Image
    image = image.copy()
    image.thumbnail((box, box))
    out = Image.new("RGB", (box, box), background)
    out.paste(image, ((box - image.width) // 2, (box - image.height) // 2))
    return out


def compose(key, images, texts):
    """A 256×256 card: the run's main output (by the workflow's node ids), with a caption."""
    from PIL import Image, ImageDraw
    band = 28
    if key in ("combined", "combined_sd35"):   # Save Image nodes 12, 13, 14: base only, combined, tuned only
        seeds = min(2, len(images["12"]))       # a row per seed
        body = grid([images[i][s] for s in range(seeds) for i in ("12", "13", "14")], 3, 85)
        caption = "base | combined | tuned"
    elif key == "best_of_n":   # node 10: all candidates with their scores written on them
        body, caption = grid(images["10"], 2, 114), "4 candidates, scored"
    elif key == "sweep":   # node 6: the trade-off plot
        body, caption = images["6"][0], "reward vs diversity, Pareto front"
    elif key == "diversity":   # node 9: the 5 images
        body, caption = grid(images["9"], 3, 76), "5 seeds: diversity score"
    else:   # node 10: the reward curve, node 9: samples of the tuned model
        curve, sample = images["10"][0], images["9"]
        side = SIZE - band
        body = Image.new("RGB", (side, side), "white")
        curve = curve.resize((side, round(curve.height * side / curve.width)))
        body.paste(curve, (0, 0))
        cell = min(side - curve.height - 4, side // 2)
        body.paste(grid(sample[:2], 2, cell), ((side - 2 * cell) // 2, side - cell))
        caption = "ImageReFL: reward curve, samples" if key == "train_imagerefl" else "SQDF: reward curve, samples"
    card = Image.new("RGB", (SIZE, SIZE), "white")
    card.paste(fit(body, SIZE - band), ((SIZE - (SIZE - band)) // 2, 0))
    draw = ImageDraw.Draw(card)
    draw.rectangle([0, SIZE - band, SIZE, SIZE], fill="#2a3f5a")
    draw.text((8, SIZE - band + 8), caption, fill="white")
    return card


if __name__ == "__main__":
    sys.exit(main())
