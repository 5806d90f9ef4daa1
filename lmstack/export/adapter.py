"""``lmstack export --adapter DIR``: fold a LoRA adapter into its base before writing GGUF or ONNX.

Neither llama.cpp nor onnxruntime-genai runs lmstack's adapter modules, so the exporters see one plain model:
``W' = W + B·A·scaling`` (:func:`lmstack.tune.merge.merge_adapter`, the same code as ``lmstack merge``), written
to a temporary directory beside the output and removed afterwards. The merge runs in float32 whatever the base
dtype, so the exported dtype is the only rounding. The adapter's tokenizer wins when it ships one (as in
``lmstack merge``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from lmstack.errors import CheckpointError


@contextlib.contextmanager
def merged_source(model_dir: str | os.PathLike, adapter: str | os.PathLike | None,
                  out_path: str | os.PathLike) -> Iterator[Path]:
    """Yield ``model_dir`` itself (no adapter), or a temporary merged copy made beside ``out_path``."""
    if adapter is None:
        yield Path(model_dir)
        return
    from lmstack.tune.merge import merge_adapter

    adapter, out = Path(adapter), Path(out_path)
    if not (adapter / "adapter_config.json").is_file():
        raise CheckpointError(f"{adapter}: no adapter_config.json (expected a LoRA adapter directory, PEFT layout)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.merge-", dir=out.parent))
    try:
        yield merge_adapter(model_dir, adapter, tmp / "merged", dtype="float32")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
