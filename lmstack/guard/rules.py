"""Pattern rails: prompt injection / jailbreak phrases (EN + ZH), secrets, toxicity word lists, and the
sanitizer for retrieved passages and tool outputs (indirect injection).

Patterns are written for precision: each needs the *object* of the override ("ignore ... instructions",
"忽略……指令"), so look-alikes such as "ignore the noise, where is my order?" or "忽略之前的话题，我想退货" do not
match (they are in the shipped labelled set, ``data/injection.jsonl``, and the tests). What patterns miss,
the trained classifier (:mod:`lmstack.guard.textcls`) is there for.

Sanitizing follows "spotlighting" (Hines et al. 2024, *Defending Against Indirect Prompt Injection Attacks With
Spotlighting*): instruction-like sentences in untrusted text are cut out, chat-template control tokens are
broken up, and each passage is wrapped in delimiters carrying a per-request random nonce; any delimiter-like
text inside a passage is escaped first, so a passage cannot close its own block or open a fake one.
"""

from __future__ import annotations

import re
import secrets as _secrets
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

DATA_DIR = Path(__file__).with_name("data")


@dataclass(frozen=True)
class Match:
    kind: str  # rule family: "override", "exfiltrate", "persona", "template", "secret:aws", "toxic", ...
    start: int
    end: int
    text: str


def _fold(text: str) -> str:
    """NFKC (full-width letters and punctuation to ASCII) and lower case; same length is NOT guaranteed, so
    rules that return spans run on the original text with re.IGNORECASE instead."""
    return unicodedata.normalize("NFKC", text).lower()


# ---------------------------------------------------------------------------------------------- injection
_EN_OVERRIDE = (
    r"\b(?:ignore|disregard|forget|discard|drop|override|bypass|set aside|skip|abandon|do not follow|don'?t follow)\b"
    r"[^.!?\n]{0,40}?\b(?:instructions?|rules|directions|guidelines|prompts?|policies|policy|programming|"
    r"restrictions|constraints|filters?|safety|system message|training|directives?|orders)\b")
_EN_PATTERNS = [
    ("override", _EN_OVERRIDE),
    ("override", r"\bignore (?:all|everything)\b[^.!?\n]{0,30}\b(?:above|before|previous|prior|said)\b"),
    ("override", r"\b(?:previous|prior|above|earlier|old|original) (?:instructions?|rules|directions|guidelines)\b"
                 r"[^.!?\n]{0,40}\b(?:cancel+ed|void|no longer|suspended|test|superseded|replaced|updated)"),
    ("override", r"\b(?:instructions?|rules|guidelines|restrictions)\b[^.!?\n]{0,20}\b(?:supersede|are suspended|"
                 r"(?:have been|are|were) (?:lifted|removed|updated|cancel+ed|disabled))"),
    ("override", r"\bnew (?:system )?(?:instructions?|rules?|policy|prompt|task|persona)\b\s*(?:[:：]|from management|"
                 r"supersede|are\b|is\b)"),
    ("override", r"\b(?:whatever|everything) you (?:were|have been) told\b"),
    ("exfiltrate", r"\b(?:reveal|print|show|output|repeat|display|dump|tell me|leak|spell|summari[sz]e|what (?:are|were))\b"
                   r"[^.!?\n]{0,50}\b(?:system (?:prompt|message)|initial (?:prompt|instructions)|hidden (?:prompt|"
                   r"instructions|rules)|your (?:instructions|prompt|rules|configuration)|developer message|"
                   r"(?:exact|original) instructions|instructions you (?:were|got))"),
    ("exfiltrate", r"\b(?:system prompt|hidden instructions|initial prompt)\b"),
    ("exfiltrate", r"\brepeat the (?:text|words) above\b|\beverything (?:above|before) [\"'“]"),
    ("persona", r"\b(?:you are|you're|act as|pretend (?:to be|you are|you're)|role-?play as|become|assume the role of)"
                r"\b[^.!?\n]{0,40}\b(?:dan|stan|aim|evil|unrestricted|unfiltered|jailbroken|rogue|no (?:rules|"
                r"restrictions|filters|ethical)|without (?:any )?(?:rules|restrictions|filters|content policy|"
                r"ethical guidelines)|never (?:refuses|says no))\b"),
    ("persona", r"\b(?:do anything now|jailbr(?:oken|eak)|dan mode|developer mode (?:enabled|on)|god mode|"
                r"(?:enter|enable|activate|switch to|in) (?:debug|developer|god|maintenance|unrestricted|admin) mode|"
                r"(?:no|without any) (?:content policy|ethical guidelines)|restrictions (?:are )?(?:lifted|disabled)|"
                r"freed from the (?:typical )?confines|safety training was removed)\b"),
    ("persona", r"\b(?:pretend|imagine|assume)\b[^.!?\n]{0,30}\b(?:content policy|rules|restrictions) (?:does not|doesn't|"
                r"don't|do not) (?:exist|apply)"),
    ("template", r"<\|(?:im_start|im_end|system|user|assistant|endoftext|begin_of_text|start_header_id)\|>|\[/?INST\]|"
                 r"<<SYS>>|^\s*(?:#{2,}|\[)\s*(?:new )?(?:system|admin|instructions?)\b[^\n]{0,20}(?:#{2,}|\])|"
                 r"\[system override\]|^\s*system\s*[:：]|\bBEGIN ADMIN SESSION\b"),
]
_ZH_OBJ = r"(?:指令|指示|规则|设定|提示词|系统提示|准则|约束|规定|政策|程序设定|限制|安全规则|安全政策|要求)"
_ZH_PATTERNS = [
    ("override", r"(?:忽略|无视|忘掉|忘记|不要管|不用管|抛开|丢掉|丢弃|别管|不要遵守|不要遵循|不要理会|覆盖|绕过|解除)"
                 r"[^。！？\n]{0,20}?" + _ZH_OBJ),
    ("override", r"(?:之前|先前|以前|原来)的?(?:所有)?(?:指令|规则|设定|指示)[^。！？\n]{0,15}(?:取消|作废|测试|不再|暂停|失效|不适用)"),
    ("override", r"(?:规则|限制|指令)[^。！？\n]{0,8}(?:已经?被?(?:更新|解除|取消|删除)|暂停生效|优先于)"),
    ("override", r"新的?(?:系统)?(?:指令|规则|规定|政策|提示|任务|人设)\s*[:：]|(?:新的|新)(?:系统)?指令优先"),
    ("override", r"(?:不管|无论)你之前被告知了?什么|忽略(?:这一行以上|以上|上面)的?所有内容|忽略所有指令"),
    ("exfiltrate", r"(?:输出|打印|显示|公开|重复|透露|说出|告诉我|列出|补全)[^。！？\n]{0,25}"
                   r"(?:系统提示|提示词|初始提示|隐藏(?:的)?(?:指令|提示|规则)|开发者消息|你的指令|最初的指令|收到的指令|"
                   r"系统消息)"),
    ("exfiltrate", r"系统提示词?|隐藏的?指令"),
    ("persona", r"(?:你现在是|你是|扮演|假装你?是|作为|新人设)[^。！？\n]{0,20}(?:DAN|越狱|没有(?:任何)?(?:限制|规则|内容政策|道德)|"
                r"无限制|不受(?:任何)?(?:规则|限制)|邪恶|失控|从不(?:拒绝|说不)|没有过滤)"),
    ("persona", r"越狱|(?:进入|开启|切换到|处于)[^。！？\n]{0,4}(?:调试|开发者|上帝|维护|无限制|管理员)模式|已开启开发者模式|"
                r"(?:限制|规则)已(?:经)?(?:全部)?解除|所有限制都已解除|摆脱了AI的|安全训练被删除|内容政策不存在|"
                r"不受任何(?:规则|限制)|没有任何限制地"),
    ("template", r"【系统(?:覆盖|指令)】|###\s*新指令\s*###|^\s*系统\s*[:：]|管理员会话开始"),
]


@lru_cache(maxsize=1)
def _injection_rx() -> list[tuple[str, re.Pattern]]:
    flags = re.IGNORECASE | re.MULTILINE
    return [(k, re.compile(p, flags)) for k, p in _EN_PATTERNS + _ZH_PATTERNS]


def find_injection(text: str) -> list[Match]:
    """Instruction-override, prompt-exfiltration, jailbreak-persona and chat-template patterns in ``text``."""
    folded = unicodedata.normalize("NFKC", text)  # full-width "ｉｇｎｏｒｅ" reads as "ignore"
    same = len(folded) == len(text)
    out = []
    for kind, rx in _injection_rx():
        for m in rx.finditer(folded):
            s, e = (m.start(), m.end()) if same else (0, len(text))
            out.append(Match(kind, s, e, text[s:e]))
    return out


# ---------------------------------------------------------------------------------------------- secrets
_SECRET_PATTERNS = [
    ("secret:openai", r"\bsk-(?:proj-)?[A-Za-z0-9_-]{20,}"),
    ("secret:aws", r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    ("secret:github", r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    ("secret:slack", r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    ("secret:google", r"\bAIza[0-9A-Za-z_-]{35}\b"),
    ("secret:jwt", r"\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"),
    ("secret:private_key", r"-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----"),
    ("secret:password", r"(?i)\b(?:password|passwd|pwd|api[_ -]?key|secret[_ -]?key|access[_ -]?token)\b\s*(?:is|[:=])\s*"
                        r"[\"']?[^\s\"',;]{6,}"),
    ("secret:password", r"(?:密码|口令|密钥|令牌)\s*(?:是|为|[:：=])\s*[^\s，。,;；]{6,}"),
    ("secret:connection", r"\b[a-z][a-z0-9+.-]{1,20}://[^\s:/@]{1,64}:[^\s/@]{3,64}@[^\s/]+"),
]
_SECRET_RX = [(k, re.compile(p)) for k, p in _SECRET_PATTERNS]


def find_secrets(text: str) -> list[Match]:
    """API keys, tokens, private keys, ``password: ...`` and credentials in URLs (non-overlapping, by start)."""
    found = sorted((Match(k, m.start(), m.end(), m.group()) for k, rx in _SECRET_RX for m in rx.finditer(text)),
                   key=lambda m: (m.start, -(m.end - m.start)))
    out: list[Match] = []
    for m in found:
        if not out or m.start >= out[-1].end:
            out.append(m)
    return out


# ---------------------------------------------------------------------------------------------- toxicity
def read_wordlist(path: str | Path) -> list[str]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [w.strip() for w in lines if w.strip() and not w.lstrip().startswith("#")]


@lru_cache(maxsize=8)
def _toxic_rx(extra: tuple[str, ...] = ()) -> re.Pattern:
    en = read_wordlist(DATA_DIR / "toxic_en.txt")
    zh = read_wordlist(DATA_DIR / "toxic_zh.txt")
    words = en + zh + list(extra)
    alts = []
    for w in sorted(set(words), key=len, reverse=True):
        esc = re.escape(w).replace(r"\ ", r"\s+")
        alts.append(rf"(?<![A-Za-z]){esc}(?![A-Za-z])" if w.isascii() else esc)
    return re.compile("|".join(alts), re.IGNORECASE)


def find_toxic(text: str, extra: tuple[str, ...] = ()) -> list[Match]:
    """Word-list hits (English as whole words, Chinese as substrings; the lists are data/toxic_{en,zh}.txt)."""
    return [Match("toxic", m.start(), m.end(), m.group()) for m in _toxic_rx(tuple(extra)).finditer(text)]


# ---------------------------------------------------------------------------------------------- sanitizing
_CONTROL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|<{1,2}/?(?:SYS|s)>{1,2}|\[/?INST\]|<\|?(?:im_start|im_end)\|?>")
_ADDRESSED = re.compile(
    r"(?i)\b(?:note|message|instructions?) (?:to|for) (?:the )?(?:ai|assistant|model|chatbot|llm)\b|"
    r"\b(?:ai|assistant|chatbot|llm|language model)s?\s*(?:[:：]|must|should|shall|are instructed)|"
    r"\bwhen (?:you|the (?:ai|assistant|model)) (?:read|see|process) this\b|\b(?:system|admin(?:istrator)?)\s*[:：]|"
    r"\b(?:system|admin) (?:override|instruction|prompt)\b|\bif you are an? (?:ai|assistant|language model)\b|"
    r"(?:致|给)(?:AI|人工智能|助手|模型)|(?:AI|人工智能|助手|模型)(?:必须|应该|请注意)[^。]{0,6}|当你(?:读到|看到)这"
)
_SENTENCE = re.compile(r"[^.!?。！？\n]+[.!?。！？]*\n?|\n")
DELIM_OPEN, DELIM_CLOSE = "«««", "»»»"
_DELIM_LIKE = re.compile(r"[«»‹›]{2,}")
REMOVED = "[removed: instruction-like text]"


def neutralize_controls(text: str) -> str:
    """Chat-template control tokens broken up with a word joiner (they stay readable, never a control id)."""
    return _CONTROL_TOKEN.sub(lambda m: m.group()[0] + "\u2060" + m.group()[1:], text)


def sanitize_passage(text: str) -> tuple[str, list[Match]]:
    """``text`` with each sentence that reads as an instruction to the model (an injection pattern, or text
    addressed to an AI) replaced by :data:`REMOVED`, control tokens broken up and delimiter-like runs escaped."""
    out, found, pos = [], [], 0
    for m in _SENTENCE.finditer(text):
        sent = m.group()
        hits = find_injection(sent) + [Match("addressed", a.start(), a.end(), a.group()) for a in _ADDRESSED.finditer(sent)]
        hits += [Match("delimiter", d.start(), d.end(), d.group()) for d in _DELIM_LIKE.finditer(sent)]
        if hits:
            found += [Match(h.kind, m.start() + h.start, m.start() + h.end, h.text) for h in hits]
            lead = sent[:len(sent) - len(sent.lstrip())]
            out.append(lead + REMOVED + ("\n" if sent.endswith("\n") else ""))
        else:
            out.append(sent)
        pos = m.end()
    out.append(text[pos:])
    clean = neutralize_controls("".join(out).rstrip(" "))
    clean = _DELIM_LIKE.sub(lambda m: "\u2060".join(m.group()), clean)  # «\u2060« is not the delimiter
    return clean, found


def new_nonce() -> str:
    return _secrets.token_hex(4)


def spotlight(passages: list[str], nonce: str | None = None) -> tuple[str, str]:
    """(text, nonce): sanitized passages, each inside ``«««passage N nonce»»» ... «««/passage N nonce»»»``.
    Tell the model (system prompt) that only text inside blocks carrying this nonce is data, never instructions."""
    nonce = nonce or new_nonce()
    blocks = []
    for i, p in enumerate(passages, 1):
        clean, _ = sanitize_passage(p)
        blocks.append(f"{DELIM_OPEN}passage {i} {nonce}{DELIM_CLOSE}\n{clean}\n{DELIM_OPEN}/passage {i} {nonce}{DELIM_CLOSE}")
    return "\n".join(blocks), nonce


def find_terms(text: str, terms) -> list[str]:
    """The ``terms`` found in ``text`` (case-insensitive): a term with Latin letters or digits must stand as a whole
    word or phrase; a term in Chinese (or other scripts without spaces) matches as a substring."""
    if not terms:
        return []
    low = text.lower()
    out = []
    for t in terms:
        t2 = t.strip().lower()
        if not t2:
            continue
        if re.search(r"[a-z0-9]", t2):
            if re.search(r"(?<![a-z0-9])" + re.escape(t2) + r"(?![a-z0-9])", low):
                out.append(t)
        elif t2 in low:
            out.append(t)
    return out
