"""Model exchange: GGUF in (``import_gguf``) and out (``export_gguf``), for llama.cpp, Ollama and LM Studio."""

from lmstack.export.gguf_export import GGUF_DTYPES, export_gguf, ollama_modelfile
from lmstack.export.gguf_import import import_gguf, resolve_model_path

__all__ = ["GGUF_DTYPES", "export_gguf", "import_gguf", "ollama_modelfile", "resolve_model_path"]
