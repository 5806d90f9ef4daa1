"""Data engineering: readers, cleaning pipeline (normalize, language, quality, blocklist, PII, dedup, mixing),
reports, and token shards for pretraining. See docs/data.md.

    from lmstack.data.pipeline import run_pipeline      # whole pipeline from a config
    from lmstack.data.shards import write_shards, open_split, read_index
"""
