"""Node adapters for combined generation: Combined KSampler and Combined Guider (schema + one call)."""
from __future__ import annotations

import comfy.samplers
import comfy.utils
import latent_preview
from comfy_api.latest import io

from ..sampling.combined import HANDOFFS, SWITCH_MODES, CombinedGuider, check_dynamic_combos, combined_sample

CATEGORY = "RewardTune/sampling"

def _switch_inputs():
    """The handoff point, CFG per stage and the mode. switch_unit and mode are DynamicCombos: the
    node shows switch_step or switch_fraction (whichever the unit says) and blend_power only in
    blend mode. ComfyUI passes each as a dict: {"switch_unit": "step", "switch_step": 30},
    {"mode": "blend", "blend_power": 1.0}."""
    return [
        io.DynamicCombo.Input("switch_unit", tooltip="How the handoff point k is given: 'step' (switch_step) or "
                                                     "'fraction' of the steps (switch_fraction).", options=[
            io.DynamicCombo.Option("step", [
                io.Int.Input("switch_step", default=30, min=0, max=10000,
                             tooltip="k: the base model runs steps [0, k), the tuned model steps [k, N). 0 = tuned "
                                     "only, N = base only. ImageReFL: 30 of 40 for SD1.5, 35 of 40 for SDXL.")]),
            io.DynamicCombo.Option("fraction", [
                io.Float.Input("switch_fraction", default=0.75, min=0.0, max=1.0, step=0.005,
                               tooltip="k as a fraction of the steps, rounded to the nearest step with halves rounded "
                                       "up (0.5 of 9 steps → k = 5). ImageReFL: 0.75 (SD1.5), 0.875 (SDXL).")]),
        ]),
        io.Float.Input("cfg_base", default=7.5, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="CFG scale of the base stage (ImageReFL: 7.5 for SD1.5, 5.0 for SDXL)."),
        io.Float.Input("cfg_tuned", default=1.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="CFG scale of the tuned stage. ImageReFL ran it without CFG (1.0, which also halves its cost)."),
        io.DynamicCombo.Input("mode", tooltip="'switch': hard handoff at k (ImageReFL combined generation). 'blend': "
                                              "the paper's 'ReFL AIG' baseline, x0 = γ_i·base + (1−γ_i)·tuned every "
                                              "step, γ_i = 1 − (i/N)^p; ignores the switch point.", options=[
            io.DynamicCombo.Option(name, [
                io.Float.Input("blend_power", default=1.0, min=0.01, max=100.0, step=0.01,
                               tooltip="p in γ_i = 1 − (i/N)^p: the base model's weight falls from 1 at the first "
                                       "step to 0 at the last; p > 1 keeps the base longer.")] if name == "blend" else [])
            for name in SWITCH_MODES]),
    ]


def _cond_inputs():
    return [
        io.Conditioning.Input("positive", tooltip="What the image should show (used by the base stage, and by the tuned stage unless tuned_positive is connected)."),
        io.Conditioning.Input("negative", tooltip="What the image should not show."),
    ]


def _optional_tuned_conds():
    return [
        io.Conditioning.Input("tuned_positive", optional=True,
                              tooltip="Optional separate positive conditioning for the tuned stage (e.g. from the tuned model's own CLIP)."),
        io.Conditioning.Input("tuned_negative", optional=True,
                              tooltip="Optional separate negative conditioning for the tuned stage."),
    ]


def _switch_args(switch_unit: dict | None, mode: dict | None) -> dict:
    """The library's keyword arguments from the two DynamicCombo values. ComfyUI leaves out a
    DynamicCombo whose value is none of its options (an API prompt with a typo), so either may be
    missing."""
    check_dynamic_combos(switch_unit=switch_unit, mode=mode)
    unit = switch_unit["switch_unit"]
    return {"switch_step": switch_unit["switch_step"] if unit == "step" else None,
            "switch_fraction": switch_unit["switch_fraction"] if unit == "fraction" else None,
            "mode": mode["mode"], "blend_power": mode.get("blend_power", 1.0)}


class CombinedKSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardTuneCombinedKSampler",
            display_name="Combined KSampler (base → tuned)",
            category=CATEGORY,
            description="ImageReFL combined generation in one sampling pass: the base model lays out the image in the "
                        "early steps, the reward-tuned model finishes it, keeping the base model's structure and diversity.",
            search_aliases=["imagerefl", "combined generation", "two model ksampler", "refiner handoff"],
            inputs=[
                io.Model.Input("base_model", tooltip="The original model; runs the early (high-noise) steps."),
                io.Model.Input("tuned_model", tooltip="The reward-tuned model (another checkpoint or the base + a LoRA); runs the late steps."),
                *_cond_inputs(),
                io.Latent.Input("latent_image", tooltip="The latent to denoise."),
                io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                             tooltip="The random seed used for the noise (same noise as KSampler with this seed)."),
                io.Int.Input("steps", default=40, min=1, max=10000, tooltip="Total steps N of the schedule (ImageReFL: 40)."),
                *_switch_inputs(),
                io.Combo.Input("sampler_name", options=comfy.samplers.KSampler.SAMPLERS, default="ddpm",
                               tooltip="The sampler for the whole pass (ImageReFL used DDPM)."),
                io.Combo.Input("scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="ddim_uniform",
                               tooltip="The noise schedule (ImageReFL's 40-step DDPM schedule is ddim_uniform)."),
                io.Combo.Input("handoff", options=list(HANDOFFS), default="continuous", advanced=True,
                               tooltip="'continuous': one sampler pass, SDE noise and multistep history (dpmpp_2m, uni_pc, lms…) "
                                       "carry across the switch; with an inpainting mask the kept region is re-noised to every "
                                       "step's sigma for both stages, as one KSampler does. 'restart': two passes, exactly like two "
                                       "chained KSamplerAdvanced nodes (history restarts and SDE noise is re-seeded at the switch; "
                                       "with a mask the tuned stage sees the kept region clean, as the chain does)."),
                io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="As in KSampler; the switch step counts within the steps actually run."),
                *_optional_tuned_conds(),
            ],
            outputs=[io.Latent.Output(display_name="LATENT")],
        )

    @classmethod
    def execute(cls, base_model, tuned_model, positive, negative, latent_image, seed, steps, cfg_base, cfg_tuned,
                sampler_name, scheduler, handoff, denoise, switch_unit=None, mode=None, tuned_positive=None,
                tuned_negative=None) -> io.NodeOutput:
        callback = latent_preview.prepare_callback(base_model, steps)
        out = combined_sample(
            base_model, tuned_model, positive, negative, latent_image, seed=seed, steps=steps,
            sampler_name=sampler_name, scheduler=scheduler, cfg_base=cfg_base, cfg_tuned=cfg_tuned,
            denoise=denoise, handoff=handoff, tuned_positive=tuned_positive, tuned_negative=tuned_negative,
            callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, **_switch_args(switch_unit, mode))
        return io.NodeOutput(out)


class CombinedGuiderNode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="RewardTuneCombinedGuider",
            display_name="Combined Guider (base → tuned)",
            category=CATEGORY,
            description="The Combined KSampler's base → tuned handoff as a GUIDER for SamplerCustomAdvanced; the switch "
                        "step is counted on the SIGMAS that sampler runs.",
            search_aliases=["imagerefl", "combined generation guider"],
            inputs=[
                io.Model.Input("base_model", tooltip="The original model; runs the early (high-noise) steps."),
                io.Model.Input("tuned_model", tooltip="The reward-tuned model; runs the late steps."),
                *_cond_inputs(),
                *_switch_inputs(),
                *_optional_tuned_conds(),
            ],
            outputs=[io.Guider.Output()],
        )

    @classmethod
    def execute(cls, base_model, tuned_model, positive, negative, cfg_base, cfg_tuned, switch_unit=None, mode=None,
                tuned_positive=None, tuned_negative=None) -> io.NodeOutput:
        guider = CombinedGuider(base_model, tuned_model, cfg_base=cfg_base, cfg_tuned=cfg_tuned,
                                **_switch_args(switch_unit, mode))
        guider.set_conds(positive, negative, tuned_positive, tuned_negative)
        return io.NodeOutput(guider)


NODES = [CombinedKSampler, CombinedGuiderNode]
