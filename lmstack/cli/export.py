"""``lmstack import`` (GGUF -> model directory), ``lmstack export`` (model directory [+ LoRA adapter] -> GGUF + Ollama
Modelfile, or an ONNX directory),
``lmstack quantize`` (model directory -> int8 / int4 model directory)."""

from __future__ import annotations

from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("import")
    def import_(
        gguf: str = typer.Option(..., "--gguf", help="A GGUF file (llama, qwen2, qwen3, mistral; any tensor type)."),
        out: str = typer.Option(..., "--out", help="Model directory to write (Hugging Face layout)."),
        dtype: str = typer.Option("float32", "--dtype", help="float32, bfloat16 or float16 weights."),
    ) -> None:
        """Dequantize a GGUF file into a model directory with its tokenizer and chat template."""
        from lmstack.export.gguf_import import import_gguf

        typer.echo(f"wrote {import_gguf(gguf, out, dtype=dtype)}")

    @app.command("export")
    def export(
        model: str = typer.Option(..., "--model", "-m", help="Model directory (Hugging Face layout, with tokenizer)."),
        out: str = typer.Option(..., "--out", help="gguf: output file (model.q8_0.gguf); onnx: output directory."),
        fmt: str = typer.Option("gguf", "--format", help="gguf (llama.cpp / Ollama) or onnx (onnxruntime)."),
        dtype: Optional[str] = typer.Option(None, "--dtype",
                                            help="gguf: f32, f16 (default), q8_0, q4_0; onnx: f32 (default), f16, "
                                                 "int8, int4 (MatMulNBits with lmstack's quantized weights)."),
        adapter: Optional[str] = typer.Option(None, "--adapter", help="LoRA adapter directory to merge in first."),
        name: Optional[str] = typer.Option(None, "--name", help="gguf: general.name (default: directory name)."),
        group_size: int = typer.Option(32, "--group-size",
                                       help="onnx --dtype int4 of a float model: weights per int4 group."),
    ) -> None:
        """Write MODEL as one GGUF file (+ an Ollama Modelfile) or as an ONNX directory with a KV-cache interface."""
        from lmstack.errors import ConfigError

        if fmt == "gguf":
            from lmstack.export.gguf_export import export_gguf

            path = export_gguf(model, out, dtype=dtype or "f16", name=name, adapter=adapter)
            typer.echo(f"wrote {path} and {path.with_suffix('.Modelfile')}")
        elif fmt == "onnx":
            from lmstack.export.onnx_export import export_onnx

            if name is not None:
                raise ConfigError("--name applies to --format gguf only")
            typer.echo(f"wrote {export_onnx(model, out, dtype=dtype or 'f32', adapter=adapter, group_size=group_size)}")
        else:
            raise ConfigError(f"--format {fmt!r} is not supported; supported: gguf, onnx")

    @app.command("quantize")
    def quantize(
        model: str = typer.Option(..., "--model", "-m", help="Float model directory."),
        out: str = typer.Option(..., "--out", help="Quantized model directory to write."),
        method: str = typer.Option("int8", "--method",
                                   help="int8 (per channel), int4 (group-wise, round to nearest), gptq or awq (int4, calibrated)."),
        group_size: int = typer.Option(64, "--group-size", help="int4 / gptq / awq group size: 32, 64, 128 or 256."),
        calib: Optional[str] = typer.Option(None, "--calib", help="gptq / awq: calibration text file."),
        lm_head: str = typer.Option("int8", "--lm-head", help="int8 (per channel; a tied embedding stays float) or fp32."),
        awq_clip: bool = typer.Option(True, "--awq-clip/--no-awq-clip",
                                      help="awq: search a clipping range per group after scaling (AWQ's auto_clip)."),
    ) -> None:
        """Weight-only quantization of every linear layer (lm_head int8 unless --lm-head fp32; embeddings stay float)."""
        from lmstack.quant.checkpoint import quantize_checkpoint

        path = quantize_checkpoint(model, out, method=method, group_size=group_size, calib=calib, lm_head=lm_head,
                                   awq_clip=awq_clip)
        typer.echo(f"wrote {path}")
