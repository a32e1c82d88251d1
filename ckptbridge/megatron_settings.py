"""Where each Megatron setting of a mapping's ``config:`` section lands in megatron-core.

A mapping file translates an HF config into Megatron-LM arguments. Megatron-LM builds its model from
them the way ``core_transformer_config_from_args`` does: every ``TransformerConfig`` field is read
from the argument of the same name, a few fields from differently named or derived arguments, and
the rest of the arguments go to the ``GPTModel`` constructor. ckptbridge's own builder
(:mod:`ckptbridge.mcore.config`) does the same from these tables, so a setting a mapping declares
always reaches megatron; a name megatron-core does not know is refused when the mapping loads
(without importing megatron-core: its field names are data, ``megatron_core_fields.json``, checked
against the installed megatron-core by the tests).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path

from .errors import MappingError
from .megatron_args import to_megatron_lm

FIELDS_FILE = Path(__file__).with_name("megatron_core_fields.json")

#: TransformerConfig field <- (Megatron-LM argument, negated): the renames of core_transformer_config_from_args
RENAMED_FIELDS: dict[str, tuple[str, bool]] = {
    "num_moe_experts": ("num_experts", False),
    "num_layers_in_first_pipeline_stage": ("decoder_first_pipeline_num_layers", False),
    "num_layers_in_last_pipeline_stage": ("decoder_last_pipeline_num_layers", False),
    "persist_layer_norm": ("no_persist_layer_norm", True),
    "pipeline_dtype": ("params_dtype", False),
    "batch_p2p_comm": ("overlap_p2p_comm", True),
    "fp8_param": ("fp8_param_gather", False),
}

#: TransformerConfig fields Megatron-LM computes from other arguments (a mapping sets those arguments)
DERIVED_FIELDS: dict[str, tuple[str, ...]] = {
    "gated_linear_unit": ("swiglu",),
    "activation_func": ("swiglu", "squared_relu", "quick_geglu"),
    "num_query_groups": ("num_query_groups", "group_query_attention"),
}

#: Settings megatron-core reads from the config object with ``getattr`` though ``TransformerConfig`` does not
#: declare them: the YaRN rotary embedding of a non-MLA GPTModel (gpt_model.py:172-189 builds it from them,
#: attention.py applies its mscale when ``yarn_rotary_scaling_factor`` is present). They are set on the
#: config after it is built, as Megatron-Bridge's providers declare them.
CONFIG_ATTRIBUTES: tuple[str, ...] = (
    "yarn_rotary_scaling_factor", "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
    "yarn_mscale", "yarn_mscale_all_dim", "yarn_correction_range_round_to_int",
)

#: Megatron-LM argument -> the GPTModel constructor argument it becomes (Megatron-LM's model provider)
MODEL_ARGS: dict[str, str] = {
    "vocab_size": "vocab_size",  # padded to padded_vocab_size
    "max_position_embeddings": "max_sequence_length",
    "position_embedding_type": "position_embedding_type",
    "rotary_percent": "rotary_percent",
    "rotary_base": "rotary_base",
    "use_rope_scaling": "rope_scaling",
    "rope_scaling_factor": "rope_scaling_factor",
    "rotary_seq_len_interpolation_factor": "seq_len_interpolation_factor",
    "untie_embeddings_and_output_weights": "share_embeddings_and_output_weights",  # negated
}

#: Runtime fields ckptbridge's checking model fixes whatever the args say (CPU, no TransformerEngine,
#: deterministic, no dropout); a mapping cannot set them: they describe a run, not the model.
CHECKING_FIELDS: tuple[str, ...] = (
    "params_dtype", "pipeline_dtype", "bf16", "fp16", "hidden_dropout", "attention_dropout", "use_cpu_initialization",
    "sequence_parallel", "gradient_accumulation_fusion", "masked_softmax_fusion", "bias_dropout_fusion",
    "apply_rope_fusion", "bias_activation_fusion", "persist_layer_norm", "attention_softmax_in_fp32",
    "moe_shared_expert_overlap", "moe_permute_fusion", "cross_entropy_loss_fusion", "tp_comm_overlap",
    "fp8", "fp4", "fp8_param", "cp_comm_type", "cuda_graph_scope",
)


@functools.lru_cache(maxsize=1)
def core_fields() -> dict[str, tuple[str, ...]]:
    """``{"TransformerConfig": names, "MLATransformerConfig": MLA-only names}``."""
    data = json.loads(FIELDS_FILE.read_text())
    return {k: tuple(v) for k, v in data.items() if not k.startswith("_")}


def config_fields(mla: bool) -> tuple[str, ...]:
    """The field names of the config class a model uses."""
    fields = core_fields()
    return fields["TransformerConfig"] + (fields["MLATransformerConfig"] if mla else ())


def check_config_keys(keys: Iterable[str], where: str) -> None:
    """Every key of a mapping's ``config:`` section must reach megatron-core: a ``TransformerConfig``
    (or MLA) field, a Megatron-LM argument Megatron-LM turns into one, or a ``GPTModel`` argument.
    Raises `MappingError` naming the file and the key."""
    fields = set(config_fields(mla=True))
    from_args = {arg: field for field, (arg, _) in RENAMED_FIELDS.items()}
    derived = {arg for args in DERIVED_FIELDS.values() for arg in args}
    for key in keys:
        name = next(iter(to_megatron_lm({key: None})))
        if name in CHECKING_FIELDS:
            raise MappingError(f"{where}: config key {key!r} is a run setting, not the model's (ckptbridge's "
                               "checking model fixes it); remove it")
        if name in RENAMED_FIELDS and RENAMED_FIELDS[name][0] != name:
            raise MappingError(f"{where}: config key {key!r}: Megatron-LM sets this TransformerConfig field from "
                               f"its argument {RENAMED_FIELDS[name][0]!r}; write that instead")
        if name in DERIVED_FIELDS and name not in derived:
            raise MappingError(f"{where}: config key {key!r}: Megatron-LM derives it from {list(DERIVED_FIELDS[name])}; "
                               "write those instead")
        if (name not in fields and name not in from_args and name not in derived and name not in MODEL_ARGS
                and name not in CONFIG_ATTRIBUTES):
            raise MappingError(f"{where}: config key {key!r} is not a megatron-core TransformerConfig field nor a "
                               "Megatron-LM model argument; megatron would never see it")
