"""Node adapters for training: Train Reward LoRA (wait or background) and Load Trained LoRA."""
from __future__ import annotations

import math
import os
from dataclasses import replace

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..jobs import comfy_training
from ..jobs.manager import LORA_FOLDER, JobError, get_manager
from ..trainers.config import ConfigError, PRECISIONS, TrainConfig, settings_from_json
from ..trainers.presets import CUSTOM, PRESETS
from .rewards import RewardModelType

CATEGORY = "RewardTune/training"


def _image(pil) -> torch.Tensor:
    return torch.from_numpy(np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0)[None]


def curve(job, note: list[str] | None = None) -> torch.Tensor:
    """The reward per step; with ``note``, a frame holding those lines instead (a background job)."""
    from ..metrics.plot import curve_plot
    rows = [] if note else job.metrics(limit=100000)
    return _image(curve_plot([r["step"] for r in rows], [r["reward"] for r in rows],
                             title=f"{job.name}: reward during training ({job.config.objective})",
                             y_label="s*(R+o)", empty=note or ("no steps yet",)))


def background_note(job, lora_name: str) -> list[str]:
    """What a background job's outputs say while it trains: they were made when it was queued, so
    its curve is in the Training tab and the MODEL output is still the untrained input model."""
    return [f"Training in the background: {job.state}, step {job.step}/{job.config.steps} when queued.",
            "Follow the reward curve live in the Training tab (sidebar).",
            "MODEL is the untrained input model until the job ends: samplers fed",
            "by it now sample the base model.",
            "When the job ends its LoRA is published as",
            f"loras/{lora_name}",
            "(Load Trained LoRA gives the newest checkpoint meanwhile)."]


def summary(job, lora_name: str | None) -> str:
    last = job.last or {}
    c = job.config
    lines = [f"job {job.id}: {job.state} at step {job.step}/{c.steps} ({c.objective})",
             f"lr {c.lr:g}, rank {c.rank}, batch {c.batch_size}×{c.grad_accum}, {c.num_steps}-step schedule, "
             f"CFG {c.cfg:g}, {c.width}×{c.height}, {c.precision}"]
    if "reward" in last:
        lines.append(f"last reward {last['reward']:+.4f}, grad norm {last.get('grad_norm', float('nan')):.3g}")
    if c.objective == "sqdf" and c.sqdf_lcm_lora:
        lines.append(f"x̂0: consistency model {os.path.basename(c.sqdf_lcm_lora)}")
    elif c.objective == "sqdf":
        lines.append("x̂0: the base model's one-step prediction (no LCM-LoRA given; the paper's ablation)")
    if job.error:
        lines.append(f"error: {job.error}")
    if lora_name:
        lines.append(f"LoRA: {lora_name} (loras folder)")
    lines.append(f"files: {job.dir}")
    return "\n".join(lines)


def _lora_files() -> list[str]:
    import folder_paths
    return [f for f in folder_paths.get_filename_list("loras") if not f.startswith(f"{LORA_FOLDER}/")]


def _roots() -> list[str]:
    """ComfyUI's input folder, plus the folders the user opted in with REWARDTUNE_ALLOW_PATHS."""
    import folder_paths
    from ..trainers.data import allowed_roots
    return allowed_roots(folder_paths.get_input_directory())


def _dataset(folder: str, images, captions: str, config: TrainConfig):
    from ..trainers.data import examples_from_graph, load_examples
    if images is not None:
        lines = [c for c in (captions or "").splitlines() if c.strip()]
        return examples_from_graph(images, lines or [""], config.width, config.height)
    if folder.strip():
        return load_examples(folder.strip(), config.width, config.height, roots=_roots())
    return None


# The widgets that are TrainConfig settings, with their defaults. A widget left at its default gives
# way to the preset; one the user changed wins over it (see build_config).
WIDGET_DEFAULTS = {"objective": "imagerefl", "steps": 500, "learning_rate": 3e-4, "rank": 8, "batch_size": 2,
                   "grad_accum": 1, "width": 512, "height": 512, "precision": "bf16", "gradient_checkpointing": True,
                   "save_every": 50, "seed": 0}
PRECEDENCE = ("Precedence, field by field: a paper preset sets its own values over the widgets left at their "
              "defaults; widgets you changed win over the preset; config_json wins over both.")


def _widget_settings(name: str, value) -> dict:
    """A widget's TrainConfig settings (the rank widget sets alpha = rank too)."""
    if name == "learning_rate":
        return {"lr": value}
    if name == "rank":
        return {"rank": value, "alpha": float(value)}
    if name == "gradient_checkpointing":
        return {"grad_checkpointing": value}
    return {name: value}


def _at_default(name: str, value) -> bool:
    default = WIDGET_DEFAULTS[name]
    if isinstance(default, float) and isinstance(value, (int, float)):
        return math.isclose(value, default, rel_tol=1e-9)  # the frontend rounds float widgets
    return value == default


def build_config(preset: str, widgets: dict, config_json: str = "") -> TrainConfig:
    """The node's TrainConfig, by ``TrainConfig.resolve``: TrainConfig's defaults < the widgets left
    at their defaults < the preset < the widgets the user changed < config_json."""
    unchanged, changed = {}, {}
    for name, value in widgets.items():
        (unchanged if _at_default(name, value) else changed).update(_widget_settings(name, value))
    sources = [("the widgets you changed", changed)]
    if config_json.strip():
        extra = settings_from_json(config_json, "config_json")
        if "sqdf_lcm_lora" in extra:
            raise ConfigError("config_json cannot set sqdf_lcm_lora: pick the LCM-LoRA with the lcm_lora input "
                              "(files in the loras folder)")
        sources.append(("config_json", extra))
    return TrainConfig.resolve(preset, *sources, base=("the widgets", unchanged))


class TrainRewardLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = WIDGET_DEFAULTS
        return io.Schema(
            node_id="RewardTuneTrainLoRA",
            display_name="Train Reward LoRA",
            category=CATEGORY,
            description="Fine-tunes LoRA weights on the model so the reward goes up (ReFL or ImageReFL). wait: runs "
                        "the job and returns the tuned model (Cancel stops it and keeps the checkpoint). background: "
                        "starts the job and returns at once; ComfyUI stays usable; use Load Trained LoRA for the "
                        "newest checkpoint. Queueing the same graph again attaches to or resumes the job.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model to tune (SD1.5, SDXL, or a flow model: Flux, SD3.5, "
                                                "Z-Image). It is not changed: the LoRA "
                                                "is trained on a copy, or, on a card too small for one (mode wait), "
                                                "on its weights and taken off again (config_json unet_copy)."),
                io.Clip.Input("clip", tooltip="Encodes the prompts and captions."),
                io.Vae.Input("vae", tooltip="Decodes (with gradients) for the reward; encodes ImageReFL's real images."),
                RewardModelType.Input("reward_model", tooltip="From Load Reward Model: the reward to raise."),
                io.String.Input("job_name", default="reward-lora",
                                tooltip="Names the job, its folder (output/rewardtune/jobs) and the LoRA file."),
                io.Combo.Input("mode", options=["wait", "background"], default="wait",
                               tooltip="wait: this node runs until training ends. background: it returns at once "
                                       "while the job trains; other prompts keep running."),
                io.Combo.Input("preset", options=list(PRESETS), default=CUSTOM,
                               tooltip="custom: the settings below. A paper preset is a starting point: its own "
                                       "values (objective, schedule, loss weights and, for SQDF, lr, rank, batch, "
                                       "steps) replace the widgets below that are still at their defaults. "
                                       + PRECEDENCE + " The summary shows the result."),
                io.Combo.Input("objective", options=["imagerefl", "refl", "sqdf"], default=d["objective"],
                               tooltip="imagerefl: real images + captions (dataset) with the diffusion loss. refl: "
                                       "classic ReFL from prompts. sqdf: soft-Q fine-tuning from prompts (replay "
                                       "buffer, discount, KL to the base; x̂0 by an LCM-LoRA's consistency jump, "
                                       "see lcm_lora)."),
                io.String.Input("prompts", multiline=True, default="",
                                tooltip="ReFL / SQDF prompts, one per line (# starts a comment), or the path of a "
                                        ".txt file of them in ComfyUI's input folder (other folders only when listed "
                                        "in REWARDTUNE_ALLOW_PATHS, see dataset_folder). ImageReFL uses them only "
                                        "for the optional ReFL regulariser."),
                io.String.Input("dataset_folder", default="",
                                tooltip="ImageReFL: a folder of images with same-named .txt captions, in ComfyUI's "
                                        "input folder (a relative path such as my_dataset starts there). Folders "
                                        "elsewhere are refused unless listed in the environment variable "
                                        "REWARDTUNE_ALLOW_PATHS when ComfyUI starts (e.g. "
                                        "REWARDTUNE_ALLOW_PATHS=/data:/home/me/sets; ';' between folders on "
                                        "Windows). Ignored when images are connected."),
                io.Int.Input("steps", default=d["steps"], min=1, max=1_000_000, tooltip="Optimizer steps."),
                io.Float.Input("learning_rate", default=d["learning_rate"], min=1e-7, max=1.0, step=1e-5,
                               tooltip="AdamW learning rate of the LoRA weights."),
                io.Int.Input("rank", default=d["rank"], min=1, max=256, tooltip="LoRA rank (alpha = rank)."),
                io.Int.Input("batch_size", default=d["batch_size"], min=1, max=64, tooltip="Images per micro-batch."),
                io.Int.Input("grad_accum", default=d["grad_accum"], min=1, max=64, advanced=True,
                             tooltip="Micro-batches per optimizer step (effective batch = batch_size × this)."),
                io.Int.Input("width", default=d["width"], min=64, max=2048, step=64,
                             tooltip="Training width in pixels."),
                io.Int.Input("height", default=d["height"], min=64, max=2048, step=64,
                             tooltip="Training height in pixels."),
                io.Combo.Input("precision", options=list(PRECISIONS), default=d["precision"],
                               tooltip="bf16 on recent GPUs; fp16 uses loss scaling; fp32 on the CPU."),
                io.Boolean.Input("gradient_checkpointing", default=d["gradient_checkpointing"], advanced=True,
                                 tooltip="Recompute UNet activations in the backward pass: much less memory, ~30% slower."),
                io.Int.Input("save_every", default=d["save_every"], min=1, max=100_000, advanced=True,
                             tooltip="Checkpoint every n steps (Load Trained LoRA reads the newest)."),
                io.Int.Input("seed", default=d["seed"], min=0, max=2 ** 31 - 1, control_after_generate=False,
                             tooltip="Seeds the noise, the stop steps and the LoRA initialisation."),
                io.String.Input("config_json", multiline=True, default="", advanced=True,
                                tooltip='Any TrainConfig field as a JSON object, e.g. {"cfg": 5.0}; it wins over '
                                        'the preset and the widgets. The fields and what they do: python '
                                        'scripts/train.py --help (README "Training").'),
                io.Image.Input("images", optional=True,
                               tooltip="ImageReFL: training images from the graph instead of a folder."),
                io.String.Input("captions", multiline=True, default="", optional=True,
                                tooltip="Captions for the connected images: one line for all, or one line per image."),
                io.Combo.Input("lcm_lora", options=["(none)", *_lora_files()], default="(none)", optional=True,
                               tooltip="SQDF only: the LCM-LoRA of the same base (e.g. lcm-lora-sdv1-5) for the "
                                       "consistency-model jump to x̂0. (none): the base model's one-step prediction "
                                       "(the paper's ablation)."),
            ],
            outputs=[io.Model.Output(display_name="MODEL", tooltip="The model with the trained LoRA (wait mode, or a "
                                                                   "finished job); the input model while training in background."),
                     io.String.Output(display_name="lora_name", tooltip="The LoRA's name in the loras folder (LoraLoader)."),
                     io.String.Output(display_name="summary", tooltip="Job state, last reward, files."),
                     io.Image.Output(display_name="curve", tooltip="Reward per step.")],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # never cached: every queue attaches to the job and reports its state

    @classmethod
    def execute(cls, model, clip, vae, reward_model, job_name, mode, preset, objective, prompts, dataset_folder,
                steps, learning_rate, rank, batch_size, grad_accum, width, height, precision, gradient_checkpointing,
                save_every, seed, config_json="", images=None, captions="", lcm_lora="(none)"):
        from ..trainers.data import parse_prompts
        config = build_config(preset, dict(
            objective=objective, steps=steps, learning_rate=learning_rate, rank=rank, batch_size=batch_size,
            grad_accum=grad_accum, width=width, height=height, precision=precision,
            gradient_checkpointing=gradient_checkpointing, save_every=save_every, seed=seed), config_json)
        if config.objective == "sqdf" and lcm_lora and lcm_lora != "(none)":
            import folder_paths
            path = folder_paths.get_full_path("loras", lcm_lora)
            if path is None:
                raise ConfigError(f"LCM-LoRA {lcm_lora!r} is not in the loras folder any more: pick another or (none)")
            config = replace(config, sqdf_lcm_lora=path).validate()
        prompt_list = parse_prompts(prompts, roots=_roots()) if prompts.strip() else None
        data = _dataset(dataset_folder, images, captions, config) if config.needs_images else None
        config.check_inputs(has_prompts=bool(prompt_list), has_images=bool(data),
                            give_prompts="write them in prompts, one per line (or the path of a .txt file)",
                            give_images="set dataset_folder or connect images")
        # a run that will not fit the card is refused here, before a job exists (nothing to lose); the
        # same estimate decides whether the job gets a private UNet copy (config.unet_copy)
        plan = comfy_training.plan_memory(config, model, vae, reward_model, mode,
                                          say=lambda text: comfy_training.progress_text(text, cls.hidden.unique_id))
        spec = comfy_training.build_spec(job_name, config, model=model, vae=vae, clip=clip, reward=reward_model,
                                         prompts=prompt_list, images=data, prompt=cls.hidden.prompt,
                                         shared=plan.shared)
        manager = get_manager()
        job = manager.submit(spec)
        started = job.spec is spec  # else attached to a job that runs or ended: its UNet was chosen then
        if mode == "wait":
            import comfy.utils
            bar = comfy.utils.ProgressBar(config.steps, node_id=cls.hidden.unique_id)

            def progress(step, total, sample_path):
                preview = None
                if sample_path:  # the newest periodic sample, shown on the node like a KSampler preview
                    from PIL import Image
                    preview = ("PNG", Image.open(sample_path).convert("RGB"), 512)
                bar.update_absolute(step, total, preview)
            comfy_training.wait(job, progress)
        if job.state == "finished":
            tuned, lora_name, _ = comfy_training.tuned_model(job, model)
        else:
            lora_name, tuned = manager.lora_name(job), model
        text = summary(job, lora_name if job.state == "finished" else None)
        text += f"\n{plan.memory}\n" + (plan.unet if started else
                                          "UNet: as chosen when this job started (this queue attached to it)")
        note = background_note(job, lora_name) if mode == "background" and job.state != "finished" else None
        if note:
            text += "\n\n" + "\n".join(note)
        return io.NodeOutput(tuned, lora_name, text, curve(job, note), ui=ui.PreviewText(text))


class LoadTrainedLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardTuneLoadTrainedLoRA",
            display_name="Load Trained LoRA",
            category=CATEGORY,
            description="The newest (or final) checkpoint of a training job as a MODEL, also while it still trains.",
            inputs=[
                io.Model.Input("model", tooltip="The base model the job trained on."),
                io.String.Input("job", default="reward-lora",
                                tooltip="A job id, or a job name (its newest job). Listed in the Training tab."),
                io.Combo.Input("which", options=["newest", "final"], default="newest",
                               tooltip="newest: the latest checkpoint, even mid-training. final: only a finished job."),
                io.Float.Input("strength", default=1.0, min=-4.0, max=4.0, step=0.05, tooltip="LoRA strength."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"),
                     io.String.Output(display_name="lora_name", tooltip="The checkpoint as a file in the loras folder."),
                     io.String.Output(display_name="summary")],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # the newest checkpoint changes while the job trains

    @classmethod
    def execute(cls, model, job, which, strength):
        comfy_training.check_strength(strength)  # before the job is looked up: said whatever the job
        manager = get_manager()
        found = manager.get(job.strip()) or next((j for j in manager.jobs() if j.name == job.strip()), None)
        if found is None:
            known = ", ".join(j.id for j in manager.jobs()[:10]) or "none yet"
            raise JobError(f"no training job {job!r}; jobs: {known}")
        if which == "final" and found.state != "finished":
            raise JobError(f"job {found.id} is {found.state} at step {found.step}/{found.config.steps}: "
                           "choose which = newest, or wait for it to finish")
        tuned, name, step = comfy_training.tuned_model(found, model, strength)
        text = summary(found, name) + f"\nloaded the checkpoint of step {step}"
        return io.NodeOutput(tuned, name, text, ui=ui.PreviewText(text))


NODES = [TrainRewardLoRA, LoadTrainedLoRA]
