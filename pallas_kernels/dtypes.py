"""The storage dtypes of tables and optimizer state, named once for every layer above.

Tables and optimizer state are stored in float32, bfloat16 or float16 (the narrow ones
updated with stochastic rounding); every lookup and update computes in float32. The
command line names them by their short names.
"""

from __future__ import annotations

STORAGE_DTYPES = ("float32", "bfloat16", "float16")

# Short names (`recsys-train --table-dtype bf16`) -> dtype names.
SHORT_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
