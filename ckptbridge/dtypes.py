"""The torch dtype of each name in `dtype_names` (short ones on command lines and gate files, the long ones
HF configs and mapping files spell)."""

from __future__ import annotations

import torch

from .dtype_names import LONG, SHORT

#: as HF configs and mapping files spell them
LONG_NAMES: dict[str, torch.dtype] = {name: getattr(torch, name) for name in LONG}
#: as ckptbridge's options spell them
SHORT_NAMES: dict[str, torch.dtype] = {short: LONG_NAMES[long] for short, long in SHORT.items()}
#: either
ALL_NAMES: dict[str, torch.dtype] = {**SHORT_NAMES, **LONG_NAMES}
