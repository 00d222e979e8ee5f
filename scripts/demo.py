"""Run the combined-generation example workflow headless through a real ComfyUI server.

1. writes tiny random-weight models (a detectable SD1.5 checkpoint with CLIP-L and a TAESD VAE,
   and a LoRA standing in for the reward-tuned model) into a models tree,
2. starts ``ComfyUI/main.py --cpu`` on 127.0.0.1 with this pack in its custom nodes,
3. loads ``example_workflows/1 Combined generation (base then tuned model).json`` (the UI workflow
   users open, Templates → RewardTune), converts it
   with the server's /object_info, swaps in the tiny model names (and a small size/step count),
4. queues it over HTTP, waits for /history, and writes the images plus a base | combined | tuned
   strip to the output folder,
5. runs ``2 Best-of-N with a reward model.json`` the same way with a tiny random reward model in the
   official HPSv2 file layout: 4 candidates scored, the best kept (``best_of_n/`` in the output),
6. runs ``3 Quality-diversity sweep (trade-off plot).json``: reward vs diversity for k = 0, 4, 6, 8
   of 8 steps (``quality_diversity/`` in the output: the plot),
7. runs ``5 Train ImageReFL LoRA, then combined generation.json``: a Train Reward LoRA job (ImageReFL,
   8 steps on 4 generated captioned images) then the Combined KSampler base → freshly tuned
   (``training/`` in the output: the two images and the reward curve),
8. runs ``7 Combined generation on SD3.5 (flow model).json`` on a tiny SD3.5 checkpoint (an MMDiT
   rectified-flow transformer with CLIP-L and a 16-channel TAESD) and a LoRA for it (``sd35/``).
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "out", "demo"), help="where the images and the strip go")
    ap.add_argument("--steps", type=int, default=40, help="sampling steps (the paper's 40)")
    ap.add_argument("--switch", type=int, default=30, help="switch step k (the paper's 30 for SD1.5)")
    ap.add_argument("--size", type=int, default=128, help="image size in pixels (tiny models: keep it small)")
    args = ap.parse_args()

    models = tiny_models()
    from rewardtune.testing.comfy_host import ComfyServer
    from rewardtune.testing.workflow import EXAMPLES, combined_example_prompt
    ckpt, lora, reward, emp = models["ckpt"], models["lora"], models["reward"], models["yaml"]
    work = os.path.join(ROOT, ".rt", "demo")

    server_dir = os.path.join(work, "server")
    shutil.rmtree(server_dir, ignore_errors=True)
    os.makedirs(server_dir)
    print("[demo] starting ComfyUI (CPU) …", flush=True)
    with ComfyServer(server_dir, emp) as srv:
        info = srv.get("/object_info")
        missing = [n for n in ("RewardTuneCombinedKSampler", "RewardTuneCombinedGuider") if n not in info]
        if missing:
            print(f"[demo] the pack did not load: {missing} missing from /object_info\n{srv.log_tail()}")
            return 1
        prompt = combined_example_prompt(info, ckpt, lora,
                                         steps=args.steps, switch=args.switch, size=args.size)
        t0 = time.time()
        pid = srv.queue(prompt)
        entry = srv.wait(pid, timeout=600)
        if entry["status"].get("status_str") != "success":
            print(f"[demo] the workflow failed: {json.dumps(entry['status'], indent=1)[:4000]}")
            return 1
        print(f"[demo] workflow ran in {time.time() - t0:.1f}s", flush=True)
        out_dir = os.path.abspath(args.out)
        os.makedirs(out_dir, exist_ok=True)
        rows = {}
        for node_out in entry["outputs"].values():
            for img in node_out.get("images", []):
                src = os.path.join(server_dir, "output", img["subfolder"], img["filename"])
                label = img["filename"].rsplit("_", 2)[0]
                dst = os.path.join(out_dir, img["filename"])
                shutil.copyfile(src, dst)
                rows.setdefault(label, []).append(dst)
        if run_best_of_n(srv, info, server_dir, ckpt, reward,
                         os.path.join(out_dir, "best_of_n"), args.size) != 0:
            return 1
        if run_workflow(srv, info, server_dir, EXAMPLES["sweep"], {
                ("CheckpointLoaderSimple", "ckpt_name"): ckpt,
                ("LoraLoader", "lora_name"): lora,
                ("RewardTuneLoadRewardModel", "reward_model"): reward,
                ("RewardTuneQualityDiversitySweep", "steps"): 8,
                ("RewardTuneQualityDiversitySweep", "switch_steps"): "0, 4, 6, 8",
                ("RewardTuneQualityDiversitySweep", "images_per_prompt"): 3,
                ("RewardTuneQualityDiversitySweep", "width"): 64,
                ("RewardTuneQualityDiversitySweep", "height"): 64}, os.path.join(out_dir, "quality_diversity")) != 0:
            return 1
        if run_training(srv, info, server_dir, ckpt, reward,
                        os.path.join(out_dir, "training")) != 0:
            return 1
        if run_workflow(srv, info, server_dir, EXAMPLES["combined_sd35"], {
                ("CheckpointLoaderSimple", "ckpt_name"): models["sd35"],
                ("LoraLoader", "lora_name"): models["sd35_lora"],
                ("EmptySD3LatentImage", "width"): 64, ("EmptySD3LatentImage", "height"): 64,
                ("KSampler", "steps"): 8, ("RewardTuneCombinedKSampler", "steps"): 8,
                ("RewardTuneCombinedKSampler", "switch_unit.switch_step"): 6}, os.path.join(out_dir, "sd35")) != 0:
            return 1
    from PIL import Image, ImageDraw
    order = [r for r in ("base", "combined", "tuned") if r in rows]
    if order != ["base", "combined", "tuned"]:
        print(f"[demo] expected base/combined/tuned images, got {sorted(rows)}")
        return 1
    tiles = [[Image.open(p).convert("RGB") for p in sorted(rows[r])] for r in order]
    w, h = tiles[0][0].size
    pad = 18
    strip = Image.new("RGB", (w * len(order), (h * len(tiles[0])) + pad), "white")
    draw = ImageDraw.Draw(strip)
    for c, (name, col) in enumerate(zip(order, tiles)):
        draw.text((c * w + 4, 3), name if name != "combined" else f"combined k={args.switch}", fill="black")
        for r, im in enumerate(col):
            strip.paste(im, (c * w, pad + r * h))
    strip_path = os.path.join(out_dir, "strip_base_combined_tuned.png")
    strip.save(strip_path)
    print(f"[demo] images and strip written to {out_dir}")
    print(f"[demo] strip: {strip_path}")
    return 0


def tiny_models() -> dict:
    """The demo's tiny random-weight models (written once into .rt/demo/models) and the
    extra_model_paths.yaml that points a ComfyUI server at them and at this pack: file names
    ``ckpt``, ``lora``, ``reward`` and the path ``yaml``."""
    runpy.run_path(os.path.join(ROOT, "testing", "pack_import.py"))["import_pack"]()  # the pack as ``rewardtune``
    from rewardtune.testing.comfy_host import make_custom_nodes_dir, prepare_comfy_import, write_extra_model_paths
    work = os.path.join(ROOT, ".rt", "demo")
    models = os.path.join(work, "models")
    os.makedirs(work, exist_ok=True)
    ckpt = os.path.join(models, "checkpoints", "rt_demo_sd15.safetensors")
    lora = os.path.join(models, "loras", "rt_demo_tuned_lora.safetensors")
    emp = write_extra_model_paths(os.path.join(work, "extra_model_paths.yaml"), models,
                                  custom_nodes=make_custom_nodes_dir(os.path.join(work, "nodes")))
    reward = os.path.join(models, "reward_models", "rt_demo_HPS_v2.1_tiny.pt")
    sd35 = os.path.join(models, "checkpoints", "rt_demo_sd35.safetensors")
    sd35_lora = os.path.join(models, "loras", "rt_demo_sd35_lora.safetensors")
    if not all(os.path.exists(p) for p in (ckpt, lora, reward, sd35, sd35_lora)):
        print("[demo] writing tiny random-weight models …", flush=True)
        prepare_comfy_import(cpu=True)
        from rewardtune.testing import reward_fixtures as rf
        from rewardtune.testing import tiny_models as tm
        tm.write_sd15_checkpoint(ckpt, seed=0)
        tm.write_sd15_lora(lora, seed=3, scale=0.5)
        rf.write_hpsv2(reward, seed=0)
        from rewardtune.testing import tiny_flow_models as tf
        tf.write_sd35_checkpoint(sd35, seed=0, lora_path=sd35_lora)
    return {"ckpt": os.path.basename(ckpt), "lora": os.path.basename(lora), "reward": os.path.basename(reward),
            "sd35": os.path.basename(sd35), "sd35_lora": os.path.basename(sd35_lora), "yaml": emp}


def run_best_of_n(srv, info, server_dir, ckpt_name, reward_name, out_dir, size) -> int:
    from rewardtune.testing.workflow import EXAMPLES
    return run_workflow(srv, info, server_dir, EXAMPLES["best_of_n"], {
        ("CheckpointLoaderSimple", "ckpt_name"): ckpt_name,
        ("RewardTuneLoadRewardModel", "reward_model"): reward_name,
        ("EmptyLatentImage", "width"): size, ("EmptyLatentImage", "height"): size, ("KSampler", "steps"): 20}, out_dir)


def run_workflow(srv, info, server_dir, name, replace, out_dir) -> int:
    """Queue a shipped example workflow (with tiny-model names swapped in), copy its images."""
    from rewardtune.testing.workflow import load_example, ui_to_api
    return run_prompt(srv, server_dir, name, ui_to_api(load_example(name), info, replace), out_dir)


def run_training(srv, info, server_dir, ckpt_name, reward_name, out_dir) -> int:
    """The ImageReFL template (5 Train ImageReFL LoRA, then combined generation): ImageReFL on a small
    generated folder in the input directory, then base → freshly tuned with the Combined KSampler."""
    from rewardtune.testing.workflow import EXAMPLES, train_example_prompt, write_tiny_dataset
    write_tiny_dataset(os.path.join(server_dir, "input", "rewardtune_demo_dataset"))
    prompt = train_example_prompt(info, ckpt_name, reward_name, "rewardtune_demo_dataset",
                                  job_name="demo-imagerefl", train_steps=8)
    return run_prompt(srv, server_dir, EXAMPLES["train_imagerefl"], prompt, out_dir)


def run_prompt(srv, server_dir, name, prompt, out_dir) -> int:
    t0 = time.time()
    entry = srv.wait(srv.queue(prompt), timeout=600)
    if entry["status"].get("status_str") != "success":
        print(f"[demo] {name} failed: {json.dumps(entry['status'], indent=1)[:4000]}")
        return 1
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
