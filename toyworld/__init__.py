"""The toy world: a tiny text-to-image world, made from nothing on a CPU, in which the papers' claims
can be measured through the pack's own code (docs/reproduction.md).

* ``scenes``: procedural pictures of shapes and their captions (the data);
* ``detector``: what a picture contains, read procedurally (text alignment, coverage);
* ``preference``: the hidden true preference (the "user"), scored on the detector's reading;
* ``models`` / ``train`` / ``reward`` / ``build``: the diffusion model, text encoder, VAE and
  learned reward, in layouts ComfyUI's and RewardTune's loaders read, and how they are trained;
* ``world``: the built world's files (cached by recipe hash) and loading them as a user would.

``scenes``, ``detector`` and ``preference`` need only numpy/scipy/PIL; the rest imports ComfyUI.
"""
