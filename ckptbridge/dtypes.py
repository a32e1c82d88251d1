"""The one table of dtype names ckptbridge reads: short ones on command lines and gate files, the
long ones HF configs (``dtype`` / ``torch_dtype``) and mapping files (a rule's ``dtype``) spell."""

from __future__ import annotations

import torch

#: as HF configs and mapping files spell them
LONG_NAMES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
#: as ckptbridge's options spell them
SHORT_NAMES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: either
ALL_NAMES: dict[str, torch.dtype] = {**SHORT_NAMES, **LONG_NAMES}
