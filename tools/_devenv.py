"""Import helper for the tools on the GPU machine (an older transformers there).

``import gift_quant`` registers a transformers quantizer (gift_quant.hf); where that
transformers lacks an API it needs, the kernel tools go on without the hook.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:  # gift_quant.load imports no_init_weights from where transformers >= 5.20 keeps it
    import transformers.initialization  # noqa: F401
except ImportError:
    from transformers import modeling_utils

    shim = types.ModuleType("transformers.initialization")
    shim.no_init_weights = modeling_utils.no_init_weights
    sys.modules["transformers.initialization"] = shim

try:
    import gift_quant  # noqa: F401
except ImportError as exc:
    print(
        f"note: gift_quant's transformers hook is unavailable here ({exc}); continuing without it",
        flush=True,
    )
    sys.modules["gift_quant.hf"] = types.ModuleType("gift_quant.hf")
    import gift_quant  # noqa: F401
