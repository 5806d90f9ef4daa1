"""Model exchange: GGUF in (``import_gguf``) and out (``export_gguf``), for llama.cpp, Ollama and LM Studio."""

from lmstack.export.gguf_import import import_gguf, resolve_model_path

__all__ = ["import_gguf", "resolve_model_path"]
