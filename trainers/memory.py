"""Peak memory of a training step, known before the run starts, without a GPU.

One step of an objective (ReFL, ImageReFL, SQDF collection and update) is rebuilt from public
pieces — the graph's own UNet module (ComfyUI's ``UNetModel``, called directly; a model without its
``context_dim`` contract, such as a flow transformer (Flux, SD3.5, Z-Image), through a shallow copy
of its BaseModel's ``apply_model`` with the conds of its own ``extra_conds``, as the sampler calls
it), ComfyUI's ``LoraDiff`` adapters as
the engine attaches them (``trainers.lora.new_adapter``, applied through the ops' weight functions),
the VAE's ``first_stage_model.decode`` with gradients, the reward model, AdamW — and run on *fake*
copies of the models under ``FakeTensorMode``: every tensor has its shape, dtype and device but no
storage, so an 860M or 2.6B UNet costs nothing and a step takes seconds on the CPU. PyTorch's
memory tracker (``torch.distributed._tools.mem_tracker.MemTracker``) follows every tensor the step
creates and frees (weights, LoRA and optimizer state, gradients, activations, temporaries) and
reports the peak of the live bytes. That is the number ``torch.cuda.max_memory_allocated`` measures
on a GPU, minus allocator rounding and fragmentation (``fits`` adds a margin for those).

    peak = estimate_peak_bytes(model, vae, reward, config)       # bytes, the largest objective step
    ok, advice = fits(peak, budget_bytes, config)                  # advice: what to lower

The same step on real tensors (``measure_peak_bytes``) is what the tests compare the estimate with
(a tiny model on the CPU: within 10 %), and ``benchmarks/gpu_train.py`` times it next to the engine.

What the estimate follows from the config: objective (and ImageReFL's ReFL regulariser), batch
size, width × height, LoRA rank and targets, precision (autocast), gradient checkpointing of the
UNet. What it assumes, as the engine does on a GPU: conditional and unconditional branches in one
UNet batch (ComfyUI batches them when memory allows; the estimate is the larger case), 77-token
conditioning (of the text width the model's config names; Flux's T5 pads to 256 tokens and SD3.5
sends 154, a few % more activations at 1024² than estimated), PyTorch SDPA attention (ComfyUI's
default on NVIDIA GPUs) in UNet and VAE, the models resident on the device for the whole step (no
low-VRAM partial loading), the text encoder not (conditioning is encoded once, before the step). The no-grad denoising steps before the gradient
step each free their activations, so one of them stands for all.

Known gaps: the fake tensors live on the "cpu" device where no CUDA is present (autograd's engine
needs a real CUDA device to run backward on fake CUDA tensors); kernels differ little in what they
save (PyTorch's CPU SDPA is a flash attention too), and cuDNN/cuBLAS workspaces are not counted.
"""
from __future__ import annotations

import contextlib
import copy
import math
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils.checkpoint

from .checkpointing import checkpointed_decode, gradient_checkpointing
from .config import TrainConfig
from .lora import new_adapter, target_modules
from .steps import comfy_training_mode, sampling_steps

GiB = 2 ** 30
MiB = 2 ** 20
#: fits(): headroom over the tracked peak for the CUDA caching allocator (block rounding,
#: fragmentation) and kernels' workspaces; checked against torch.cuda.max_memory_reserved by
#: benchmarks/gpu_train.py where a GPU is available
ALLOCATOR_MARGIN = 0.10
#: conditioning length the estimate assumes (one CLIP chunk)
TOKENS = 77


# ----------------------------------------------------------------------------- fake models
def new_fake_mode():
    """A FakeTensorMode that also accepts the odd real constant a module keeps outside its
    parameters and buffers (it is converted to a fake tensor, costing nothing)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


def fake_copy(module: torch.nn.Module, mode, device: str | torch.device = "cpu",
              dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A copy of ``module`` whose parameters and buffers are fake tensors of ``mode`` (same shapes,
    ``dtype`` for floating-point ones if given, on ``device``): no memory is allocated and the
    original is not touched (a background job may be using it). ComfyUI weight/bias functions
    (patches applied at load time) are dropped from the copy: the engine trains on the plain weights
    plus its own LoRA."""
    memo: dict[int, object] = {}
    with mode:
        for p in module.parameters():
            want = dtype if (dtype is not None and p.is_floating_point()) else p.dtype
            memo[id(p)] = torch.nn.Parameter(torch.empty(p.shape, dtype=want, device=device),
                                             requires_grad=p.requires_grad)
        for b in module.buffers():
            want = dtype if (dtype is not None and b.is_floating_point()) else b.dtype
            memo[id(b)] = torch.empty(b.shape, dtype=want, device=device)
    for m in module.modules():  # the graph's weight patches and their tensors are not copied
        for name in ("weight_function", "bias_function"):
            if m.__dict__.get(name):
                memo[id(m.__dict__[name])] = []
    out = copy.deepcopy(module, memo)
    return out


def _use_sdpa_in_vae(first_stage: torch.nn.Module) -> None:
    """ComfyUI picks the VAE's attention at construction (split attention on the CPU); on an NVIDIA
    GPU it is PyTorch's SDPA, so that is what the step runs."""
    from comfy.ldm.modules.diffusionmodules import model as vae_model
    for m in first_stage.modules():
        if isinstance(m, vae_model.AttnBlock):
            m.optimized_attention = vae_model.pytorch_attention


def _sdpa_override(func, *args, **kwargs):
    """transformer_options["optimized_attention_override"]: every UNet attention through
    ComfyUI's PyTorch-SDPA function (its choice on NVIDIA GPUs), whatever this machine would pick."""
    from comfy.ldm.modules.attention import attention_pytorch
    return attention_pytorch(*args, **kwargs)  # kwargs carry the wrapper's "inside" mark: no re-entry


# ----------------------------------------------------------------------------- the tracker
def _tracker():
    """PyTorch's MemTracker, taught that a model may be frozen: it hooks every parameter of a
    module it sees run to follow its gradient, and ``register_hook`` refuses a tensor that does not
    require grad (the UNet, VAE and reward weights here). Frozen parameters are tracked without the
    hook; parameters that train get it as before. And a training step calls its top-level modules
    (UNet, VAE) several times, which the tracker refuses ("does not support memory tracking for
    multiple iterative calls"): a repeated top-level call starts that module's per-module statistics
    afresh, as ``reset_mod_stats`` would; the device totals and the peak are unaffected. Per-module
    peaks are not kept (the tracker updates every active module's peak after every op, which took
    ~65 % of an estimate's time); the device peak and its breakdown are updated exactly as PyTorch
    does. Module and optimizer hooks are process-wide: the tracker listens only to the thread that
    made it, so a training job on another thread (the node estimates while a background job
    trains) neither shows up in the estimate nor gets the tracker's hooks. (Overrides private
    methods of torch 2.x's tracker; the rest is PyTorch's.)"""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.distributed._tools.mod_tracker import ModTracker
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    owner = threading.get_ident()

    class ThisThreadModTracker(ModTracker):
        def _fw_pre_hook(self, mod, input):
            if threading.get_ident() == owner:
                return super()._fw_pre_hook(mod, input)

        def _fw_post_hook(self, mod, input, output):
            if threading.get_ident() == owner:
                return super()._fw_post_hook(mod, input, output)

    class StepMemTracker(MemTracker):
        def __init__(self):
            super().__init__()
            self._mod_tracker = ThisThreadModTracker()

        def _register_global_optimizer_hook(self):
            def pre(optimizer, args, kwargs):
                if threading.get_ident() == owner:
                    self._in_opt = True

            def post(optimizer, args, kwargs):
                if threading.get_ident() == owner:
                    self._track_optimizer_states(self._ref_class.OPT, optimizer)
                    self._in_opt = False
            self._optimizer_hook_handles = (register_optimizer_step_pre_hook(pre),
                                            register_optimizer_step_post_hook(post))

        def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
            trains = any(p.requires_grad for p in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks and trains)

        def _pre_fw_hook(self, module, inputs):
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                name = self._mod_tracker.get_known_fqn(module)
                if set(self._mod_tracker.parents) - {name} == {"Global"}:
                    del self.memory_tracking[module]
            return super()._pre_fw_hook(module, inputs)

        def _update_peak_stats(self, peak_state):
            for dev, dev_snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < dev_snap["Total"]:
                    self._peak_mem[dev] = dev_snap["Total"]
                    self._peak_mem_snap[dev] = dict(dev_snap)
    return StepMemTracker()


def tracked_peak(fn: Callable[[], object], *external) -> tuple[int, dict[str, int]]:
    """Run ``fn`` under PyTorch's MemTracker; ``external``: modules, optimizers and tensors that
    exist before it (weights, optimizer state) and count towards the peak. Returns the peak of the
    live bytes summed over devices and its breakdown by kind (Parameter, Gradient, Activation…)."""
    tracker = _tracker()
    tracker.track_external(*[e for e in external if e is not None])
    with tracker:
        fn()
    snap = tracker.get_tracker_snapshot("peak")
    total = sum(dev.get("Total", 0) for dev in snap.values())
    kinds: dict[str, int] = {}
    for dev in snap.values():
        for k, v in dev.items():
            name = getattr(k, "value", str(k))
            kinds[name] = kinds.get(name, 0) + int(v)
    return int(total), kinds


# ----------------------------------------------------------------------------- the step
@dataclass
class Workload:
    """The pieces one training step runs on (real modules or fake copies).

    ``reward(images (B, 3, H, W) in [0, 1], prompts) -> (B,)``; ``modules``: what holds weights
    (for the tracker)."""
    diffusion_model: torch.nn.Module
    model_sampling: torch.nn.Module
    latent_format: object
    first_stage: torch.nn.Module
    reward: Callable
    context_dim: int
    adm_channels: int = 0
    vae_dtype: torch.dtype = torch.float32
    downscale: int = 8
    modules: list = field(default_factory=list)
    #: the graph's BaseModel, for models the direct UNet call does not fit (``context_dim`` absent
    #: from their config: flow transformers): the step then calls ``apply_model`` as the sampler does
    base_model: object = None
    pooled_dim: int = 0


def workload_from(model, vae, reward, *, fake_mode=None, device: str | torch.device = "cpu") -> Workload:
    """A Workload from the engine's own inputs: ``model`` a ComfyUI MODEL (ModelPatcher) or
    BaseModel, ``vae`` a ComfyUI VAE, ``reward`` a RewardModel / the REWARD_MODEL handle (its
    ``.model``) / any callable. With ``fake_mode`` the modules are fake copies (no memory)."""
    base = getattr(model, "model", model)
    unet_config = base.model_config.unet_config
    first_stage = getattr(vae, "first_stage_model", vae)
    vae_dtype = getattr(vae, "vae_dtype", next(first_stage.parameters()).dtype)
    reward_module = getattr(reward, "model", reward) if isinstance(getattr(reward, "model", None), torch.nn.Module) \
        else reward
    if fake_mode is not None:
        unet = fake_copy(base.diffusion_model, fake_mode, device)
        ms = base.model_sampling  # a few real 1000-entry tables, read only (the schedule needs their values)
        first_stage = fake_copy(first_stage, fake_mode, device)
        if isinstance(reward_module, torch.nn.Module):
            reward_module = fake_copy(reward_module, fake_mode, device)
    else:
        unet, ms = base.diffusion_model, base.model_sampling
    _use_sdpa_in_vae(first_stage)
    if hasattr(reward_module, "training_reward"):
        def reward_fn(images, prompts, _r=reward_module):
            return _r.training_reward(images, prompts, layout="BCHW")
    else:
        reward_fn = reward_module
    # The direct call (``_x0``: ``unet(x, t, context=(B, 77, context_dim), y=(B, adm))``) is
    # ComfyUI's UNetModel contract, the one whose config declares ``context_dim``. A model without
    # it (Flux, SD3.5, Z-Image…: transformers with their own conditioning inputs) is called through
    # its BaseModel's ``apply_model`` with the conds of its own ``extra_conds`` (``_generic_conds``).
    direct = unet_config.get("context_dim") is not None
    return Workload(unet, ms, base.latent_format, first_stage, reward_fn,
                    context_dim=int(unet_config.get("context_dim") or _text_width(unet_config)),
                    adm_channels=int(unet_config.get("adm_in_channels") or 0) if direct else 0,
                    base_model=None if direct else base,
                    pooled_dim=0 if direct else int(unet_config.get("vec_in_dim") or unet_config.get("adm_in_channels")
                                                    or 0),
                    vae_dtype=vae_dtype,
                    downscale=int(getattr(vae, "downscale_ratio", 8) if isinstance(getattr(vae, "downscale_ratio", 8), int) else 8),
                    modules=[unet, first_stage] + ([reward_module] if isinstance(reward_module, torch.nn.Module) else []))


def _text_width(unet_config: dict) -> int:
    """Width of the text encoder's token output a model without ``context_dim`` takes, from the
    names ComfyUI's model detection gives it: ``context_in_dim`` (double-stream transformers),
    ``context_embedder_config`` (MMDiT), ``cap_feat_dim`` (NextDiT)."""
    if unet_config.get("context_in_dim"):
        return int(unet_config["context_in_dim"])
    embedder = unet_config.get("context_embedder_config") or {}
    if embedder.get("params", {}).get("in_features"):
        return int(embedder["params"]["in_features"])
    if unet_config.get("cap_feat_dim"):
        return int(unet_config["cap_feat_dim"])
    raise ValueError("the estimate cannot tell the text conditioning width this model takes "
                     f"(no context_dim, context_in_dim, context_embedder_config or cap_feat_dim in {sorted(unet_config)})")


def _with_diffusion_model(base, unet):
    """A shallow copy of the BaseModel ``base`` running ``unet`` (a fake copy): ``apply_model`` and
    ``extra_conds`` as the graph's model has them, the original's modules untouched."""
    out = copy.copy(base)
    out._modules = dict(base._modules)
    out._modules["diffusion_model"] = unet
    return out


class CompositeStep:
    """One optimizer step of an objective, the engine's work written out in plain torch calls on
    ComfyUI's modules (no sampler, no patcher): used for the estimate (on fake copies), for the
    real measurement it is checked against, and as the bare-torch side of the GPU benchmark.

    The LoRA is ComfyUI's ``LoraDiff`` on the same layers as ``LoraSet`` (``new_adapter``), applied
    as the ops' weight function in the calls with gradients and merged once into the weights for the
    no-grad calls (as ``LoraSet.merged``; here in place, so compiled callers keep their weights).
    ``denoise_steps``: how many no-grad DDPM steps run before the gradient step (None: as the
    config's schedule does; the estimate runs one, the peak is the same). ``decode_per_image``: the
    decode with gradients one image at a time under activation checkpointing, each decoder block
    checkpointed inside it (``checkpointing.checkpointed_decode``, the engine's own call: only one
    image's block inputs and one block's activations alive in the backward pass) instead of one
    batched decode, as the engine's ``make_decoder`` does with ``decode_checkpointing`` (None: the
    config's setting). ``decode_blocks=False``: per image without the block-wise checkpoints (the
    decode before them, for comparisons)."""

    def __init__(self, work: Workload, cfg: TrainConfig, device, denoise_steps: int | None = None,
                 batch_size: int | None = None, nograd_unet: Callable | None = None, seed: int = 0,
                 decode_per_image: bool | None = None, decode_blocks: bool = True):
        self.w, self.cfg, self.device = work, cfg, torch.device(device)
        self.decode_blocks = decode_blocks
        self.decode_per_image = cfg.decode_checkpointing if decode_per_image is None else decode_per_image
        self.B = batch_size or cfg.batch_size
        self.denoise_steps = denoise_steps
        self.gen = torch.Generator().manual_seed(seed)
        unet = work.diffusion_model
        unet.requires_grad_(False)
        work.first_stage.requires_grad_(False)
        self.adapters, self.layers = [], []
        for name, module in target_modules(unet, cfg.targets):  # the layers the engine's LoraSet picks
            weight = getattr(module, "weight", None)
            if not hasattr(module, "weight_function") or weight is None or weight.ndim != 2:
                continue
            adapter = _adapter(weight, cfg.rank, cfg.alpha, self.gen)
            adapter.lora_up.weight.requires_grad_(True)
            adapter.lora_down.weight.requires_grad_(True)
            adapter.alpha.requires_grad_(False)
            module.weight_function = [adapter]
            self.adapters.append(adapter)
            self.layers.append(module)
        self.params = [p for a in self.adapters for p in (a.lora_up.weight, a.lora_down.weight)]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        import comfy.samplers
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        with unset_fake_temporarily():  # the schedule from the real σ table (its values decide the grid)
            self.sigmas = comfy.samplers.calculate_sigmas(work.model_sampling, "ddim_uniform", cfg.num_steps)
        self.steps = sampling_steps(work.model_sampling)  # the engine's step for this sampling type
        self.sigmas = self.sigmas.to(self.device)
        dt = next(unet.parameters()).dtype
        self.dtype = dt
        h, w = cfg.height // work.downscale, cfg.width // work.downscale
        self.latent_shape = (self.B, work.latent_format.latent_channels, h, w)
        self.context = torch.randn(self.B, TOKENS, work.context_dim, device=self.device).to(dt)
        self.uncontext = torch.randn(self.B, TOKENS, work.context_dim, device=self.device).to(dt)
        self.y = torch.randn(2 * self.B, work.adm_channels, device=self.device).to(dt) if work.adm_channels else None
        self.conds: dict = {}  # the generic path's extra conds for the cond+uncond batch (2B)
        if work.base_model is not None:
            self.model = _with_diffusion_model(work.base_model, unet)
            self.nograd_model = self.model if nograd_unet is None else _with_diffusion_model(work.base_model,
                                                                                             nograd_unet)
            self.conds = self._generic_conds()
        self.options = {"optimized_attention_override": _sdpa_override}
        self.nograd_unet = nograd_unet or unet
        self.prompts = ["a prompt"] * self.B

    # -- pieces
    def _randn(self, shape):
        return torch.randn(shape, generator=self.gen).to(self.device)

    def _generic_conds(self) -> dict:
        """The model's own ``extra_conds`` for what a text encoder gives (tokens of its width,
        ``TOKENS`` long; a pooled vector where it takes one), as ComfyUI's sampler makes them
        (``encode_model_conds``), batched for cond+uncond; the cross-attention itself is
        ``context``/``uncontext``, passed per call. (Flux's guidance: its extra_conds' default.)"""
        n = 2 * self.B
        kw = {"cross_attn": torch.cat([self.context, self.uncontext]), "device": self.device,
              "noise": torch.zeros((n,) + self.latent_shape[1:], device=self.device),
              "width": self.cfg.width, "height": self.cfg.height, "prompt_type": "positive"}
        if self.w.pooled_dim:
            kw["pooled_output"] = torch.randn(n, self.w.pooled_dim, device=self.device).to(self.dtype)
        out = {}
        for name, cond in self.model.extra_conds(**kw).items():
            if name == "c_crossattn":
                continue
            out[name] = cond.process_cond(batch_size=n, device=self.device, area=None).cond
        return out

    def _generic_x0(self, model, x, sigma, context):
        """``apply_model`` as the sampler calls it; extra conds cut to the batch (cond only: the first B)."""
        sig = sigma.reshape(-1).expand(x.shape[0]).to(x)
        extra = {k: v[: x.shape[0]] if isinstance(v, torch.Tensor) and v.ndim and v.shape[0] == 2 * self.B else v
                 for k, v in self.conds.items()}
        return model.apply_model(x, sig, c_crossattn=context, c_concat=extra.pop("c_concat", None),
                                 transformer_options=dict(self.options), **extra).float()

    def _x0(self, unet, x, sigma, context, y):
        if self.w.base_model is not None:  # a model without the UNet contract (see workload_from)
            model = self.model if unet is self.w.diffusion_model else self.nograd_model
            return self._generic_x0(model, x, sigma, context)
        ms = self.w.model_sampling
        sig = sigma.reshape(-1).expand(x.shape[0]).to(x)
        xc = ms.calculate_input(sig, x).to(self.dtype)
        t = ms.timestep(sig).float()
        eps = unet(xc, t, context=context, y=y, transformer_options=self.options).float()
        return ms.calculate_denoised(sig, eps, x)

    def cfg_x0(self, x, sigma, unet=None):
        """CFG x0: cond and uncond in one UNet batch (as calc_cond_batch does with memory to spare)."""
        out = self._x0(unet or self.w.diffusion_model, torch.cat([x, x]), sigma,
                       torch.cat([self.context, self.uncontext]), self.y)
        c, u = out.chunk(2)
        return u + (c - u) * self.cfg.cfg

    def cond_x0(self, x, sigma):
        """Conditional branch only (CFG 1)."""
        y = self.y[: x.shape[0]] if self.y is not None else None
        return self._x0(self.w.diffusion_model, x, sigma, self.context[: x.shape[0]], y)

    @contextlib.contextmanager
    def merged(self):
        """No-grad calls: W += (α/r)·up·down once, weight functions off; restored on exit."""
        saved = []
        try:
            with torch.no_grad():
                for m, a in zip(self.layers, self.adapters):
                    original = m.weight.detach().clone()
                    m.weight.copy_(a(m.weight))
                    m.weight_function = []
                    saved.append((m, a, original))
            yield
        finally:
            with torch.no_grad():
                for m, a, original in saved:
                    m.weight.copy_(original)
                    m.weight_function = [a]

    @contextlib.contextmanager
    def lora_off(self):
        """The reference model (SQDF): the LoRA's weight functions taken off."""
        try:
            for m in self.layers:
                m.weight_function = []
            yield
        finally:
            for m, a in zip(self.layers, self.adapters):
                m.weight_function = [a]

    def denoise(self, x, start, stop):
        n = stop - start if self.denoise_steps is None else min(self.denoise_steps, stop - start)
        with torch.no_grad(), self.merged():
            for i in range(start, start + n):
                x0 = self.cfg_x0(x, self.sigmas[i], self.nograd_unet)
                x = self.steps.step(x, x0, self.sigmas[i], self.sigmas[i + 1], self._randn(x.shape))
        return x

    def decode(self, x0):
        return checkpointed_decode(self._decode, self.w.first_stage, x0, self.decode_per_image, self.decode_blocks)

    def _decode(self, x0):
        z = self.w.latent_format.process_out(x0).to(self.w.vae_dtype)
        img = self.w.first_stage.decode(z).float()
        return ((img + 1.0) / 2.0).clamp(0.0, 1.0)

    # -- objectives (the loss; backward and the optimizer step in ``step``)
    def refl(self):
        cfg = self.cfg
        stop = cfg.refl_stop_max
        noise = self._randn(self.latent_shape)
        x = self.denoise(noise * self.sigmas[0], 0, stop)
        r = self.w.reward(self.decode(self.cfg_x0(x.detach(), self.sigmas[stop])), self.prompts)
        return cfg.refl_weight * torch.relu(cfg.refl_lambda - r).mean()

    def imagerefl(self):
        cfg = self.cfg
        latent = self._randn(self.latent_shape)
        t_f = cfg.imagerefl_tf_max
        x = self.denoise(latent + self._randn(self.latent_shape) * self.sigmas[cfg.imagerefl_start],
                         cfg.imagerefl_start, t_f)
        r = self.w.reward(self.decode(self.cfg_x0(x.detach(), self.sigmas[t_f])), self.prompts)
        sig = self.sigmas[min(cfg.imagerefl_start, len(self.sigmas) - 2)]
        x0_pred = self.cond_x0(latent + self._randn(latent.shape) * sig, sig)
        mse = (((latent - x0_pred) / sig) ** 2).mean()
        return cfg.loss_scale * (cfg.mse_weight * mse - r.mean())

    def sqdf_update(self):
        cfg = self.cfg
        i = len(self.sigmas) - 3  # a stochastic step (σ_{i+1} > 0): it has the KL term
        s, sp = self.sigmas[i], self.sigmas[i + 1]
        x = self._randn(self.latent_shape) * s
        x0_policy = self.cfg_x0(x, s)
        with torch.no_grad(), self.lora_off():
            x0_ref = self.cfg_x0(x, s)
        mu, std = self.steps.posterior(x, x0_policy, s, sp)
        mu_ref, _ = self.steps.posterior(x, x0_ref, s, sp)
        x_next = mu + std * self._randn(x.shape)
        with self.lora_off():
            x0_hat = self.cond_x0(x_next, sp)
        r = self.w.reward(self.decode(x0_hat), self.prompts)
        kl = ((mu - mu_ref) ** 2).flatten(1).mean(1) / std ** 2
        return (-(cfg.sqdf_gamma ** 2) * r + cfg.sqdf_alpha * kl).mean()

    def sqdf_collect(self):
        n = len(self.sigmas) - 1
        x = self._randn(self.latent_shape) * self.sigmas[0]
        with torch.no_grad():
            xs = [x.float().cpu()]
            x = self.denoise(x, 0, n)
            xs.append(x.float().cpu())
            self.w.reward(self.decode(x), self.prompts)
        return None

    def step(self, kind: str):
        """One optimizer step of ``kind`` (refl, imagerefl, sqdf_update, sqdf_collect)."""
        # comfy_training_mode: the plain-torch rotary embeddings the engine trains with (flow
        # transformers' fused kernels have no backward), also for a checkpointed recomputation in
        # the backward pass; no effect on UNets
        with comfy_training_mode():
            self._step(kind)

    def _step(self, kind: str):
        self.optimizer.zero_grad(set_to_none=True)
        cfg = self.cfg
        with gradient_checkpointing(self.w.diffusion_model, cfg.grad_checkpointing), \
                torch.autocast(self.device.type, dtype=torch.bfloat16 if cfg.precision == "bf16" else torch.float16,
                               enabled=cfg.precision != "fp32"):
            loss = getattr(self, kind)()
        if loss is None:  # collection: no update
            return
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        self.optimizer.step()

    def warm_optimizer(self):
        """AdamW's state as after the first step (two fp32 moments per LoRA weight), made without a
        step, so a tracked step shows the steady state."""
        for p in self.params:
            p.grad = torch.zeros_like(p)
        lr = self.optimizer.param_groups[0]["lr"]
        self.optimizer.param_groups[0]["lr"] = 0.0
        self.optimizer.step()
        self.optimizer.param_groups[0]["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    def tracked(self, kind: str) -> tuple[int, dict[str, int]]:
        """Peak live bytes of one steady-state step of ``kind`` (weights and optimizer state included)."""
        self.warm_optimizer()
        return tracked_peak(lambda: self.step(kind), *self.w.modules, *self.adapters, self.optimizer,
                            self.context, self.uncontext, self.y,
                            *[v for v in self.conds.values() if isinstance(v, torch.Tensor)])


def _adapter(weight, rank: int, alpha: float, generator):
    """``LoraSet``'s adapter for ``weight`` (``new_adapter``: fp32 up (out, r), down (r, in), α);
    on a fake weight built directly (``new_adapter``'s meta-device route cannot give fake tensors
    storage; a fake initialiser draws no random numbers anyway)."""
    from torch._subclasses.fake_tensor import FakeTensor
    if not isinstance(weight, FakeTensor):
        return new_adapter(weight, rank, alpha, generator)
    from comfy.weight_adapter.lora import LoraDiff
    up = torch.empty(weight.shape[0], rank, dtype=torch.float32, device=weight.device)
    down = torch.zeros(rank, weight.shape[1:].numel(), dtype=torch.float32, device=weight.device)
    with torch.device(weight.device):  # LoraDiff's own layers are made on the weight's device
        return LoraDiff((up, down, alpha, None, None, None))


def objective_kinds(cfg: TrainConfig) -> list[str]:
    """The step kinds a run of ``cfg`` executes."""
    if cfg.objective == "sqdf":
        return ["sqdf_collect", "sqdf_update"]
    if cfg.objective == "imagerefl":
        return ["imagerefl"] + (["refl"] if cfg.refl_every else [])
    return ["refl"]


def step_batch(cfg: TrainConfig, kind: str) -> int:
    """Images per micro-batch of ``kind`` as the engine runs it."""
    return min(cfg.batch_size, cfg.sqdf_collect) if kind == "sqdf_collect" else cfg.batch_size


# ----------------------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    """Peak bytes per step kind, with the breakdown of the largest one."""
    per_kind: dict[str, int]
    breakdown: dict[str, dict[str, int]]

    @property
    def peak(self) -> int:
        return max(self.per_kind.values())


def estimate(model, vae, reward, config: TrainConfig, *, device: str = "cpu",
             kinds: list[str] | None = None, decode_per_image: bool | None = None,
             decode_blocks: bool = True) -> Estimate:
    """The peak of each step kind of ``config`` on fake copies of ``model``, ``vae``, ``reward``
    (no memory allocated; seconds for a tiny model, 1–2 minutes per kind for SD1.5 on a busy
    2-core CPU). ``decode_per_image``: the decode one image at a time with checkpointing (see
    CompositeStep); None: as the config's ``decode_checkpointing``; ``decode_blocks=False``: without
    the block-wise checkpoints inside it. See the module doc."""
    cfg = config.validate()
    out, parts = {}, {}
    for kind in kinds or objective_kinds(cfg):
        mode = new_fake_mode()
        work = workload_from(model, vae, reward, fake_mode=mode, device=device)
        with mode:
            step = CompositeStep(work, cfg, device, denoise_steps=1, batch_size=step_batch(cfg, kind),
                                 decode_per_image=decode_per_image, decode_blocks=decode_blocks)
            out[kind], parts[kind] = step.tracked(kind)
    return Estimate(out, parts)


def module_bytes(module: torch.nn.Module) -> int:
    """Bytes of a module's parameters and buffers (what one more copy of it costs)."""
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


#: the settings a step's peak depends on: with the models' architectures, the key of ``cached_estimate``
MEMORY_FIELDS = ("objective", "refl_every", "batch_size", "sqdf_collect", "width", "height", "rank", "targets",
                 "precision", "grad_checkpointing", "decode_checkpointing")
_CACHE: dict[tuple, Estimate] = {}
_CACHE_LOCK = threading.Lock()


def architecture(module) -> str:
    """A digest of what the estimate reads from a module: its class and every parameter's and
    buffer's name, shape and dtype (not the values: two checkpoints of one architecture share it)."""
    import hashlib
    if not isinstance(module, torch.nn.Module):
        return f"callable:{id(module)}"  # a plain function: nothing to read its size from
    h = hashlib.sha256(type(module).__qualname__.encode())
    for name, t in list(module.named_parameters()) + list(module.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    return h.hexdigest()[:16]


def estimate_key(model, vae, reward, config: TrainConfig) -> tuple:
    """What an estimate depends on: the UNet's, VAE's and reward model's architectures and the
    ``MEMORY_FIELDS`` of the config (not the weights' values, the learning rate, the steps…)."""
    base = getattr(model, "model", model)
    first_stage = getattr(vae, "first_stage_model", vae)
    reward_module = getattr(reward, "model", reward) if isinstance(getattr(reward, "model", None), torch.nn.Module) \
        else reward
    settings = tuple((f, tuple(v) if isinstance(v, list) else v)
                     for f in MEMORY_FIELDS for v in [getattr(config, f)])
    return (architecture(base.diffusion_model), architecture(first_stage), str(getattr(vae, "vae_dtype", "")),
            architecture(reward_module), settings)


def cached_estimate(model, vae, reward, config: TrainConfig, on_start=None) -> tuple[Estimate, bool]:
    """``estimate`` once per (architecture, memory settings) in this process: (the estimate, whether
    it came from the cache). A real-size estimate takes minutes on the CPU; queueing the same
    models and settings again (more steps, another learning rate or seed, another checkpoint of
    the same base) costs nothing. ``on_start()``: called before an estimate that is not cached, so
    the caller can say that it waits for one."""
    key = estimate_key(model, vae, reward, config)
    with _CACHE_LOCK:
        if key in _CACHE:
            return _CACHE[key], True
    if on_start is not None:
        on_start()
    est = estimate(model, vae, reward, config)
    with _CACHE_LOCK:
        _CACHE[key] = est
    return est, False


def estimate_peak_bytes(model, vae, reward, config: TrainConfig, *, device: str = "cpu") -> int:
    """Estimated peak device memory (bytes) of a training run of ``config``: the largest step."""
    return estimate(model, vae, reward, config, device=device).peak


def measure_peak_bytes(model, vae, reward, config: TrainConfig, kind: str, *, device: str = "cpu",
                       denoise_steps: int | None = 1, decode_blocks: bool = True) -> tuple[int, dict[str, int]]:
    """The same step on the real modules (real memory), measured by the same tracker: what the
    estimate is checked against. Attaches and removes LoRA weight functions on ``model``'s
    modules, so only for a model nothing else is running."""
    work = workload_from(model, vae, reward, device=device)
    unet = work.diffusion_model
    saved = {m: m.__dict__.get("weight_function") for m in unet.modules() if hasattr(m, "weight_function")}
    try:
        step = CompositeStep(work, config.validate(), device, denoise_steps=denoise_steps,
                             batch_size=step_batch(config, kind), decode_blocks=decode_blocks)
        return step.tracked(kind)
    finally:
        for m, functions in saved.items():
            if functions is None:
                m.__dict__.pop("weight_function", None)
            else:
                m.weight_function = functions


# ----------------------------------------------------------------------------- the refusal
def needed_bytes(estimate_bytes: int) -> int:
    """What a run of this estimate needs free: the tracked peak plus ``ALLOCATOR_MARGIN``."""
    return int(math.ceil(estimate_bytes * (1 + ALLOCATOR_MARGIN)))


def _gib(n: int) -> str:
    return f"{n / GiB:.1f} GiB"


def fits(estimate_bytes: int, budget_bytes: int, config: TrainConfig | None = None) -> tuple[bool, str]:
    """Whether a run whose step peaks at ``estimate_bytes`` fits ``budget_bytes`` of device memory,
    with the allocator margin. The message says so, or what to lower (in the order that saves most
    for least: gradient checkpointing, batch size, resolution, precision, LoRA rank) — the
    settings of ``config`` when given."""
    need = needed_bytes(estimate_bytes)
    if need <= budget_bytes:
        return True, (f"estimated peak {_gib(estimate_bytes)} (+{ALLOCATOR_MARGIN:.0%} allocator margin = "
                      f"{_gib(need)}) fits the {_gib(budget_bytes)} available")
    steps = []
    if config is None:
        steps = ["turn on gradient_checkpointing", "turn on decode_checkpointing", "lower batch_size",
                 "lower width/height",
                 "use bf16 precision", "lower the LoRA rank"]
    else:
        if not config.grad_checkpointing:
            steps.append("turn on gradient_checkpointing")
        if not config.decode_checkpointing:  # block by block inside the decoder: helps at batch 1 too
            steps.append("turn on decode_checkpointing")
        if config.batch_size > 1:
            steps.append(f"lower batch_size (now {config.batch_size}; raise grad_accum to keep the "
                         "effective batch)")
        if config.width * config.height > 512 * 512:
            steps.append(f"lower width/height (now {config.width}×{config.height})")
        if config.precision == "fp32":
            steps.append("use bf16 precision")
        if config.rank > 8:
            steps.append(f"lower the LoRA rank (now {config.rank})")
    tail = ("; ".join(steps) if steps else "this model does not train at batch 1 on this card: use a card "
            "with more memory")
    return False, (f"this run will not fit: one training step needs about {_gib(need)} (estimated peak "
                   f"{_gib(estimate_bytes)} + {ALLOCATOR_MARGIN:.0%} margin), the device has {_gib(budget_bytes)}. "
                   f"To fit: {tail}")


def check_fits(model, vae, reward, config: TrainConfig, budget_bytes: int, *,
               peak: int | None = None) -> tuple[bool, str]:
    """``fits`` for a run, and when it does not fit, the first single change (then pairs of
    changes) that would, found by re-estimating: "turn on gradient_checkpointing and lower
    batch_size to 2 (estimated 7.4 GiB)". ``peak``: the run's estimate if already known."""
    if peak is None:
        peak = estimate_peak_bytes(model, vae, reward, config)
    ok, message = fits(peak, budget_bytes, config)
    if ok:
        return ok, message
    for change, text in _changes(config):
        try:
            alt = TrainConfig(**{**config.__dict__, **change}).validate()
        except Exception:  # noqa: BLE001 - an alternative the config's other settings forbid
            continue
        alt_peak = estimate_peak_bytes(model, vae, reward, alt)
        if needed_bytes(alt_peak) <= budget_bytes:
            return False, f"{message}. Suggested: {text} (estimated peak {_gib(alt_peak)})"
    return False, message


def _changes(cfg: TrainConfig):
    """Single changes first, then checkpointing with each of the others, smallest loss first."""
    singles = []
    if not cfg.grad_checkpointing:
        singles.append(({"grad_checkpointing": True}, "turn on gradient_checkpointing"))
    if not cfg.decode_checkpointing:
        singles.append(({"decode_checkpointing": True}, "turn on decode_checkpointing"))
    b = cfg.batch_size
    while b > 1:
        b //= 2
        singles.append(({"batch_size": b, "sqdf_collect": max(cfg.sqdf_collect, b)},
                        f"lower batch_size to {b} (grad_accum × {cfg.batch_size // max(b, 1)} keeps the effective batch)"))
    if cfg.precision == "fp32":
        singles.append(({"precision": "bf16"}, "use bf16 precision"))
    for side in (768, 512, 384):
        if cfg.width * cfg.height > side * side:
            singles.append(({"width": side, "height": side}, f"train at {side}×{side}"))
    yield from singles
    if not cfg.grad_checkpointing:
        for change, text in singles[1:]:
            yield {**change, "grad_checkpointing": True}, f"turn on gradient_checkpointing and {text}"


# ------------------------------------------------------------------------------ the check before a run
def device_budget(config: TrainConfig, device) -> tuple[int | None, str]:
    """(bytes a run on ``device`` may use, where that number comes from), or (None, why there is
    no check). ``memory_budget_gb`` wins; else the GPU's total memory as ComfyUI reads it, less
    ComfyUI's own reserve (``extra_reserved_memory``: the CUDA context, other programs). On the
    CPU there is no card to fit: no check unless a budget is set."""
    import comfy.model_management as mm
    if config.memory_budget_gb > 0:
        return int(config.memory_budget_gb * GiB), "memory_budget_gb"
    device = torch.device(device)
    if device.type == "cpu":
        return None, "not checked: the model runs on the CPU (no card to fit); set memory_budget_gb to check"
    total = mm.get_total_memory(device)
    return max(total - mm.extra_reserved_memory(), 0), f"{mm.get_torch_device_name(device)}, {_gib(total)}"


ESTIMATING = ("estimating the training step's memory on the CPU before the run starts (once per model and "
              "memory settings: seconds for SD1.5, a minute or more for SDXL) …")


def check_budget(config: TrainConfig, model, vae, reward, *, where: str = "config_json", on_estimate=None) \
        -> tuple[str, int | None, int | None]:
    """The check the trainer node and the CLI make before a run: the step's peak estimated on fake
    copies of the models (``cached_estimate``: no memory allocated; once per architecture and
    memory settings in a process; minutes at real size on the CPU) against ``device_budget`` for
    the model's device. Returns (a line for the summary or log, the estimated peak, the budget):
    the peak is None where nothing was estimated, the budget None where there is no budget.
    Raises ConfigError saying what to lower when the step will not fit. A model the estimate
    cannot rebuild is logged and not checked: the training itself must not fail on the estimate.
    ``where``: how the user sets memory_budget_gb, for the messages. ``on_estimate(text)``: called
    with ``ESTIMATING`` before an estimate that is not cached (the node shows it on itself: the queue
    waits meanwhile)."""
    import logging
    import time

    import comfy.model_management as mm
    from .config import ConfigError
    budget, source = device_budget(config, getattr(model, "load_device", None) or mm.get_torch_device())
    if budget is None:
        return f"memory: {source} ({where})", None, None
    t0 = time.perf_counter()
    try:
        # the node body runs under inference_mode; the estimate's step needs autograd (on fake tensors)
        with torch.inference_mode(False), torch.enable_grad():
            est, cached = cached_estimate(model, vae, reward, config,
                                          on_start=(lambda: on_estimate(ESTIMATING)) if on_estimate else None)
    except Exception as e:  # noqa: BLE001 - a model the estimate cannot rebuild must not stop the training
        logging.getLogger("rewardtune").warning("RewardTune: memory estimate failed, not checked", exc_info=True)
        return f"memory: not checked: the estimate failed for this model ({type(e).__name__}: {e})", None, budget
    how = "cached estimate" if cached else f"estimated in {time.perf_counter() - t0:.1f} s"
    ok, message = fits(est.peak, budget, config)
    if not ok:
        raise ConfigError(f"{message}. (Budget: {source}; {how}. The estimate is the step's peak on the CPU "
                          f"under FakeTensorMode; to train anyway, set a larger memory_budget_gb ({where}).)")
    return f"memory: {message} ({source}; {how})", est.peak, budget
