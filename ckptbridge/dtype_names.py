"""The one table of dtype names ckptbridge reads, without torch: short ones on command lines and gate
files, the long ones HF configs (``dtype`` / ``torch_dtype``) and mapping files (a rule's ``dtype``)
spell. Torch-free so that the command line can offer them (``--help``, option checks) before, or
without, importing torch; `dtypes` gives the torch dtype of each."""

from __future__ import annotations

#: as HF configs and mapping files spell them (also torch's attribute names)
LONG: tuple[str, ...] = ("float32", "bfloat16", "float16")
#: as ckptbridge's options spell them -> the long name
SHORT: dict[str, str] = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: either
ALL: tuple[str, ...] = (*SHORT, *LONG)
