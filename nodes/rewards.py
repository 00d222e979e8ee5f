"""Node adapters for reward models: loader, scorer, best-of-N (schema + one call each)."""
from __future__ import annotations

import torch
from comfy_api.latest import io, ui

from ..rewards import REWARD_TYPES, comfy_rewards

CATEGORY = "RewardTune/rewards"
RewardModelType = io.Custom("REWARD_MODEL")

comfy_rewards.register_reward_folder()


def _prompt_inputs():
    return [
        io.String.Input("prompt", multiline=True, default="",
                        tooltip="The prompt the images were generated from. Aesthetic ignores it."),
        io.Boolean.Input("one_prompt_per_line", default=False,
                         tooltip="On: each line is the prompt of one image, in batch order (as many lines as images). "
                                 "Off: the whole text is one prompt for every image."),
        io.Int.Input("batch_size", default=8, min=1, max=256, advanced=True,
                     tooltip="Images scored per forward pass; lower it if you run out of memory."),
    ]


class LoadRewardModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardTuneLoadRewardModel",
            display_name="Load Reward Model",
            category=CATEGORY,
            description="Loads an official reward checkpoint from models/reward_models: ImageReward.pt, "
                        "HPS_v2(.1)_compressed.pt, PickScore_v1 (folder with model.safetensors), or the LAION "
                        "aesthetic head with a CLIP ViT-L/14. No download, no extra packages.",
            inputs=[
                io.Combo.Input("reward_model", options=comfy_rewards.reward_files(),
                               tooltip="A file in models/reward_models (or a reward_models path in extra_model_paths.yaml). "
                                       "For an HF folder such as PickScore_v1, pick its model.safetensors."),
                io.Combo.Input("reward_type", options=["auto", *REWARD_TYPES], default="auto",
                               tooltip="auto reads the type from the file. hpsv2 and hpsv2.1 share one architecture; "
                                       "the choice only names the scores."),
                io.Combo.Input("precision", options=list(comfy_rewards.PRECISIONS), default="auto",
                               tooltip="auto: fp16 on GPUs that support it, fp32 on CPU."),
                io.Combo.Input("aesthetic_clip", options=["(none)", *comfy_rewards.clip_files()], default="(none)",
                               tooltip="Aesthetic only: the CLIP ViT-L/14 its head scores (e.g. clip_vision/"
                                       "clip-vit-large-patch14.safetensors). Ignored when clip_vision is connected."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Aesthetic only: a CLIP ViT-L/14 from Load CLIP Vision, used instead of aesthetic_clip."),
            ],
            outputs=[RewardModelType.Output(display_name="reward_model")],
        )

    @classmethod
    def execute(cls, reward_model, reward_type, precision, aesthetic_clip, clip_vision=None):
        clip_name = None if aesthetic_clip == "(none)" else aesthetic_clip
        return io.NodeOutput(comfy_rewards.load_reward(reward_model, reward_type, precision, clip_vision, clip_name))


class ScoreImages(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardTuneScoreImages",
            display_name="Reward Score",
            category=CATEGORY,
            description="Scores each image of a batch with a reward model and shows the scores on the node. Images "
                        "with NaN or inf (non-finite) pixels, e.g. from an fp16 overflow upstream, stop the prompt "
                        "with an error naming their positions.",
            is_output_node=True,
            inputs=[RewardModelType.Input("reward_model", tooltip="From Load Reward Model."),
                    io.Image.Input("images", tooltip="The images to score (any size; resized to the model's 224² input)."),
                    *_prompt_inputs(),
                    io.Boolean.Input("caption_images", default=True,
                                     tooltip="Write each image's score on the 'captioned' output.")],
            outputs=[io.Float.Output(display_name="scores", is_output_list=True,
                                     tooltip="One score per image, in batch order."),
                     io.String.Output(display_name="summary", tooltip="The scores as text."),
                     io.Image.Output(display_name="captioned",
                                     tooltip="The images with their score written on them (unchanged if caption_images is off).")],
        )

    @classmethod
    def execute(cls, reward_model, images, prompt, one_prompt_per_line, batch_size, caption_images):
        prompts = comfy_rewards.split_prompts(prompt, one_prompt_per_line)
        scores = comfy_rewards.score_images(reward_model, images, prompts, batch_size)
        text = comfy_rewards.summary(reward_model, scores, prompts)
        captioned = comfy_rewards.caption(images, scores, reward_model.model.label) if caption_images else images
        return io.NodeOutput(scores.tolist(), text, captioned, ui=ui.PreviewText(text))


class BestOfN(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardTuneBestOfN",
            display_name="Reward Best-of-N",
            category=CATEGORY,
            description="Ranks a batch by reward and keeps the top k images, best first. Images with NaN or inf "
                        "(non-finite) pixels, e.g. from an fp16 overflow upstream, stop the prompt with an error "
                        "naming their positions: they are never kept as the best.",
            inputs=[RewardModelType.Input("reward_model", tooltip="From Load Reward Model."),
                    io.Image.Input("images", tooltip="The candidates, e.g. one prompt sampled with N seeds."),
                    *_prompt_inputs(),
                    io.Int.Input("top_k", default=1, min=1, max=4096,
                                 tooltip="How many images to keep. Set it to the batch size to sort the whole batch.")],
            outputs=[io.Image.Output(display_name="best", tooltip="The top_k images, best first."),
                     io.Float.Output(display_name="scores", is_output_list=True, tooltip="Their scores, best first."),
                     io.Int.Output(display_name="indices", is_output_list=True,
                                   tooltip="Their positions in the input batch."),
                     io.String.Output(display_name="summary", tooltip="All scores and the kept images as text.")],
        )

    @classmethod
    def execute(cls, reward_model, images, prompt, one_prompt_per_line, batch_size, top_k):
        prompts = comfy_rewards.split_prompts(prompt, one_prompt_per_line)
        scores = comfy_rewards.score_images(reward_model, images, prompts, batch_size)
        keep = comfy_rewards.rank(scores, top_k)
        text = comfy_rewards.summary(reward_model, scores, prompts) + \
            f"\nkept {len(keep)}: " + ", ".join(f"#{i} ({scores[i]:.4f})" for i in keep)
        best = images[torch.tensor(keep, device=images.device)]
        return io.NodeOutput(best, scores[keep].tolist(), keep, text, ui=ui.PreviewText(text))


NODES = [LoadRewardModel, ScoreImages, BestOfN]
