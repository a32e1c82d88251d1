"""Parallel layouts: which pipeline stage and virtual chunk holds which layer.

Megatron numbers layers locally inside each stage (and each virtual chunk), so
the legacy format needs the global <-> (stage, chunk, local index) map; the
torch_dist format is layout-independent but records the layout in its args.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import LayoutError


@dataclass(frozen=True)
class StageChunk:
    """One model chunk: pipeline rank, virtual-pipeline index and its global layers."""

    pp_rank: int
    vchunk: int | None  # None when the layout has no virtual pipeline
    first_layer: int
    num_layers: int

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.first_layer + self.num_layers)


@dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    vpp: int | None = None
    pp_first: int | None = None
    pp_last: int | None = None
    ep: int = 1  # expert parallel: routed experts are spread over this many ranks
    etp: int | None = None  # expert tensor parallel (None: same as tp)

    @property
    def expert_tp(self) -> int:
        return self.tp if self.etp is None else self.etp

    def tp_for(self, parallel: str) -> int:
        """The tensor-parallel size that splits a rule's tensors ("tp" or "etp")."""
        return self.expert_tp if parallel == "etp" else self.tp

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "ep"):
            if getattr(self, name) < 1:
                raise LayoutError(f"--{name} must be at least 1")
        if self.vpp is not None and self.vpp < 1:
            raise LayoutError("--vpp must be at least 1")
        if (self.pp_first or self.pp_last) and self.pp < 2:
            raise LayoutError("--pp-first/--pp-last need --pp of at least 2")
        if (self.pp_first or self.pp_last) and self.vpp:
            raise LayoutError("uneven first/last pipeline stages cannot be combined with --vpp")
        if self.vpp and self.pp < 2:
            raise LayoutError("--vpp needs --pp of at least 2")
        if self.etp is not None and self.etp < 1:
            raise LayoutError("--etp must be at least 1")

    def describe(self) -> str:
        text = f"tp{self.tp} pp{self.pp}"
        if self.vpp:
            text += f" vpp{self.vpp}"
        if self.ep > 1 or self.etp is not None:
            text += f" ep{self.ep} etp{self.expert_tp}"
        if self.pp_first or self.pp_last:
            text += f" (first stage {self.pp_first or '-'}, last stage {self.pp_last or '-'} layers)"
        return text

    def stage_sizes(self, num_layers: int) -> list[int]:
        """Layers per pipeline stage (all chunks of a stage together)."""
        first = self.pp_first if self.pp_first is not None else None
        last = self.pp_last if self.pp_last is not None else None
        fixed = (first or 0) + (last or 0)
        middle_stages = self.pp - (first is not None) - (last is not None)
        rest = num_layers - fixed
        if rest < 0 or (middle_stages == 0 and rest != 0) or (middle_stages and rest % middle_stages):
            raise LayoutError(
                f"{num_layers} layers cannot be split over {self.pp} pipeline stages "
                f"(first {first}, last {last}): the remaining {rest} layers must divide evenly over {middle_stages} stages"
            )
        each = rest // middle_stages if middle_stages else 0
        sizes = [each] * self.pp
        if first is not None:
            sizes[0] = first
        if last is not None:
            sizes[-1] = last
        if any(s < 1 for s in sizes):
            raise LayoutError(f"a pipeline stage would hold no layers: {sizes}")
        return sizes

    def chunks(self, num_layers: int) -> list[StageChunk]:
        """All model chunks in global layer order."""
        if self.vpp:
            parts = self.pp * self.vpp
            if num_layers % parts:
                raise LayoutError(f"{num_layers} layers do not divide into pp {self.pp} x vpp {self.vpp} = {parts} chunks")
            n = num_layers // parts
            return [StageChunk(i % self.pp, i // self.pp, i * n, n) for i in range(parts)]
        out, start = [], 0
        for rank, size in enumerate(self.stage_sizes(num_layers)):
            out.append(StageChunk(rank, None, start, size))
            start += size
        return out

    def stage_chunks(self, num_layers: int, pp_rank: int) -> list[StageChunk]:
        """The chunks of one pipeline stage, by virtual index."""
        return sorted((c for c in self.chunks(num_layers) if c.pp_rank == pp_rank), key=lambda c: c.vchunk or 0)

    def check_divides(self, cfg: Mapping[str, Any]) -> None:
        """TP must split heads, query groups and the FFN; EP the experts; ETP the expert FFN."""
        checks = [("tp", self.tp, f) for f in ("num_attention_heads", "num_query_groups", "ffn_hidden_size",
                                                "moe_shared_expert_intermediate_size")]
        checks += [("ep", self.ep, "num_moe_experts"), ("etp", self.expert_tp, "moe_ffn_hidden_size")]
        for flag, size, field in checks:
            value = cfg.get(field)
            if value is not None and value % size:
                raise LayoutError(f"--{flag} {size} does not divide {field}={value}")
        if self.ep > 1 and not cfg.get("num_moe_experts"):
            raise LayoutError(f"--ep {self.ep} needs a mixture-of-experts model")
        if cfg.get("num_moe_experts") and cfg.get("add_bias_linear") and self.expert_tp > 1:
            raise LayoutError(f"expert tensor parallel {self.expert_tp}: megatron-core supports experts with biases "
                              "only at ETP 1 (transformer_config.py __post_init__); pass --etp 1")

    def to_args(self) -> dict[str, Any]:
        """The layout as Megatron-LM argument names."""
        return {
            "tensor_model_parallel_size": self.tp,
            "pipeline_model_parallel_size": self.pp,
            "virtual_pipeline_model_parallel_size": self.vpp,
            "decoder_first_pipeline_num_layers": self.pp_first,
            "decoder_last_pipeline_num_layers": self.pp_last,
            "expert_model_parallel_size": self.ep,
            "expert_tensor_parallel_size": self.expert_tp,
        }

    @classmethod
    def from_args(cls, args: Mapping[str, Any]) -> "ParallelLayout":
        return cls(
            tp=int(args.get("tensor_model_parallel_size") or 1),
            pp=int(args.get("pipeline_model_parallel_size") or 1),
            vpp=args.get("virtual_pipeline_model_parallel_size") or None,
            pp_first=args.get("decoder_first_pipeline_num_layers"),
            pp_last=args.get("decoder_last_pipeline_num_layers"),
            ep=int(args.get("expert_model_parallel_size") or 1),
            etp=args.get("expert_tensor_parallel_size"),
        )


#: Megatron-LM's default ``--make-vocab-size-divisible-by``
DEFAULT_VOCAB_DIVISIBLE_BY = 128


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron pads the vocabulary to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return ((vocab_size + multiple - 1) // multiple) * multiple
