"""``ckptbridge align``: run HF and Megatron-Core side by side, layer by layer, and explain the gap.

Modules, one job each:

* :mod:`.points`    -- names of the capture points (embedding, per-layer sub-blocks, final norm, logits)
* :mod:`.metrics`   -- max/mean abs, relative Frobenius error, cosine; KL, top-1, loss delta for logits
* :mod:`.capture`   -- forward hooks that record both models and feed HF inputs to MCore (isolated mode)
* :mod:`.ablations` -- the ablation recipes of ``alignment/ablations.yaml`` and the context manager
  that swaps them in; implementations live in :mod:`.variants`
* :mod:`.hf_side` / :mod:`.mcore_side` -- load and run each model (MCore in-process or in TP/PP workers)
* :mod:`.weights` / :mod:`.tokens` -- where the weights and the token ids come from
* :mod:`.runner`    -- one alignment run: every setting x mode, the long-position probe
* :mod:`.layerwise` -- isolated mode with one decoder layer of each model in memory at a time
* :mod:`.gate`      -- thresholds, verdicts, JUnit XML
* :mod:`.report` / :mod:`.plots` -- report.md, CSV/JSON, PNG plots
* :mod:`.cli`       -- the ``align`` click command
"""
