"""Run the seven example workflows headless on the toy world, through a real ComfyUI server.

The toy world (docs/toyworld.md) is a tiny SD3-family text-to-image model trained on 64×64
pictures of coloured shapes, with a learned reward in the PickScore layout: real weights, so the
pictures are pictures ("a red circle above a blue square") and the scores mean something.

1. writes the toy world from its committed weights into ~/.cache/rewardtune (seconds, once) and
   links into a models tree: the checkpoint (``rt_toyworld.safetensors``), the reward folder
   (``rt_toyworld_pickscore/``) and the reward-tuned ReFL LoRA (``loras/``; the committed
   ``toyworld/weights/rt_toyworld_refl_lora.safetensors``, or, until that file exists, a stand-in
   this script trains once with the pack's trainer, ~2 min, kept in .rt/demo/),
2. starts ``ComfyUI/main.py --cpu`` on 127.0.0.1 with this pack in its custom nodes,
3. loads every ``example_workflows/*.json`` (the UI workflows users open, Templates → RewardTune),
   converts it with the server's /object_info and swaps in the toy world's models and settings:
   toy-world captions, 64×64, 20 steps, switch step 14 of 20 (the paper's 30 of 40 scaled), CFG 5,
   euler / simple (the world's sampler),
4. queues each over HTTP, waits for /history, fails loudly when one fails, and writes its images:
   1 combined generation: base | combined | tuned images and ``strip_base_combined_tuned.png``,
   2 best-of-N (``best_of_n/``), 3 quality-diversity sweep (``quality_diversity/``: the plot),
   4 diversity score (``diversity/``), 5 Train ImageReFL LoRA then combined generation
   (``training/``: samples and the reward curve), 6 Train SQDF LoRA (``sqdf/``), 7 combined
   generation on SD3.5 (``sd35/``: the toy world is an SD3-family model, so it runs on it too).
"""
from __future__ import annotations

import argparse
import json
import os
import runpy
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORK = os.path.join(ROOT, ".rt", "demo")

# The toy world's sampling (toyworld/evaluate.py) and the paper's 30-of-40 switch scaled to 20 steps.
SIZE, STEPS, SWITCH, CFG, SAMPLER, SCHEDULER = 64, 20, 14, 5.0, "euler", "simple"
CAPTION = "a red circle above a blue square"
CAPTIONS = (CAPTION, "a yellow triangle", "a purple square to the left of a green circle")
# The learned reward standardised on the base model's pictures, s · (R + o) with s = 1/std and
# o = −mean (as toyworld/reproduce.py does; measured on 16 base pictures: mean 55.0, std 13.4):
# ReFL-style losses are hinged at 0, so the raw reward (≈ 55) would give them no gradient.
REWARD_STANDARDISED = {"reward_scale": 0.075, "reward_offset": -55.0}
COMMITTED_LORA = os.path.join(ROOT, "toyworld", "weights", "rt_toyworld_refl_lora.safetensors")
STANDIN_LORA = "rt_toyworld_refl_lora_standin.safetensors"
# where each template's images go under --out ("" = the folder itself)
OUT_DIRS = {"combined": "", "best_of_n": "best_of_n", "sweep": "quality_diversity", "diversity": "diversity",
            "train_imagerefl": "training", "train_sqdf": "sqdf", "combined_sd35": "sd35"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "demo"), help="where the images and the strip go")
    ap.add_argument("--steps", type=int, default=STEPS, help="sampling steps (the toy world's 20)")
    ap.add_argument("--switch", type=int, default=SWITCH, help="switch step k (14 of 20: the paper's 30 of 40)")
    ap.add_argument("--only", nargs="*", choices=list(OUT_DIRS), help="run only these templates (default: all)")
    args = ap.parse_args()

    models = toy_models()
    from rewardtune.testing.comfy_host import ComfyServer
    from rewardtune.testing.workflow import EXAMPLES
    server_dir = os.path.join(WORK, "server")
    shutil.rmtree(server_dir, ignore_errors=True)
    os.makedirs(server_dir)
    out_dir = os.path.abspath(args.out)
    print("[demo] starting ComfyUI (CPU) …", flush=True)
    with ComfyServer(server_dir, models["yaml"]) as srv:
        info = srv.get("/object_info")
        missing = [n for n in ("RewardTuneCombinedKSampler", "RewardTuneCombinedGuider") if n not in info]
        if missing:
            print(f"[demo] the pack did not load: {missing} missing from /object_info\n{srv.log_tail()}")
            return 1
        prompts = template_prompts(info, models, server_dir, steps=args.steps, switch=args.switch, only=args.only)
        for key, prompt in prompts.items():
            if run_prompt(srv, server_dir, EXAMPLES[key], prompt, os.path.join(out_dir, OUT_DIRS[key])) is None:
                return 1
    if "combined" in prompts:
        strip_path = write_strip(out_dir, args.switch)
        if strip_path is None:
            return 1
        print(f"[demo] strip: {strip_path}")
    print(f"[demo] images written to {out_dir}" + (" (the LoRA is a stand-in: see above)" if models["standin"] else ""))
    return 0


def write_strip(out_dir: str, switch: int) -> str | None:
    """base | combined | tuned side by side, one row per seed, from template 1's saved images."""
    from PIL import Image, ImageDraw
    rows = {}
    for name in sorted(os.listdir(out_dir)):
        if name.endswith(".png") and not name.startswith("strip"):
            rows.setdefault(name.rsplit("_", 2)[0], []).append(os.path.join(out_dir, name))
    order = [r for r in ("base", "combined", "tuned") if r in rows]
    if order != ["base", "combined", "tuned"]:
        print(f"[demo] expected base/combined/tuned images, got {sorted(rows)}")
        return None
    tiles = [[Image.open(p).convert("RGB") for p in rows[r]] for r in order]
    scale = 2   # 64-pixel pictures, shown at twice their size
    w, h = tiles[0][0].width * scale, tiles[0][0].height * scale
    pad = 18
    strip = Image.new("RGB", (w * len(order), (h * len(tiles[0])) + pad), "white")
    draw = ImageDraw.Draw(strip)
    for c, (name, col) in enumerate(zip(order, tiles)):
        draw.text((c * w + 4, 3), name if name != "combined" else f"combined k={switch}", fill="black")
        for r, im in enumerate(col):
            strip.paste(im.resize((w, h), Image.NEAREST), (c * w, pad + r * h))
    strip_path = os.path.join(out_dir, "strip_base_combined_tuned.png")
    strip.save(strip_path)
    return strip_path


def toy_models() -> dict:
    """The toy world linked into .rt/demo/models with the reward-tuned LoRA, and the
    extra_model_paths.yaml that points a ComfyUI server at them and at this pack: the names the
    loaders list (``ckpt``, ``reward``, ``lora``), ``standin`` (the LoRA is the stand-in) and the
    path ``yaml``."""
    runpy.run_path(os.path.join(ROOT, "testing", "pack_import.py"))["import_pack"]()  # the pack as ``rewardtune``
    from rewardtune.testing.comfy_host import make_custom_nodes_dir, prepare_comfy_import, write_extra_model_paths
    from rewardtune.toyworld import world as W
    models = os.path.join(WORK, "models")
    os.makedirs(models, exist_ok=True)
    emp = write_extra_model_paths(os.path.join(WORK, "extra_model_paths.yaml"), models,
                                  custom_nodes=make_custom_nodes_dir(os.path.join(WORK, "nodes")))
    folder = W.ensure_world(log=lambda m: print(m, flush=True))
    names = W.link_models(folder, models)
    standin = not os.path.exists(COMMITTED_LORA)
    if standin:
        source = os.path.join(WORK, "standin", STANDIN_LORA)
        if not os.path.exists(source):
            prepare_comfy_import(cpu=True)
            train_standin_lora(folder, source)
        print(f"[demo] no {os.path.relpath(COMMITTED_LORA, ROOT)} yet: the tuned model is a stand-in LoRA "
              f"(ReFL, 20 steps of the pack's trainer, {source})", flush=True)
    else:
        source = COMMITTED_LORA
    lora = os.path.join(models, "loras", os.path.basename(source))
    os.makedirs(os.path.dirname(lora), exist_ok=True)
    for name in (STANDIN_LORA, os.path.basename(COMMITTED_LORA)):   # only the one in use is listed
        if os.path.lexists(os.path.join(models, "loras", name)):
            os.remove(os.path.join(models, "loras", name))
    os.symlink(source, lora)
    return {"ckpt": names["checkpoint"], "reward": names["reward"], "lora": os.path.basename(lora),
            "standin": standin, "yaml": emp}


def train_standin_lora(folder: str, path: str, steps: int = 20) -> None:
    """A ReFL LoRA made with the pack's trainer (toyworld/reproduce.py's settings, few steps), used
    until the reward-tuned LoRA is committed; written to ``path``."""
    import dataclasses
    import tempfile
    from rewardtune.toyworld import reproduce as R
    from rewardtune.toyworld import world as W
    print(f"[demo] training a stand-in ReFL LoRA on the toy world ({steps} steps, once) …", flush=True)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rep = R.Reproduction(W.load(folder), dataclasses.replace(R.REDUCED, steps=steps), log=lambda m: None,
                             lora_dir=tmp)
        rep.reward_scale, rep.reward_offset = REWARD_STANDARDISED["reward_scale"], REWARD_STANDARDISED["reward_offset"]
        rep.train("ReFL", 0)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        shutil.copyfile(os.path.join(tmp, "ReFL-seed0.safetensors"), path + ".tmp")
        os.replace(path + ".tmp", path)
    print(f"[demo] stand-in LoRA trained in {time.time() - t0:.0f}s", flush=True)


def template_prompts(info: dict, models: dict, server_dir: str, *, steps: int = STEPS, switch: int = SWITCH,
                     only=None) -> dict:
    """Every example workflow as an API prompt on the toy world, by EXAMPLES key (the demo's and
    scripts/thumbnails.py's runs). Writes template 5's dataset (toy-world pictures with their
    captions) into the server's input folder."""
    from rewardtune.testing.workflow import (EXAMPLES, combined_example_prompt, load_example, train_example_prompt,
                                             ui_to_api, write_toyworld_dataset)
    ckpt, lora, reward = models["ckpt"], models["lora"], models["reward"]
    text = {("Positive", "text"): CAPTION, ("Negative", "text"): ""}
    ksampler = {("KSampler", "steps"): steps, ("KSampler", "cfg"): CFG, ("KSampler", "sampler_name"): SAMPLER,
                ("KSampler", "scheduler"): SCHEDULER}
    c = "RewardTuneCombinedKSampler"
    combined = {(c, "steps"): steps, (c, "switch_unit.switch_step"): switch, (c, "cfg_base"): CFG,
                (c, "cfg_tuned"): CFG, (c, "sampler_name"): SAMPLER, (c, "scheduler"): SCHEDULER}
    latent = {("EmptyLatentImage", "width"): SIZE, ("EmptyLatentImage", "height"): SIZE}
    reward_fp32 = {("RewardTuneLoadRewardModel", "reward_model"): reward, ("RewardTuneLoadRewardModel", "precision"): "fp32"}
    t = "RewardTuneTrainLoRA"
    schedule = {"num_steps": steps, "cfg": CFG, "imagerefl_start": switch, "imagerefl_tf_min": switch,
                "imagerefl_tf_max": steps - 1, **REWARD_STANDARDISED}
    builders = {
        "combined": lambda: combined_example_prompt(info, ckpt, lora, steps=steps, switch=switch, size=SIZE, replace={
            **text, **ksampler, **combined, ("EmptyLatentImage", "batch_size"): 4}),
        "best_of_n": lambda: ui_to_api(load_example(EXAMPLES["best_of_n"]), info, {
            ("CheckpointLoaderSimple", "ckpt_name"): ckpt, **reward_fp32, **latent, **ksampler,
            ("PrimitiveStringMultiline", "value"): CAPTION, ("Negative", "text"): ""}),
        "sweep": lambda: ui_to_api(load_example(EXAMPLES["sweep"]), info, {
            ("CheckpointLoaderSimple", "ckpt_name"): ckpt, ("LoraLoader", "lora_name"): lora, **reward_fp32,
            ("RewardTuneQualityDiversitySweep", "prompts"): "\n".join(CAPTIONS),
            ("RewardTuneQualityDiversitySweep", "negative"): "",
            ("RewardTuneQualityDiversitySweep", "steps"): steps,
            ("RewardTuneQualityDiversitySweep", "switch_steps"): ", ".join(str(k) for k in sorted({0, switch // 2, switch, (switch + steps) // 2, steps})),
            ("RewardTuneQualityDiversitySweep", "images_per_prompt"): 3,
            ("RewardTuneQualityDiversitySweep", "cfg_base"): CFG, ("RewardTuneQualityDiversitySweep", "cfg_tuned"): CFG,
            ("RewardTuneQualityDiversitySweep", "sampler_name"): SAMPLER,
            ("RewardTuneQualityDiversitySweep", "scheduler"): SCHEDULER,
            ("RewardTuneQualityDiversitySweep", "width"): SIZE, ("RewardTuneQualityDiversitySweep", "height"): SIZE}),
        "diversity": lambda: ui_to_api(load_example(EXAMPLES["diversity"]), info, {
            ("CheckpointLoaderSimple", "ckpt_name"): ckpt, **text, **latent, **ksampler}),
        "train_imagerefl": lambda: train_example_prompt(
            info, ckpt, reward, write_dataset(write_toyworld_dataset, server_dir), job_name="demo-imagerefl",
            train_steps=8, size=SIZE, steps=steps, switch=switch, schedule=schedule,
            replace={**text, **combined}),
        "train_sqdf": lambda: ui_to_api(load_example(EXAMPLES["train_sqdf"]), info, {
            ("CheckpointLoaderSimple", "ckpt_name"): ckpt, **reward_fp32, **text, **latent, **ksampler,
            (t, "job_name"): "demo-sqdf", (t, "prompts"): "\n".join(CAPTIONS),
            (t, "width"): SIZE, (t, "height"): SIZE, (t, "precision"): "fp32", (t, "gradient_checkpointing"): False,
            (t, "config_json"): json.dumps({"num_steps": steps, "cfg": CFG, "steps": 4, "batch_size": 2, "rank": 8,
                                            "sqdf_collect": 2, "sqdf_buffer": 8, "sqdf_window": 8,
                                            **REWARD_STANDARDISED}),
            ("EmptyLatentImage", "batch_size"): 2}),
        "combined_sd35": lambda: ui_to_api(load_example(EXAMPLES["combined_sd35"]), info, {
            ("CheckpointLoaderSimple", "ckpt_name"): ckpt, ("LoraLoader", "lora_name"): lora, **text, **ksampler,
            **combined, ("EmptySD3LatentImage", "width"): SIZE, ("EmptySD3LatentImage", "height"): SIZE}),
    }
    return {key: build() for key, build in builders.items() if not only or key in only}


DATASET = "rewardtune_demo_dataset"


def write_dataset(writer, server_dir: str) -> str:
    """Template 5's dataset folder (in the server's input directory) by ``writer``; its name."""
    writer(os.path.join(server_dir, "input", DATASET))
    return DATASET


def run_prompt(srv, server_dir, name, prompt, out_dir) -> dict | None:
    """Queue ``prompt`` (the example workflow ``name``), copy its images into ``out_dir``; its
    /history entry, or None (printed) when it failed."""
    t0 = time.time()
    entry = srv.wait(srv.queue(prompt), timeout=900)
    if entry["status"].get("status_str") != "success":
        print(f"[demo] {name} failed: {json.dumps(entry['status'], indent=1)[:4000]}")
        return None
    print(f"[demo] {name} ran in {time.time() - t0:.1f}s", flush=True)
    os.makedirs(out_dir, exist_ok=True)
    for node_out in entry["outputs"].values():
        for img in node_out.get("images", []):
            # previews go to <temp-directory>/temp, saved images to the output directory
            base = os.path.join(server_dir, "temp", "temp") if img["type"] == "temp" else os.path.join(server_dir, "output")
            src = os.path.join(base, img["subfolder"], img["filename"])
            shutil.copyfile(src, os.path.join(out_dir, img["filename"]))
        for text in node_out.get("text", []):
            if text.lstrip().startswith(("[", "{")):
                continue  # the JSON table (shown by Preview as Text); the node's own text says the same
            print("[demo] " + text.replace("\n", "\n[demo]   "))
    return entry


if __name__ == "__main__":
    sys.exit(main())
