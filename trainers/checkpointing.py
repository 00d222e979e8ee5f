"""Gradient checkpointing for a ComfyUI diffusion model, switched on for the length of a run.

Every block of the model's top-level block lists (the layers of a UNet's ``input_blocks``,
``middle_block`` and ``output_blocks``, a DiT's ``blocks``…) keeps only its inputs during the forward pass and recomputes its activations
in the backward pass: activation memory drops from all blocks to about one block, for roughly one
extra forward. Only forwards that build a graph are checkpointed; no-grad and inference-mode calls
(the no-grad denoise, other prompts sampling from the same model meanwhile) run as before. The
blocks are restored when the run ends, so the graph's model is left as it was.

The recomputation runs under the weight functions (ComfyUI's LoRA wrappers) each layer had in the
forward pass, not those it has when backward runs: SQDF's reference call takes the LoRA off for its
forward, and recomputing it with the LoRA back on failed ("Recomputed values … have different
metadata").

Every checkpoint here is taken without torch's RNG preservation (``_checkpoint``): restoring the
forward pass's RNG state for the recomputation sets the process-wide generators, and a job training
on a worker thread would then change the noise of a prompt sampling on the main thread at that
moment (tests/test_trainer_rng.py saw 3 of 10960 foreground draws changed). Nothing checkpointed
here draws random numbers: the models run in eval mode (ComfyUI puts diffusion models and VAEs
there: dropout off), and the training noise comes from the job's own generator outside them.
"""
from __future__ import annotations

import contextlib
import weakref

import torch
import torch.utils.checkpoint


def _checkpoint(function, *args, **kwargs):
    """torch's non-reentrant activation checkpoint, without saving and restoring the global RNG
    state (see the module doc). ``kwargs`` are the checkpointed function's."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False, preserve_rng_state=False,
                                             **kwargs)


def _blocks(diffusion_model: torch.nn.Module) -> list[torch.nn.Module]:
    """The units to checkpoint. A UNet's blocks are ``TimestepEmbedSequential``s whose layers
    the UNet calls one by one (their own forward is never called), so for a Sequential its layers
    (ResBlock, SpatialTransformer…) are the units."""
    blocks = [b for child in diffusion_model.children() if isinstance(child, torch.nn.ModuleList) for b in child]
    middle = getattr(diffusion_model, "middle_block", None)
    blocks += [middle] if isinstance(middle, torch.nn.Module) else []
    return [layer for b in blocks for layer in (b if isinstance(b, torch.nn.Sequential) else [b])]


def _functions(layers):
    """The weight/bias function lists the layers have now (None: the class default)."""
    return [(m.__dict__.get("weight_function"), m.__dict__.get("bias_function")) for m in layers]


def _set_functions(layers, state):
    for m, (weight_fns, bias_fns) in zip(layers, state):
        for name, fns in (("weight_function", weight_fns), ("bias_function", bias_fns)):
            if fns is None:
                m.__dict__.pop(name, None)
            else:
                setattr(m, name, list(fns))


@contextlib.contextmanager
def _as_in_forward(layers, state):
    """For the recomputation: the layers' functions as they were in the forward pass."""
    now = _functions(layers)
    _set_functions(layers, state)
    try:
        yield
    finally:
        _set_functions(layers, now)


def _storage(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage (views and detached tensors share it). Not ``data_ptr()``:
    a FakeTensor (the memory estimate) has none, and every fake tensor would look shared."""
    return t.untyped_storage()._cdata


def _copy_if_in(storages: set[int]):
    """A pack hook: a saved tensor that shares memory with one of the block's inputs is saved as a
    copy (the block may add its residual into that input in place), any other as it is."""
    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if _storage(t) in storages else t
    return pack


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@contextlib.contextmanager
def _recomputation(layers, state, seen=None):
    """For the recomputation in the backward pass: the layers' functions as they were in the
    forward pass, and every tensor the recomputed block saves handed to the checkpoint as a copy.
    The checkpoint keeps what the recomputation saves by reference, so a block that later adds a
    residual in place into a tensor a LayerNorm saved (Flux, MMDiT, NextDiT: ``img += …``) would
    change it before its use: the gradients came out ~10% off (tests/test_flow_training.py). The
    checkpoint's own pack hook is the innermost one here (torch's private accessor: there is no
    public one); ours wraps it. ``seen`` (a watched block, see ``_watched``): copies only where its
    forward pass changed a saved tensor in place."""
    if seen is not None:
        seen["recomputing"] = True
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    with _as_in_forward(layers, state):
        if top is None or (seen is not None and not seen["saved"]):
            yield
            return
        pack, unpack = top
        with torch.autograd.graph.saved_tensors_hooks(lambda t: pack(t.clone()), unpack):
            yield


def _on_copies(forward, *args, **kwargs):
    """``forward`` on copies of its tensor arguments: the checkpoint keeps the block's inputs for
    the recomputation, and a block that adds its residual in place into its input (Flux's
    single blocks: ``x += …``) would change them before the backward pass."""
    def copy(v):
        return v.clone() if isinstance(v, torch.Tensor) else v
    return forward(*map(copy, args), **{k: copy(v) for k, v in kwargs.items()})


def _watched(forward, seen, *args, **kwargs):
    """``forward`` for a watched checkpoint. In the forward pass: on copies of its tensor arguments,
    noting in ``seen`` whether it changed one of them ("inputs") or a tensor it saved for the
    backward pass ("saved") in place (version counters; saved tensors by weak reference, so nothing
    is kept alive). In the recomputation: on copies of its arguments only if it changed them, and
    ``_recomputation`` copies what it saves only if it changed any. A block without in-place
    changes (ComfyUI's VAE decoder blocks) is recomputed without the copies, which at 1024² are
    several full-resolution tensors at the backward pass's peak."""
    if seen.get("recomputing"):
        return (_on_copies if seen["inputs"] else lambda f, *a, **k: f(*a, **k))(forward, *args, **kwargs)
    copies = [v.clone() if isinstance(v, torch.Tensor) else v for v in args]
    kw = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    inputs = [(v, v._version) for v in (*copies, *kw.values()) if isinstance(v, torch.Tensor)]
    saved = []
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is None:
        out = forward(*copies, **kw)
    else:
        pack, unpack = top

        def watch(t):
            saved.append((weakref.ref(t), t._version))
            return pack(t)
        with torch.autograd.graph.saved_tensors_hooks(watch, unpack):
            out = forward(*copies, **kw)
    seen["inputs"] = any(v._version != n for v, n in inputs)
    seen["saved"] = any(r() is not None and r()._version != n for r, n in saved)
    return out


def _checkpointed(forward, layers, watch: bool = False):
    """``forward`` under a non-reentrant activation checkpoint: only its inputs are kept, its
    activations are recomputed in the backward pass under the weight functions ``layers`` had in
    the forward pass, on copies of its inputs and with what the recomputation saves copied (the
    in-place fixes above); ``watch``: those copies only where the forward pass showed them needed
    (``_watched``)."""
    def run(*args, **kwargs):
        state = [(list(w) if w is not None else None, list(b) if b is not None else None)
                 for w, b in _functions(layers)]
        if not watch:
            return _checkpoint(
                _on_copies, forward, *args,
                context_fn=lambda: (contextlib.nullcontext(), _recomputation(layers, state)), **kwargs)
        seen = {"inputs": True, "saved": True}
        return _checkpoint(
            _watched, forward, seen, *args,
            context_fn=lambda: (contextlib.nullcontext(), _recomputation(layers, state, seen)), **kwargs)
    return run


@contextlib.contextmanager
def gradient_checkpointing(diffusion_model: torch.nn.Module, enabled: bool = True):
    """For the run: each block's graph-building forward either checkpointed (``enabled``) or run
    with the saved tensors that share memory with its inputs copied. The copy is what makes
    ComfyUI's transformer blocks differentiable: Flux blocks add their residuals in place into
    their inputs (``img += …``, ``x += …``) after a LayerNorm saved them for the backward pass,
    which autograd refuses ("one of the variables needed for gradient computation has been
    modified by an inplace operation"). It costs about one copy of each block's inputs (a UNet
    block's too: one code path). No-grad calls are untouched."""
    patched = []
    for block in _blocks(diffusion_model):
        if "forward" in block.__dict__:  # already wrapped (a nested run): leave it
            continue
        forward = block.forward
        layers = [m for m in block.modules() if hasattr(m, "weight_function")]
        checkpointed = _checkpointed(forward, layers)

        def wrapped(*args, _forward=forward, _checkpointed=checkpointed, **kwargs):
            if not torch.is_grad_enabled():
                return _forward(*args, **kwargs)
            if not enabled:
                inputs = {_storage(v) for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor)}
                with torch.autograd.graph.saved_tensors_hooks(_copy_if_in(inputs), _same):
                    return _forward(*args, **kwargs)
            return _checkpointed(*args, **kwargs)
        block.forward = wrapped
        patched.append(block)
    try:
        yield patched if enabled else []
    finally:
        for block in patched:
            del block.forward


# ----------------------------------------------------------------------------- the VAE decode
_CONTAINERS = (torch.nn.Module, torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)


def _decoder_blocks(first_stage: torch.nn.Module) -> list[torch.nn.Module]:
    """The units to checkpoint in a VAE's decode: the blocks of its decoder (the child module
    whose name has "decoder": ``AutoencoderKL.decoder``, TAESD's ``taesd_decoder``…). Containers
    that only hold blocks (a plain ``nn.Module`` such as ComfyUI's ``Decoder.mid`` and
    ``Decoder.up[i]``, ``ModuleList``s, ``Sequential``s) are opened; a module with submodules of its
    own (a ResnetBlock, an attention block, an Upsample with its conv, TAESD's Block) is a unit;
    single layers (convs, norms, activations) are left as they are (checkpointing one layer saves
    nothing: it keeps its input either way)."""
    decoders = [m for name, m in first_stage.named_children() if "decoder" in name.lower()]

    def units(module):
        out = []
        for child in module.children():
            if type(child) in _CONTAINERS:
                out += units(child)
            elif next(child.children(), None) is not None:
                out.append(child)
        return out
    return [u for d in decoders for u in units(d)]


@contextlib.contextmanager
def decoder_checkpointing(first_stage: torch.nn.Module):
    """For the length of a decode: each block of the VAE's decoder (``_decoder_blocks``) runs its
    graph-building forward under an activation checkpoint, so the backward pass holds the blocks'
    inputs and one block's activations at a time instead of every activation of the decoder (at
    1024² those are many GiB). Same gradients. Calls without gradients, and calls given a list
    (a video VAE's causal-convolution carry, which the block fills: a recomputation would fill it
    twice), run as they are. Restored on exit."""
    patched = []
    for block in _decoder_blocks(first_stage):
        if "forward" in block.__dict__:  # already wrapped (a nested decode): leave it
            continue
        forward = block.forward
        checkpointed = _checkpointed(forward, [m for m in block.modules() if hasattr(m, "weight_function")],
                                     watch=True)

        def wrapped(*args, _forward=forward, _checkpointed=checkpointed, **kwargs):
            if not torch.is_grad_enabled() or any(isinstance(v, (list, dict)) for v in (*args, *kwargs.values())):
                return _forward(*args, **kwargs)
            return _checkpointed(*args, **kwargs)
        block.forward = wrapped
        patched.append(block)
    try:
        yield patched
    finally:
        for block in patched:
            del block.forward


def checkpointed_decode(decode_batch, first_stage: torch.nn.Module, x0: torch.Tensor,
                        checkpointing: bool = True, blocks: bool = True) -> torch.Tensor:
    """``decode_batch(x0)`` (latents → images through ``first_stage``'s decoder) as the training
    step runs it; the engine's decoder and the memory estimate's step both call this.

    With gradients and ``checkpointing`` (TrainConfig.decode_checkpointing): each image is decoded
    on its own under an activation checkpoint (the backward pass recomputes one image's decode at
    a time), and inside it each decoder block is checkpointed too (``decoder_checkpointing``), so
    the recomputation holds one image's block inputs and one block's activations rather than the
    whole decoder's. That costs about two extra decoder forwards per image. A VAE whose decoder has
    no blocks to find is still decoded per image (``blocks=False``: every VAE so, the decode
    before block-wise checkpointing, for comparisons). Without gradients (sampling, SQDF
    collection) or without ``checkpointing``, the batch is decoded at once."""
    if not (checkpointing and torch.is_grad_enabled() and x0.requires_grad):
        return decode_batch(x0)

    def one_image(z):  # the blocks are wrapped again when the backward pass recomputes this
        with decoder_checkpointing(first_stage) if blocks else contextlib.nullcontext():
            return decode_batch(z)
    return torch.cat([_checkpoint(one_image, x0[i:i + 1]) for i in range(x0.shape[0])])
