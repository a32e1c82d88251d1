"""Load the HF model and run it with recording hooks (and HF-side ablations) on fixed token ids."""

from __future__ import annotations

from pathlib import Path

import torch

from . import points as P
from .ablations import Ablation, applied
from .capture import HFRecorder, hf_decoder, hf_mlp
from .hf_sites import model_architecture
from .variants import HFRope, VariantContext

#: HF's attention implementation for the baseline, pinned so the reference does not change with
#: whatever transformers would pick by default on a given machine.
BASELINE_ATTENTION = "sdpa"


#: HF's attention when the model class does not support SDPA (Gemma 2: softcapping).
FALLBACK_ATTENTION = "eager"

#: the MCore tensor whose mapping rule names the HF language model's head (see :func:`text_model`)
MCORE_HEAD = "output_layer.weight"


def attention_implementation(path: Path) -> tuple[str, str]:
    """``("sdpa", "")``, or ``("eager", why)`` when the checkpoint's HF class cannot run SDPA.

    Decided from the class's ``_supports_sdpa`` before loading (``from_pretrained`` would raise
    half-way through a run); the reason goes into report.md."""
    cls = _model_class(path)
    if getattr(cls, "_supports_sdpa", False):
        return BASELINE_ATTENTION, ""
    return FALLBACK_ATTENTION, f"{cls.__name__} does not support SDPA, so HF runs {FALLBACK_ATTENTION} attention"


def load_hf(path: Path, dtype: torch.dtype, device: str, attention: str = BASELINE_ATTENTION) -> torch.nn.Module:
    """``from_pretrained`` in ``dtype`` with ``attention`` (see :func:`attention_implementation`), in eval mode."""
    model = _model_class(path).from_pretrained(path, dtype=dtype, attn_implementation=attention)
    return model.to(device).eval()


def _model_class(path: Path) -> type:
    """The transformers class the checkpoint's config names (a VLM: its own, not a causal LM's)."""
    from transformers import AutoConfig

    from ..presets import model_class

    config = AutoConfig.from_pretrained(path)
    return model_class(config, (getattr(config, "architectures", None) or [None])[0])


def fill_context(model: torch.nn.Module, ctx: VariantContext) -> VariantContext:
    """Record the HF family's modeling module, norm/MLP classes and rotary parameters in ``ctx``.

    Works on a meta-device skeleton too (only classes and the rotary *buffer* are read; buffers
    are real there, see :mod:`.layerwise`).
    """
    dec = hf_decoder(model)
    layer = dec.layers[0]
    ctx.hf_modeling = type(layer).__module__
    ctx.hf_norm_class = type(dec.norm).__name__
    ctx.hf_mlp_class = type(hf_mlp(layer)).__name__
    rot = dec.rotary_emb
    ctx.hf_rope = HFRope(inv_freq=rot.inv_freq.detach().float().cpu().clone(),
                         attention_scaling=float(getattr(rot, "attention_scaling", 1.0)))
    return ctx


def inv_freq_dtype(model: torch.nn.Module) -> str:
    """dtype of HF's ``inv_freq`` buffer (``model.to(bf16)`` rounds it in some versions, #30709)."""
    return str(hf_decoder(model).rotary_emb.inv_freq.dtype).replace("torch.", "")


def text_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module that :func:`run_hf` runs on text-only tokens: the one owning the head that the family's
    mapping maps ``output_layer.weight`` to.

    That is the model itself for a ``*ForCausalLM`` and for a VLM whose head is its own (Qwen2.5-VL's
    ``lm_head.weight``: its forward runs text-only input through its language model, mrope positions
    included), and the nested ``*ForCausalLM`` of a VLM that keeps a whole one under its ``hf_prefix``
    (Llama 4's ``language_model.lm_head.weight``). On text-only tokens such a VLM's forward only embeds
    them and calls that module, and running it directly avoids transformers 5.24's
    ``Llama4ForConditionalGeneration.forward``, which always fails building its output (it reads
    ``image_outputs`` from the language model's output, which has none). Hooks stay on the whole model,
    so the mapping's (prefixed) module names still find the attention and router blocks."""
    from ckptbridge.errors import CkptBridgeError
    from ckptbridge.mapping.registry import default_registry

    arch = model_architecture(model)
    rule = next((r for r in default_registry().for_architecture(arch).tensors if r.mcore == MCORE_HEAD), None)
    if rule is None:  # a family whose head is always the embedding: no HF head tensor, the model is the language model
        return model
    owner = rule.hf[0].removesuffix(".weight").rpartition(".")[0]  # "language_model.lm_head" -> "language_model"
    found = dict(model.named_modules()).get(owner)
    if found is None:
        raise CkptBridgeError(f"{arch}: the mapping's head {rule.hf[0]} is not in {type(model).__name__} "
                              f"(no module {owner!r} to run on text-only tokens)")
    return found


def run_hf(model: torch.nn.Module, tokens: torch.Tensor, ctx: VariantContext, variants: tuple[str, ...] = (),
           positions: list[int] | None = None, registry: dict[str, Ablation] | None = None) -> dict[str, torch.Tensor]:
    """One forward of ``tokens`` ([b, s]); returns every point, the layer inputs and the logits
    (sliced to the config's vocabulary).

    ``positions`` (one per token) go to RoPE as ``position_ids``; the 2-D attention mask is then
    passed explicitly (all ones) because transformers reads non-contiguous position ids without a
    mask as *packed sequences* and would block attention across the jump.
    """
    b, s = tokens.shape
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    kwargs: dict[str, torch.Tensor] = {}
    if positions is not None:
        if len(positions) != s:
            raise ValueError(f"{len(positions)} positions for {s} tokens")
        kwargs["position_ids"] = torch.tensor(positions, dtype=torch.long).expand(b, s).to(device)
        kwargs["attention_mask"] = torch.ones(b, s, dtype=torch.long, device=device)
    with torch.no_grad(), applied(variants, "hf", model, ctx, registry), HFRecorder(model) as rec:
        out = text_model(model)(input_ids=tokens.to(device), use_cache=False, **kwargs)
    caps = dict(rec.tensors)
    vocab = model.config.get_text_config().vocab_size  # a VLM's: its language model's
    caps[P.LOGITS] = out.logits[..., :vocab].detach().cpu()
    return caps
