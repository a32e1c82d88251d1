"""Block-scaled FP8 weights, as DeepSeek-V3/R1, Kimi-K2, Qwen3-*-FP8, GLM-4.5-FP8 and MiniMax-M2 ship them.

A quantized HF weight ``<name>`` is stored as ``float8_e4m3fn`` beside ``<name>_scale_inv``, an fp32
tensor of shape ``ceil(rows / b0) x ceil(cols / b1)`` (``b0 x b1`` = ``weight_block_size``, 128 x 128 on
the hub); edge blocks are partial. The real value of element ``(i, j)`` is
``float(q[i, j]) * scale_inv[i // b0, j // b1]``, computed in fp32 -- what DeepSeek's reference
``weight_dequant`` does before it stores the result in the model dtype.

Megatron-Core holds no FP8 weights, so a source is dequantized on import (a single fp32 rounding,
then the cast to ``--dtype``), and ``--hf-dtype fp8-block`` quantizes on export. The quantizer
is the usual one (scale = block amax / 448, the e4m3 maximum), with one refinement that makes an
FP8 source's round trip byte-exact: among the scales within two fp32 steps of amax / 448 it takes
one that reproduces every fp32 value of the block exactly, when one does (see
docs/fp8-and-ignored-tensors.md for what holds when MCore keeps bf16).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..errors import FormatError, UnsupportedArchitectureError

if TYPE_CHECKING:
    from ..spec import ModelSpec, PlannedTensor

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
SCALE_SUFFIX = "_scale_inv"
#: what scales are stored as: fp32 (DeepSeek, Kimi, and what the export writes); Qwen3's dense FP8
#: releases store bf16, some fp16
SCALE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: the hub's layout, written by ``--hf-dtype fp8-block`` when the model's own config names none
DEFAULT_CONFIG: dict[str, Any] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                  "weight_block_size": [128, 128]}
#: quantization_config fields ckptbridge understands; any other field may change the meaning of the
#: weights, so it is refused rather than ignored
_KNOWN_FIELDS = {"quant_method", "fmt", "activation_scheme", "weight_block_size", "modules_to_not_convert"}
#: candidate scales tried around amax / 448, in fp32 steps (0 first: a fresh quantization takes it)
_STEPS = (0, -1, 1, -2, 2)


@dataclass(frozen=True)
class BlockFP8:
    """The layout one ``quantization_config`` declares: e4m3 weights, fp32 inverse scales per block."""

    block: tuple[int, int]
    config: dict[str, Any]  # the quantization_config as the checkpoint has it (written back on export)

    def scale_shape(self, shape: tuple[int, ...]) -> tuple[int, int]:
        rows, cols = shape
        return math.ceil(rows / self.block[0]), math.ceil(cols / self.block[1])


def scale_name(weight: str) -> str:
    return weight + SCALE_SUFFIX


def parse_quantization(raw_config: Mapping[str, Any], where: str) -> BlockFP8 | None:
    """The FP8 layout ``config.json`` declares, None when it declares no quantization. Anything else
    is refused: converting quantized weights as if they were plain would produce a broken model."""
    qc = raw_config.get("quantization_config")
    if qc is None:
        return None
    if not isinstance(qc, Mapping):
        raise FormatError(f"{where}: quantization_config is a {type(qc).__name__}, not an object")
    method = qc.get("quant_method")
    if method != "fp8":
        raise UnsupportedArchitectureError(
            f"{where}: quantization_config.quant_method {method!r} is not handled (ckptbridge reads block-scaled "
            "'fp8' only); dequantize the checkpoint first")
    unknown = sorted(set(qc) - _KNOWN_FIELDS)
    if unknown:
        raise UnsupportedArchitectureError(f"{where}: quantization_config field(s) {unknown} are not handled")
    if qc.get("fmt", "e4m3") != "e4m3":
        raise UnsupportedArchitectureError(f"{where}: quantization_config.fmt {qc.get('fmt')!r} is not handled (e4m3 only)")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise UnsupportedArchitectureError(
            f"{where}: quantization_config.activation_scheme {qc.get('activation_scheme')!r} is not handled "
            "(static activation scales have no Megatron-Core counterpart)")
    block = qc.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise UnsupportedArchitectureError(
            f"{where}: quantization_config.weight_block_size {block!r} is not two positive integers "
            "(per-tensor FP8 is not handled)")
    return BlockFP8((int(block[0]), int(block[1])), dict(qc))


def check_pair(weight: str, w_dtype: torch.dtype, w_shape: tuple[int, ...], s_dtype: torch.dtype,
               s_shape: tuple[int, ...], fmt: BlockFP8, where: str) -> None:
    """A quantized weight and its scales agree with the declared layout (one clear line if not)."""
    if w_dtype != E4M3 or len(w_shape) != 2:
        raise FormatError(f"{where}: {weight!r} has a {scale_name(weight)!r} but is a {len(w_shape)}-D {w_dtype} "
                          "tensor, not a 2-D float8_e4m3fn one")
    if s_dtype not in SCALE_DTYPES:
        raise FormatError(f"{where}: {scale_name(weight)!r} is {s_dtype}; block scales are float32 (or bfloat16/float16)")
    if tuple(s_shape) != fmt.scale_shape(w_shape):
        raise FormatError(
            f"{where}: {scale_name(weight)!r} has shape {list(s_shape)}, but weight {weight!r} {list(w_shape)} with "
            f"weight_block_size {list(fmt.block)} needs {list(fmt.scale_shape(w_shape))}")


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """fp32 ``q * scale_inv`` per block: one rounding (e4m3 values are exact in fp32). One row of blocks
    at a time, so the only full-size buffer is the result."""
    rows, cols = q.shape
    out = torch.empty(rows, cols, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        part = slice(i * block[0], (i + 1) * block[0])
        out[part] = q[part].float() * scale_inv[i].float().repeat_interleave(block[1])[:cols]
    return out


def _blocks(x: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """``x`` zero-padded to whole blocks, one block per row: ``[blocks, b0 * b1]`` (row-major blocks)."""
    rows, cols = x.shape
    padded = torch.nn.functional.pad(x, (0, -cols % block[1], 0, -rows % block[0]))
    grid = padded.reshape(padded.shape[0] // block[0], block[0], padded.shape[1] // block[1], block[1])
    return grid.permute(0, 2, 1, 3).reshape(-1, block[0] * block[1])


def _unblock(flat: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    grid_r, grid_c = math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1])
    full = flat.reshape(grid_r, grid_c, block[0], block[1]).permute(0, 2, 1, 3)
    return full.reshape(grid_r * block[0], grid_c * block[1])[: shape[0], : shape[1]].contiguous()


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 weights and fp32 inverse scales of ``w`` (2-D). An all-zero block gets scale 1.

    The scale of a block is amax / 448 unless a scale within two fp32 steps of it reproduces every
    value of the block exactly (``float(q) * s == w`` bit for bit): values that came from an FP8
    checkpoint then get their own codes and scale back, whatever rounding the quotient took. Only
    blocks that amax / 448 does not reproduce are tried again."""
    shape = tuple(w.shape)
    blocks = _blocks(w.float(), block)
    amax = blocks.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
    codes = _codes(blocks, scale)
    retry = ((codes.float() * scale[:, None] != blocks).any(dim=1)).nonzero().flatten()
    for step in _STEPS[1:]:
        if not len(retry):
            break
        cand = _step(scale[retry], step)
        sub = blocks[retry]
        q = _codes(sub, cand)
        exact = (q.float() * cand[:, None] == sub).all(dim=1)
        hit = retry[exact]
        scale[hit], codes[hit] = cand[exact], q[exact]
        retry = retry[~exact]
    grid = (math.ceil(shape[0] / block[0]), math.ceil(shape[1] / block[1]))
    return _unblock(codes, shape, block), scale.reshape(grid).contiguous()


def _step(s: torch.Tensor, n: int) -> torch.Tensor:
    toward = torch.full_like(s, math.inf if n > 0 else -math.inf)
    for _ in range(abs(n)):
        s = torch.nextafter(s, toward)
    return s


def _codes(blocks: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (blocks / scale[:, None]).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)


def export_layout(hf_config: Mapping[str, Any]) -> BlockFP8:
    """The layout ``--hf-dtype fp8-block`` writes: the model's own (an FP8 source's, carried inside the
    MCore checkpoint with its HF config), else the hub's 128 x 128."""
    return parse_quantization(hf_config, "config") or BlockFP8((128, 128), dict(DEFAULT_CONFIG))


def _not_converted(module: str, patterns: Sequence[str]) -> bool:
    """transformers' ``modules_to_not_convert`` match: the module itself, or a dotted part of its name."""
    return any(module == p or module.endswith("." + p) or module.startswith(p + ".") or f".{p}." in module
               for p in patterns)


def quantized_names(spec: "ModelSpec", fmt: BlockFP8, planned: Sequence[PlannedTensor]) -> set[str]:
    """HF tensors an FP8 export stores as e4m3 + scales: every 2-D ``*.weight`` of a decoder layer or
    MTP block (what DeepSeek's and Qwen's FP8 checkpoints quantize), except the mapping's ``fp8_keep``
    (routers) and the config's ``modules_to_not_convert``. Global tensors (embedding, head) stay.
    ``planned``: the spec's planned tensors (the source's, planned once)."""
    keep = set(spec.mapping.fp8_keep)
    skip = list(fmt.config.get("modules_to_not_convert") or [])
    out: set[str] = set()
    for pt in planned:
        if pt.rule.place not in ("layer", "mtp"):
            continue
        for template, name, shape in zip(pt.rule.hf, pt.hf_names, pt.hf_shapes):
            if len(shape) == 2 and name.endswith(".weight") and template not in keep \
                    and not _not_converted(name[: -len(".weight")], skip):
                out.add(name)
    return out
