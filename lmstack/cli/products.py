"""``lmstack products describe|serve``: the product-description writer (lmstack.apps.products) on its bundle."""

from __future__ import annotations

from typing import Optional

import typer

BUNDLE = typer.Argument(..., help="The products bundle (runs/products/bundle, written by `lmstack run "
                        "recipes/products.yaml`).")


def register(app: typer.Typer) -> None:
    products = typer.Typer(help="Product descriptions from attributes (EN + ZH), with a factuality check.",
                           no_args_is_help=True)
    app.add_typer(products, name="products")

    @products.command("describe")
    def describe(bundle: str = BUNDLE,
                 attrs: Optional[str] = typer.Option(None, "--attrs", help="One product's attributes as JSON: name, "
                                                     "category, material, colour, size, price."),
                 file: Optional[str] = typer.Option(None, "--file", help="A JSONL file of attribute objects (batched)."),
                 lang: str = typer.Option("en", "--lang", help="en or zh.")) -> None:
        """Write descriptions (batched through the engine); each line says whether it states every attribute
        and invents none."""
        import json

        from lmstack.apps.products.writer import DescriptionWriter
        from lmstack.errors import ConfigError, DataError

        if (attrs is None) == (file is None):
            raise ConfigError("give --attrs JSON or --file FILE.jsonl")
        if attrs is not None:
            try:
                items = [json.loads(attrs)]
            except json.JSONDecodeError as e:
                raise DataError(f"--attrs: not JSON ({e.msg})") from None
        else:
            from lmstack.utils.io import iter_jsonl_lines

            bad: list[str] = []
            items = [o for _, o in iter_jsonl_lines(file, lambda i, why: bad.append(f"{file}:{i}: {why}"),
                                                    max_line_bytes=64 << 10)]
            if bad:
                raise DataError(bad[0])
            if len(items) > 10_000:
                raise DataError(f"{file}: {len(items)} products; at most 10,000 per call")
        w = DescriptionWriter.load(bundle)
        for d in w.describe(items, lang=lang):
            f = d.facts
            verdict = "ok" if f["ok"] else "; ".join(
                x for x in (f"missing {', '.join(f['missing'])}" if f["missing"] else "",
                            f"invented {', '.join(f['invented'])}" if f["invented"] else "") if x)
            typer.echo(json.dumps({"description": d.text, "factual": f["ok"], "check": verdict}, ensure_ascii=False))

    @products.command("serve")
    def serve(bundle: str = BUNDLE, host: str = typer.Option("127.0.0.1", "--host"),
              port: int = typer.Option(8000, "--port", min=1, max=65535),
              api_key: Optional[str] = typer.Option(None, "--api-key", envvar="LMSTACK_API_KEY")) -> None:
        """The writer over the OpenAI API (the same engine; web chat at /): send the attribute prompt
        (lmstack.apps.products.catalog.prompt_text) as the user message."""
        from lmstack.apps.bundle import read_bundle
        from lmstack.serve.api import run_server

        b = read_bundle(bundle, app="products")
        run_server(str(b.part("model")), adapter=str(b.part("adapter")) if b.part("adapter") else None, host=host,
                   port=port, api_key=api_key)
