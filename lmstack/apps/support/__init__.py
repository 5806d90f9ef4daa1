"""The Larkspur Home customer-support assistant: a fictional shop's knowledge base, QA data and eval split."""

from lmstack.apps.support.assistant import SupportAssistant
from lmstack.apps.support.dialogues import SYSTEM_PROMPT, build_support_data, qa_items, sample_heldout
from lmstack.apps.support.kb import ShopKB, default_kb_dir, kb_documents, load_kb

__all__ = ["SupportAssistant", "SYSTEM_PROMPT", "build_support_data", "qa_items", "sample_heldout",
           "ShopKB", "default_kb_dir", "kb_documents", "load_kb"]
