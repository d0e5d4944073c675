"""Networks: plain ``nn.Module``s on tensors. Importing this package registers every known model.

Each module below registers its builders on import; to add a family, add its module name to
``_MODEL_MODULES``. A name whose module is not in the tree yet is skipped, any other import error
propagates.
"""

from __future__ import annotations

import importlib

_MODEL_MODULES: tuple[str, ...] = ("lseg", "vlt", "dense_clip_zoo")

for _name in _MODEL_MODULES:
    try:
        importlib.import_module(f"{__name__}.{_name}")
    except ModuleNotFoundError as error:  # only "this module does not exist yet", never a broken import
        if error.name != f"{__name__}.{_name}":
            raise
