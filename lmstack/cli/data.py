"""``lmstack data run|merge|clean|dedup|stats|tool-chats|tokenize``: parse arguments, call one library function."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _summary(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"lmstack data -> {report.get('output', '')}")
    for c in ("step", "docs in", "docs out", "chars in", "chars out", "top removal reasons"):
        t.add_column(c, justify="left" if c in ("step", "top removal reasons") else "right")
    for s in report["steps"]:
        reasons = ", ".join(f"{k}={v}" for k, v in list(s["removed"].items())[:3] if v)
        t.add_row(s["name"], f"{s['docs_in']:,}", f"{s['docs_out']:,}", f"{s['chars_in']:,}", f"{s['chars_out']:,}",
                  reasons)
    Console().print(t)
    problems = (report.get("read") or {}).get("problems") or {}
    if problems:  # unreadable paths, binary files, oversized records, malformed lines: never silent
        typer.echo("input problems (skipped; details in report.html): "
                   + ", ".join(f"{k}={v:,}" for k, v in sorted(problems.items())), err=True)


def _done(report: dict, shard: Optional[str], out: Optional[str]) -> None:
    if shard is None:
        _summary(report)
    else:
        typer.echo(f"shard {shard}: {report['documents']:,} documents kept; run the other shards, then "
                   f"`lmstack data merge --out {out or '<out_dir>'}`")


_SHARD = typer.Option(None, "--shard", help="Run only shard i/n; then `lmstack data merge --out DIR`.")
_STRICT = typer.Option(False, "--strict", help="Stop at an unreadable file or directory (else: counted, reported).")


def register(app: typer.Typer) -> None:
    data = typer.Typer(help="Data pipeline: clean, filter, dedup, PII, mix, report, token shards.",
                       no_args_is_help=True)
    app.add_typer(data, name="data")
    _register_augment(data)
    _register_label(data)
    _register_mix(data)

    @data.command("run", context_settings=_EXTRA)
    def run(ctx: typer.Context,
            config: str = typer.Option(..., "--config", "-c", help="Pipeline YAML (see docs/data.md)."),
            out: Optional[str] = typer.Option(None, "--out", "-o", help="Output directory (or out_dir in the YAML)."),
            shard: Optional[str] = typer.Option(None, "--shard", help="Run only shard i/n (then `lmstack data merge`)."),
            strict: bool = _STRICT,
            executor: str = typer.Option("local", "--executor", help="local (process pool) | ray (Ray Data)."),
            ray_address: Optional[str] = typer.Option(None, "--ray-address",
                                                      help="Ray cluster (auto, HOST:6379); default: a local Ray.")
            ) -> None:
        """Run the whole pipeline from a YAML config; extra args `section.key=value` override it."""
        from lmstack.data.pipeline import run_pipeline

        r = run_pipeline(config, out, shard=shard, overrides=[*ctx.args, *(["strict=true"] if strict else [])],
                         executor=executor, ray_address=ray_address)
        _done(r, shard, out)

    @data.command("merge", context_settings=_EXTRA)
    def merge(ctx: typer.Context,
              config: Optional[str] = typer.Option(None, "--config", "-c", help="Default: the shards' config."),
              out: Optional[str] = typer.Option(None, "--out", "-o")) -> None:
        """After `run --shard i/n` for every i: global exact + near dedup, mixing, output and report."""
        from lmstack.data.pipeline import merge_output

        _summary(merge_output(config, out, overrides=ctx.args))

    @data.command("clean", context_settings=_EXTRA)
    def clean(ctx: typer.Context, inputs: List[str] = typer.Argument(..., help="Files, directories or globs."),
              out: str = typer.Option(..., "--out", "-o"), text_field: str = typer.Option("text", "--text-field"),
              lang: str = typer.Option("en,zh", "--lang", help="Languages to keep: comma list of en, zh, other."),
              pii: str = typer.Option("redact", "--pii", help="redact | drop | count | off"),
              no_quality: bool = typer.Option(False, "--no-quality", help="Skip the quality filters."),
              workers: int = typer.Option(0, "--workers", help="Processes (0 = all cores)."),
              shard: Optional[str] = _SHARD, strict: bool = _STRICT) -> None:
        """Normalize, language-filter, quality-filter and redact PII (no dedup)."""
        from lmstack.data.verbs import clean as run_clean

        _done(run_clean(inputs, out, text_field=text_field, languages=[x.strip() for x in lang.split(",") if x],
                        pii=pii, quality=not no_quality, workers=workers, shard=shard, overrides=ctx.args,
                        strict=strict), shard, out)

    @data.command("dedup", context_settings=_EXTRA)
    def dedup(ctx: typer.Context, inputs: List[str] = typer.Argument(...), out: str = typer.Option(..., "--out", "-o"),
              text_field: str = typer.Option("text", "--text-field"),
              threshold: float = typer.Option(0.8, "--threshold", help="Jaccard threshold for near duplicates."),
              num_perm: int = typer.Option(128, "--num-perm"),
              exact_only: bool = typer.Option(False, "--exact-only"),
              workers: int = typer.Option(0, "--workers"), shard: Optional[str] = _SHARD,
              strict: bool = _STRICT) -> None:
        """Exact and MinHash-LSH near dedup only (text unchanged)."""
        from lmstack.data.verbs import dedup as run_dedup

        _done(run_dedup(inputs, out, text_field=text_field, threshold=threshold, num_perm=num_perm,
                        near=not exact_only, workers=workers, shard=shard, overrides=ctx.args, strict=strict),
              shard, out)

    @data.command("stats")
    def stats(inputs: List[str] = typer.Argument(...), text_field: str = typer.Option("text", "--text-field"),
              max_docs: Optional[int] = typer.Option(None, "--max-docs")) -> None:
        """Documents, characters, languages, length percentiles, PII and quality-rule counts (JSON)."""
        from lmstack.data.verbs import stats as run_stats

        typer.echo(json.dumps(run_stats(inputs, text_field=text_field, max_docs=max_docs), indent=2,
                              ensure_ascii=False))

    @data.command("tool-chats")
    def tool_chats_cmd(out: str = typer.Option(..., "--out", "-o", help="Directory: train.jsonl and heldout.jsonl."),
                       n: int = typer.Option(360, "--n", min=1, max=1_000_000, help="Training records."),
                       heldout: int = typer.Option(80, "--heldout", min=0, max=1_000_000,
                                                   help="Held-out records (tools never seen in training)."),
                       zh_share: float = typer.Option(0.35, "--zh-share", min=0.0, max=1.0),
                       mix: str = typer.Option("", "--mix", help="Training kinds' weights over the default, e.g. "
                                               "parallel=0.25,code=0.15 (kinds: single, parallel, none, result, "
                                               "code); the held-out set keeps the default mix."),
                       seed: int = typer.Option(0, "--seed")) -> None:
        """Synthetic tool-use chats (EN + ZH) to teach a chat model to call functions (docs/structured.md)."""
        from pathlib import Path

        from lmstack.data.toolchat import DEFAULT_MIX, KINDS, tool_chats
        from lmstack.utils.io import atomic_write_text

        weights = dict(DEFAULT_MIX)
        for part in filter(None, (p.strip() for p in mix.split(","))):
            kind, _, w = part.partition("=")
            try:
                weights[kind.strip()] = float(w)
            except ValueError:
                raise typer.BadParameter(f"{part!r} is not KIND=WEIGHT (kinds: {', '.join(KINDS)})", param_hint="--mix")
            if kind.strip() not in KINDS or weights[kind.strip()] < 0:
                raise typer.BadParameter(f"{part!r}: the kind must be one of {', '.join(KINDS)} and the weight >= 0",
                                         param_hint="--mix")
        Path(out).mkdir(parents=True, exist_ok=True)
        for name, k, held in (("train", n, False), ("heldout", heldout, True)):
            recs = tool_chats(k, seed=seed, heldout=held, zh_share=zh_share, mix=None if held else weights)
            atomic_write_text(Path(out) / f"{name}.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        typer.echo(f"{out}: train.jsonl ({n:,} records), heldout.jsonl ({heldout:,} records, held-out tools)")

    @data.command("tokenize")
    def tokenize(inputs: List[str] = typer.Argument(...), tokenizer: str = typer.Option(..., "--tokenizer", "-t"),
                 out: str = typer.Option(..., "--out", "-o"), text_field: str = typer.Option("text", "--text-field"),
                 val_fraction: float = typer.Option(0.01, "--val-fraction"),
                 val_documents: Optional[int] = typer.Option(None, "--val-documents"),
                 shard_tokens: int = typer.Option(100_000_000, "--shard-tokens"),
                 seed: int = typer.Option(0, "--seed")) -> None:
        """Write token shards (uint16/uint32 .bin + index.json, EOS after each document, train/val split)."""
        from lmstack.data.verbs import tokenize as run_tokenize

        idx = run_tokenize(inputs, tokenizer, out, text_field=text_field, val_fraction=val_fraction,
                           val_documents=val_documents, shard_tokens=shard_tokens, seed=seed)
        sp = idx["splits"]
        typer.echo(f"{out}: train {sp['train']['tokens']:,} tokens / {sp['train']['documents']:,} docs, "
                   f"val {sp['val']['tokens']:,} tokens / {sp['val']['documents']:,} docs ({idx['dtype']})")


def _register_augment(data: typer.Typer) -> None:
    @data.command("augment")
    def augment(input: str = typer.Argument(..., help="JSON Lines records with a text field (labels are kept)."),
                out: str = typer.Option(..., "--out", "-o", help="Output JSON Lines: originals + augmented copies."),
                text_field: str = typer.Option("text", "--text-field"),
                n_aug: int = typer.Option(4, "--n-aug", help="Candidates per record, before the filters."),
                ops: str = typer.Option("synonym,insert,swap,delete", "--ops",
                                        help="EDA operations, comma list: synonym, insert, swap, delete."),
                alpha: float = typer.Option(0.1, "--alpha", help="Share of words each operation changes."),
                protect: str = typer.Option("", "--protect", help="Comma list of extra words never touched."),
                synonyms_en: Optional[str] = typer.Option(None, "--synonyms-en", help="'a | b | c' lines."),
                synonyms_zh: Optional[str] = typer.Option(None, "--synonyms-zh"),
                only_new: bool = typer.Option(False, "--only-new", help="Write only the augmented copies."),
                seed: int = typer.Option(0, "--seed"),
                method: str = typer.Option("eda", "--method", help="eda | backtranslate (EN->ZH->EN, ZH->EN->ZH)."),
                model: Optional[str] = typer.Option(None, "--model", help="backtranslate: a chat model directory."),
                min_similarity: float = typer.Option(0.4, "--min-similarity",
                                                     help="backtranslate: least chrF (0-1) of the round trip.")
                ) -> None:
        """EDA augmentation (EN + ZH via jieba) with protected numbers/entities/PII placeholders, or back-translation
        with a round-trip similarity filter; dedup and quality filters; prints the report (kept, rejected per filter)."""
        from lmstack.data.augment import AugmentConfig, augment_file
        from lmstack.errors import ConfigError

        words = tuple(x.strip() for x in protect.split(",") if x.strip())
        cfg = AugmentConfig(n_aug=n_aug, ops=tuple(x.strip() for x in ops.split(",") if x.strip()), alpha=alpha,
                            seed=seed, protect=words, synonyms_en=synonyms_en, synonyms_zh=synonyms_zh)
        fn = None
        if method == "backtranslate":
            from lmstack.data.backtranslate import BacktranslateConfig, backtranslate_records
            from lmstack.serve.translate import llm_translator

            if not model:
                raise ConfigError("--method backtranslate needs --model DIR (a chat model that translates EN<->ZH)")
            bcfg = BacktranslateConfig(min_similarity=min_similarity, protect=words)
            translate = llm_translator(model)

            def fn(rows):
                return backtranslate_records(rows, translate, bcfg, text_field)
        elif method != "eda":
            raise ConfigError(f"--method {method!r}: expected eda or backtranslate")
        typer.echo(json.dumps(augment_file(input, out, cfg, text_field=text_field, include_original=not only_new,
                                           method=fn), ensure_ascii=False))


def _register_label(data: typer.Typer) -> None:
    label = typer.Typer(help="Annotation: Label Studio JSON <-> JSONL, pre-label, route the least confident to "
                             "people, merge their labels, agreement (kappa).", no_args_is_help=True)
    data.add_typer(label, name="label")

    @label.command("convert")
    def convert(input: str = typer.Argument(..., help="Label Studio export (.json) or JSONL."),
                out: str = typer.Option(..., "--out", "-o", help=".json writes Label Studio tasks, else JSONL.")) -> None:
        """Convert between Label Studio JSON and the JSONL record schema (lossless both ways)."""
        from lmstack.data.label import read_records, write_records

        recs = read_records(input)
        write_records(recs, out)
        typer.echo(json.dumps({"records": len(recs), "out": out}))

    @label.command("predict")
    def predict(input: str = typer.Argument(...), model: str = typer.Option(
                    ..., "--model", "-m", help="A `lmstack classify train` dir (or a decoder with --prelabel llm)."),
                out: str = typer.Option(..., "--out", "-o"), text_field: str = typer.Option("text", "--text-field"),
                kind: str = typer.Option("classifier", "--prelabel", help="classifier | llm (a prompted decoder)."),
                labels: Optional[str] = typer.Option(None, "--labels", help="llm: the label set, comma-separated."),
                prompt: Optional[str] = typer.Option(None, "--prompt",
                                                     help="llm: prompt with {text} (and {labels}); default: built in.")
                ) -> None:
        """Pre-label every task with a trained classifier or a prompted LLM (predictions with scores, uncertainty)."""
        from lmstack.data.label import prelabel, read_records, write_records
        from lmstack.errors import ConfigError

        if kind not in ("classifier", "llm"):
            raise ConfigError(f"--prelabel {kind!r}: expected classifier or llm")
        if kind == "llm":
            from lmstack.data.llm_label import DEFAULT_PROMPT, check_prompt, prelabel_llm

            names = [x.strip() for x in (labels or "").split(",") if x.strip()]
            check_prompt(prompt or DEFAULT_PROMPT, names)
            recs = prelabel_llm(read_records(input, text_field), model, names, prompt or DEFAULT_PROMPT, text_field)
        elif labels or prompt:
            raise ConfigError("--labels / --prompt are for --prelabel llm (a classifier has its own labels)")
        else:
            recs = prelabel(read_records(input, text_field), model, text_field)
        write_records(recs, out)
        typer.echo(json.dumps({"records": len(recs), "out": out}))

    @label.command("route")
    def route_cmd(input: str = typer.Argument(..., help="Pre-labelled records (`label predict`)."),
                  k: int = typer.Option(..., "--k", help="How many tasks to send to people."),
                  out: str = typer.Option(..., "--out", "-o", help="Tasks for people (.json: Label Studio import)."),
                  strategy: str = typer.Option("least_confidence", "--strategy", help="least_confidence | margin")
                  ) -> None:
        """Active learning by uncertainty: write the k least confident unannotated tasks."""
        from lmstack.data.label import read_records, route, write_records

        picked = route(read_records(input), k, strategy)
        write_records(picked, out)
        typer.echo(json.dumps({"routed": len(picked), "ids": [r["id"] for r in picked], "out": out}))

    @label.command("merge")
    def merge_cmd(input: str = typer.Argument(...), human: List[str] = typer.Option(..., "--human",
                                                                                    help="Annotated exports."),
                  out: str = typer.Option(..., "--out", "-o")) -> None:
        """Merge human annotations back (by task id); label = majority vote; prints counts and agreement."""
        from lmstack.data.label import agreement, merge, read_records, write_records

        recs = read_records(input)
        counts: dict = {}
        for h in human:
            c = merge(recs, read_records(h))
            counts = {**c, "annotations_added": counts.get("annotations_added", 0) + c["annotations_added"],
                      "unknown_ids": counts.get("unknown_ids", 0) + c["unknown_ids"]}
        write_records(recs, out)
        typer.echo(json.dumps({**counts, "agreement": agreement(recs)}, ensure_ascii=False))

    @label.command("agree")
    def agree(input: str = typer.Argument(...)) -> None:
        """Inter-annotator agreement: Cohen's kappa per annotator pair, Fleiss' kappa over items."""
        from lmstack.data.label import agreement, read_records

        typer.echo(json.dumps(agreement(read_records(input)), ensure_ascii=False))


def _register_mix(data: typer.Typer) -> None:
    @data.command("mix")
    def mix(domains: List[str] = typer.Argument(..., help="DOMAIN=PATH (repeat a domain for more paths)."),
            weights: Optional[str] = typer.Option(None, "--weights", help="Explicit weights: web=1,code=2"),
            temperature: Optional[float] = typer.Option(None, "--temperature", help="Temperature sampling T."),
            budget_tokens: Optional[float] = typer.Option(None, "--budget-tokens"),
            chars_per_token: float = typer.Option(4.0, "--chars-per-token"),
            text_field: str = typer.Option("text", "--text-field"),
            plot: Optional[str] = typer.Option(None, "--plot", help="Write a before/after share bar chart (PNG).")
            ) -> None:
        """Per-domain token shares before and after weighting (explicit weights or temperature sampling)."""
        from lmstack.data.mix_report import domain_sizes, mix_report, plot_shares
        from lmstack.errors import ConfigError

        paths: dict = {}
        for d in domains:
            name, sep, p = d.partition("=")
            if not sep or not name or not p:
                raise ConfigError(f"domain {d!r}: expected DOMAIN=PATH")
            paths.setdefault(name, []).append(p)
        w = None
        if weights:
            try:
                w = {k: float(v) for k, v in (x.split("=") for x in weights.split(","))}
            except ValueError:
                raise ConfigError(f"--weights {weights!r}: expected name=number,name=number") from None
        rep = mix_report(domain_sizes(paths, text_field, chars_per_token), weights=w, temperature=temperature,
                         budget_tokens=budget_tokens)
        if plot:
            plot_shares(rep, plot)
        typer.echo(json.dumps(rep, ensure_ascii=False))
