"""Helpers that run the real megatron-core (0.16.x) on CPU or GPU.

* :mod:`ckptbridge.mcore.compat` -- the minimal CPU patches (``apply_cpu_patches``).
* :mod:`ckptbridge.mcore.model` -- build a ``GPTModel`` from Megatron-LM ``args``,
  load torch_dist / legacy checkpoints into it and run a forward pass.

Nothing is imported eagerly so that ``import ckptbridge.mcore`` stays cheap
(importing megatron-core itself costs several seconds).
"""
