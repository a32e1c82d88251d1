"""Step ``export``: the whole loop users run. The first torch_dist conversion of ``convert`` (fp32) is
trained a few steps by megatron-core and saved as Megatron-LM's ``save_checkpoint`` saves (model and
optimizer, Megatron-LM's args: :mod:`ckptbridge.converge.export_loop`), then exported to HF twice, with
the HF config synthesized from the args and with the source's HF folder as ``--hf-config``; each export's
logits in transformers must equal the trained megatron model's (fp32: ``max_abs``; top-1 agreement 100 %).

Off unless asked for (``export: true`` or a mapping): it trains, so it costs seconds to minutes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import MISSING, Section, SourceConfig
from ..context import GateContext
from ..results import FAIL, PASS, Check
from . import step


@dataclass(frozen=True)
class ExportStepOptions:
    steps: int = 3
    format: str = "torch_dist"
    tp: int = 1
    pp: int = 1
    max_abs: float = 1e-4


def parse(raw: Any, source: SourceConfig, enabled: dict[str, Any]) -> ExportStepOptions | None:
    if raw is MISSING or raw is False:
        return None
    if raw is True:
        return ExportStepOptions()
    s = Section(raw, "export")
    opts = ExportStepOptions(
        steps=s.take("steps", int, 3, minimum=1),
        format=s.take("format", str, "torch_dist", choices=("torch_dist", "torch")),
        tp=s.take("tp", int, 1, minimum=1),
        pp=s.take("pp", int, 1, minimum=1),
        max_abs=s.take("max_abs", float, 1e-4, minimum=0),
    )
    s.finish()
    return opts


@step("export", parse)
def run(ctx: GateContext, opts: ExportStepOptions) -> list[Check]:
    import json

    import torch

    from ...config_source import ConfigOptions
    from ...convert import Target, convert
    from ...converge.export_loop import train_and_save

    imported = next((c.path for c in ctx.candidates if c.path is not None and c.ckpt_format == "torch_dist"
                     and c.dtype in (None, torch.float32)), None)
    if imported is None:
        imported = ctx.work / "export" / "imported"
        convert(ctx.hf, imported, "hf", Target("mcore", dtype=torch.float32))
    from ...formats.mcore_common import iteration_dir

    vocab = int(json.loads((ctx.hf / "config.json").read_text())["vocab_size"])
    trained = train_and_save(iteration_dir(imported), ctx.work / "export" / "trained", vocab, fmt=opts.format,
                             steps=opts.steps, tp=opts.tp, pp=opts.pp)
    checks = [Check("export", "train", PASS, f"{opts.steps} steps at tp{opts.tp} pp{opts.pp}, saved as Megatron-LM "
                    f"({opts.format}); loss {trained['losses'][0]:.3f} -> {trained['losses'][-1]:.3f}")]
    for label, config in (("synthesized-config", ConfigOptions()), ("hf-config", ConfigOptions(hf_config=ctx.hf))):
        out = ctx.work / "export" / label
        convert(trained["root"], out, "mcore", Target("hf"), config=config)
        checks += _parity(label, out, trained, opts.max_abs)
    return checks


def _parity(label: str, folder: Any, trained: dict[str, Any], max_abs: float) -> list[Check]:
    import torch
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(trained["tokens"]).logits
    if logits.shape != trained["logits"].shape:
        return [Check("export", f"{label}.logits", FAIL, f"shape {list(logits.shape)} vs {list(trained['logits'].shape)}")]
    diff = float((logits - trained["logits"]).abs().max())
    top1 = float((logits.argmax(-1) == trained["logits"].argmax(-1)).float().mean())
    return [
        Check("export", f"{label}.max_abs", PASS if diff <= max_abs else FAIL,
              f"{diff:.3g} vs {max_abs:.3g} (HF export vs trained megatron model, fp32)", diff, max_abs),
        Check("export", f"{label}.top1", PASS if top1 == 1.0 else FAIL, f"{top1:.4f} vs 1.0", top1, 1.0),
    ]

