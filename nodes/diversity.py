"""Node adapters for diversity: embedder loader, diversity score, quality–diversity sweep."""
from __future__ import annotations

import json

import comfy.model_management as mm
import comfy.samplers
import comfy.utils
import numpy as np
import torch
from comfy_api.latest import io, ui

from ..metrics import comfy_embedders, cosine_diversity, vendi_score
from ..metrics.plot import tradeoff_plot
from ..rewards import comfy_rewards
from ..sampling.sweep import parse_points, parse_prompts, quality_diversity_sweep
from .rewards import RewardModelType

CATEGORY = "RewardTune/diversity"
EmbedderType = io.Custom("DIVERSITY_EMBEDDER")

comfy_embedders.register_folder()


def _embedder_input():
    return EmbedderType.Input("embedder", optional=True,
                              tooltip="From Load Diversity Embedder. Not connected: the model-free pixel embedder.")


class LoadDiversityEmbedder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardTuneLoadDiversityEmbedder", display_name="Load Diversity Embedder", category=CATEGORY,
            description="Image embedder for diversity: DINO ViT-S/16 (ImageReFL's choice), a CLIP vision model, "
                        "or plain downscaled pixels (no model).",
            inputs=[io.Combo.Input("embedder_name", options=comfy_embedders.embedder_files(), default=comfy_embedders.PIXELS,
                                   tooltip="A file in models/diversity_models (e.g. dino_deitsmall16_pretrain.pth) or "
                                           "models/clip_vision; or 'pixels (no model)' for a quick look."),
                    io.ClipVision.Input("clip_vision", optional=True,
                                        tooltip="Use this CLIP_VISION (Load CLIP Vision) instead of a file.")],
            outputs=[EmbedderType.Output(display_name="embedder")])

    @classmethod
    def execute(cls, embedder_name, clip_vision=None):
        return io.NodeOutput(comfy_embedders.load(embedder_name, clip_vision))


class DiversityScore(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardTuneDiversityScore", display_name="Diversity Score", category=CATEGORY,
            description="How different the images of a batch are: per prompt 1 − mean pairwise cosine of their "
                        "embeddings (0 = identical), averaged over prompts, and the Vendi score.",
            is_output_node=True,
            inputs=[io.Image.Input("images", tooltip="A batch holding several images per prompt."),
                    io.Int.Input("images_per_prompt", default=0, min=0, max=4096,
                                 tooltip="The batch is consecutive runs of this many images per prompt. "
                                         "0: the whole batch is one group."),
                    _embedder_input()],
            outputs=[io.Float.Output(display_name="diversity", tooltip="Mean over prompts of 1 − mean pairwise cosine."),
                     io.Float.Output(display_name="vendi", tooltip="Mean over prompts of the Vendi score (1 … images per prompt)."),
                     io.String.Output(display_name="report", tooltip="Per-prompt values as text.")])

    @classmethod
    def execute(cls, images, images_per_prompt, embedder=None):
        handle = embedder or comfy_embedders.PIXEL_HANDLE
        emb = handle.embed(images, progress=True)
        per = images_per_prompt or None
        div, ven = cosine_diversity(emb, per_group=per), vendi_score(emb, per_group=per)
        text = f"embedder: {handle.name}, {images.shape[0]} images\n{div.text()}\n{ven.text()}"
        return io.NodeOutput(div.value, ven.value, text, ui=ui.PreviewText(text))


class QualityDiversitySweep(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardTuneQualityDiversitySweep", display_name="Quality–Diversity Sweep", category=CATEGORY,
            description="Runs the Combined KSampler for every switch step k (and AIG blend power p) over your prompts "
                        "and seeds, scores reward and diversity, and plots reward against diversity with the Pareto "
                        "front — the papers' trade-off figure for your own models.",
            is_output_node=True,
            inputs=[io.Model.Input("base_model", tooltip="The original model (early steps)."),
                    io.Model.Input("tuned_model", tooltip="The reward-tuned model (late steps)."),
                    io.Clip.Input("clip", tooltip="Encodes the prompts (the base model's text encoder)."),
                    io.Vae.Input("vae", tooltip="Decodes the samples for scoring."),
                    RewardModelType.Input("reward_model", tooltip="From Load Reward Model."),
                    io.String.Input("prompts", multiline=True, default="a photo of a cat\na watercolor landscape",
                                    tooltip="One prompt per line."),
                    io.String.Input("negative", default="", tooltip="Negative prompt for every sample."),
                    io.Int.Input("images_per_prompt", default=4, min=2, max=64,
                                 tooltip="Seeds per prompt (ImageReFL: 5); diversity is measured within a prompt."),
                    io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff,
                                 control_after_generate=io.ControlAfterGenerate.fixed,
                                 tooltip="The same noise is used for every point, so points differ only by the handoff. "
                                         "Kept fixed after a run by default (a sweep is costly; set the control "
                                         "below to randomize for new seeds)."),
                    io.Int.Input("steps", default=40, min=1, max=10000, tooltip="Sampling steps N (ImageReFL: 40)."),
                    io.String.Input("switch_steps", default="0, 20, 25, 30, 35, 40",
                                    tooltip="Comma-separated switch steps k (0 = tuned only, N = base only); ImageReFL's sweep."),
                    io.String.Input("blend_powers", default="",
                                    tooltip="Optional comma-separated powers p of the 'ReFL AIG' blend baseline, one point each."),
                    io.Float.Input("cfg_base", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG of the base stage."),
                    io.Float.Input("cfg_tuned", default=1.0, min=0.0, max=100.0, step=0.1, tooltip="CFG of the tuned stage."),
                    io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddpm",
                                   tooltip="Sampler (ImageReFL: DDPM)."),
                    io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="ddim_uniform",
                                   tooltip="Scheduler (ddim_uniform = the DDPM timestep grid)."),
                    io.Int.Input("width", default=512, min=64, max=4096, step=8, tooltip="Image width."),
                    io.Int.Input("height", default=512, min=64, max=4096, step=8, tooltip="Image height."),
                    _embedder_input()],
            outputs=[io.Image.Output(display_name="plot", tooltip="Reward against diversity, one point per setting, Pareto front in red."),
                     io.String.Output(display_name="table_json", tooltip="One row per point: reward mean/std, diversity, Vendi, Pareto flag.")])

    @classmethod
    def execute(cls, base_model, tuned_model, clip, vae, reward_model, prompts, negative, images_per_prompt, seed,
                steps, switch_steps, blend_powers, cfg_base, cfg_tuned, sampler_name, scheduler, width, height,
                embedder=None):
        points = parse_points(switch_steps, blend_powers, steps)
        texts = parse_prompts(prompts)
        encode = lambda t: clip.encode_from_tokens_scheduled(clip.tokenize(t))
        neg = encode(negative)
        conds = [(t, encode(t), neg) for t in texts]
        handle = embedder or comfy_embedders.PIXEL_HANDLE
        bar = comfy.utils.ProgressBar(len(points) * len(conds))

        def on_progress(done, total):
            bar.update_absolute(done, total)
            mm.throw_exception_if_processing_interrupted()

        rows = quality_diversity_sweep(
            base_model, tuned_model, vae, conds, points,
            score=lambda images, text: comfy_rewards.score_images(reward_model, images, [text]),
            embed=lambda images: handle.embed(images), images_per_prompt=images_per_prompt, seed=seed,
            steps=steps, cfg_base=cfg_base, cfg_tuned=cfg_tuned, sampler_name=sampler_name, scheduler=scheduler,
            width=width, height=height, on_progress=on_progress)
        plot = tradeoff_plot([r["diversity"] for r in rows], [r["reward_mean"] for r in rows],
                             [r["point"] for r in rows], x_label=f"diversity (1 - mean cosine, {handle.name})",
                             y_label=f"reward ({reward_model.model.label})",
                             title=f"Quality-diversity: {len(texts)} prompt(s) x {images_per_prompt} seeds, {steps} steps")
        image = torch.from_numpy(np.asarray(plot, dtype=np.float32) / 255.0)[None]
        table = json.dumps(rows, indent=1)
        text = "\n".join(f"{r['point']:>12}: reward {r['reward_mean']:.4f} ± {r['reward_std']:.4f}, diversity "
                         f"{r['diversity']:.4f}, Vendi {r['vendi']:.3f}{'  (Pareto)' if r['pareto'] else ''}" for r in rows)
        return io.NodeOutput(image, table, ui=ui.PreviewText(text))


NODES = [LoadDiversityEmbedder, DiversityScore, QualityDiversitySweep]
