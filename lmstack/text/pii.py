"""Find and redact personally identifiable information (PII) in text.

Kinds and placeholders::

    EMAIL        <EMAIL>        RFC-5322-ish local@domain.tld
    PHONE        <PHONE>        Chinese mobile (1[3-9]xxxxxxxxx, optional +86), Chinese landline (area code 010,
                                02x or 0xxx + 7-8 digit number: 010-62751234, (0755)8888-1234, +86 10 6275 1234),
                                international (+CC ...), NANP
    IP           <IP_ADDRESS>   IPv4 (each octet 0-255) and IPv6 (validated by :mod:`ipaddress`)
    CREDIT_CARD  <CREDIT_CARD>  13-19 digits written together, or in groups of four with a shorter last group
                                (4-4-4-4, 4-4-4-4-3, 4-4-4-7 ...) or Amex / Diners 4-6-5 / 4-6-4, one separator
                                (space or dash) throughout; Luhn-checked
    CN_ID        <CN_ID>        PRC resident ID: 18 characters (province code, valid birth date, ISO 7064
                                MOD 11-2 check character) or the first-generation 15 digits (province code,
                                valid 19YYMMDD birth date; no check digit, so a 15-digit number that is a
                                Luhn-valid Amex card 34/37... is a card)
    IBAN         <IBAN>         ISO 13616: country, check digits, BBAN; ISO 7064 MOD 97-10 == 1

Checksummed kinds (card, ID, IBAN) are only reported when the checksum holds, so look-alikes such as
order numbers are left alone. Spans never overlap: when two candidates overlap, the more specific kind wins
(order: CN_ID, CREDIT_CARD, IBAN, EMAIL, IP, PHONE), then the longer span.

References: Luhn (ISO/IEC 7812-1), GB 11643-1999 (resident ID), GB/T 2260 (province codes), ISO 13616 (IBAN), RFC 4291 (IPv6).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from datetime import date

KINDS = ("EMAIL", "PHONE", "IP", "CREDIT_CARD", "CN_ID", "IBAN")
PLACEHOLDERS = {
    "EMAIL": "<EMAIL>", "PHONE": "<PHONE>", "IP": "<IP_ADDRESS>",
    "CREDIT_CARD": "<CREDIT_CARD>", "CN_ID": "<CN_ID>", "IBAN": "<IBAN>",
}
_PRIORITY = {"CN_ID": 0, "CREDIT_CARD": 1, "IBAN": 2, "EMAIL": 3, "IP": 4, "PHONE": 5}


@dataclass(frozen=True)
class PIISpan:
    kind: str
    start: int
    end: int
    text: str


@dataclass
class RedactResult:
    text: str
    counts: dict[str, int] = field(default_factory=dict)
    spans: list[PIISpan] = field(default_factory=list)


# ---- patterns ----------------------------------------------------------------------------------------
# Boundaries are ASCII classes, not \w: in Python \w matches Han characters, and "邮箱是a@b.cn，" must match.
_EMAIL = re.compile(
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9](?:[A-Za-z0-9._%+-]{0,63})@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"[A-Za-z]{2,24}(?![A-Za-z0-9-])"
)
_CN_MOBILE = re.compile(r"(?<![\d+])(?:(?:\+|00)?86[\s-]?)?1[3-9]\d(?:[\s-]?\d{4}){2}(?!\d)")
# Chinese landline: area code 010 / 02x / 0[3-9]xx (written 0xxx-, (0xxx), （0xxx）, or after +86 / 0086 without
# its 0), then a 7-8 digit number that does not start with 0 or 1 (optionally 3-4 / 4-4 grouped), then an
# optional extension (-801, 转801). Not preceded by a letter or digit (tracking numbers such as SF0106...) and not
# one part of a longer run of digit groups (the middle of a grouped card or account number).
_AREA = r"(?:10|2\d|[3-9]\d{2})"
_CN_LANDLINE = re.compile(
    r"(?<![A-Za-z\d+])(?<!\d[ -])(?:(?:\+|00)86[\s-]?(?:\(0\))?" + _AREA + r"[\s-]?|[(（]0" + _AREA + r"[)）][\s-]?|0"
    + _AREA + r"[\s-]?)[2-9]\d{2,3}[\s-]?\d{4}(?:(?:-|转|ext\.?\s?|x)\d{1,5})?(?![\d-]|\s\d)")
_INTL_PHONE = re.compile(r"(?<![A-Za-z0-9_+])(?:\+|00)[1-9]\d{0,2}(?:[\s.-]?\(?\d{1,4}\)?){2,5}(?![\d])")
# NANP: area code and exchange start with 2-9 (N11 area codes excluded); 415-555-2671, 415.555.2671,
# (415) 555-2671, 415 555 2671 (one separator throughout)
_NANP = re.compile(r"(?<![A-Za-z0-9_-])(?:\([2-9](?!11)\d{2}\)\s?[2-9]\d{2}-|[2-9](?!11)\d{2}([-. ])[2-9]\d{2}\1)"
                   r"\d{4}(?![A-Za-z0-9_-])")
_IPV4 = re.compile(r"(?<![\d.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)(?![\d]|\.\d)")
_IPV6_CAND = re.compile(r"(?<![0-9A-Fa-f:.])[0-9A-Fa-f:]*:[0-9A-Fa-f:]*:[0-9A-Fa-f:.]*(?:%\w+)?(?![0-9A-Fa-f:])")
# contiguous 13-19 digits; groups of four with a last group of 1-7 (4-4-4-1..7, 4-4-4-4-1..3: UnionPay's 19-digit
# 4-4-4-4-3); or Amex / Diners 4-6-5 / 4-6-4 (one separator, space or dash, throughout). Length 13-19 is checked
# on the digits.
_CARD = re.compile(r"(?<![\d+-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}(?:\1\d{4}\1\d{1,3}|\1\d{1,7})"
                   r"|\d{4}([ -])\d{6}\2\d{4,5})(?!\d|-\d)")
_CN_ID = re.compile(r"(?<![\dA-Za-z])[1-9]\d{16}[\dXx](?![\dA-Za-z])")
_CN_ID15 = re.compile(r"(?<![\dA-Za-z])[1-9]\d{14}(?![\dA-Za-z])")
# GB/T 2260 province-level codes (the first two digits of every resident ID)
_PROVINCES = frozenset({11, 12, 13, 14, 15, 21, 22, 23, 31, 32, 33, 34, 35, 36, 37, 41, 42, 43, 44, 45, 46, 50,
                        51, 52, 53, 54, 61, 62, 63, 64, 65, 71, 81, 82, 83, 91})
_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}(?![A-Za-z0-9])")


# ---- checksums ---------------------------------------------------------------------------------------
def luhn_valid(digits: str) -> bool:
    """Luhn mod-10 check on a digit string."""
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2 == 1:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


_CN_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
_CN_ID_CHECK = "10X98765432"


def cn_id_valid(s: str) -> bool:
    """GB 11643-1999: a province code, a valid birth date and the MOD 11-2 check character (18 characters), or a
    first-generation 15-digit number (province code and a valid 19YYMMDD birth date; it has no check digit)."""
    s = s.upper()
    if len(s) == 15 and s.isdigit():
        if int(s[:2]) not in _PROVINCES:
            return False
        try:
            date(1900 + int(s[6:8]), int(s[8:10]), int(s[10:12]))
        except ValueError:
            return False
        return True
    if len(s) != 18 or not s[:17].isdigit() or int(s[:2]) not in _PROVINCES:
        return False
    try:
        born = date(int(s[6:10]), int(s[10:12]), int(s[12:14]))
    except ValueError:
        return False
    if not (1880 <= born.year <= 2100):
        return False
    total = sum(int(c) * w for c, w in zip(s[:17], _CN_ID_WEIGHTS))
    return _CN_ID_CHECK[total % 11] == s[17]


def iban_valid(s: str) -> bool:
    """ISO 13616: move the first four characters to the end, letters -> 10..35, mod 97 == 1."""
    s = s.replace(" ", "").upper()
    if not (15 <= len(s) <= 34) or not s[:2].isalpha() or not s[2:4].isdigit():
        return False
    moved = s[4:] + s[:4]
    num = "".join(str(int(c, 36)) for c in moved)
    return int(num) % 97 == 1


def _iban_end(cand: str) -> int:
    """Length of the longest valid IBAN that is a prefix of ``cand`` ending at a space or at its end (0: none).
    The pattern is greedy ("GB82 WEST ... 32 13812345678" runs into the next number), so cut back."""
    cuts = [k for k in range(len(cand), 0, -1) if k == len(cand) or cand[k] == " "]
    for k in cuts:
        if iban_valid(cand[:k].rstrip()):
            return len(cand[:k].rstrip())
    return 0


def _card_shape(d: str) -> bool:
    """Length and issuer prefix of a payment card (ISO/IEC 7812 major industry identifier 2-6: banking, travel,
    merchandising): 13 digits only for Visa (4...), 14-19 for the rest. Rules out EAN-13 barcodes (69...), order
    numbers starting with 0, 1, 7, 8, 9 that pass Luhn by chance (one in ten does)."""
    return 13 <= len(d) <= 19 and d[0] in "23456" and (len(d) > 13 or d[0] == "4")


def _digits(s: str) -> str:
    return "".join(c for c in s if c.isdigit())


# ---- finders -----------------------------------------------------------------------------------------
# Speed: the kind patterns start with look-behinds, which defeat the regex engine's fast prefix scan, so
# they run only inside small windows around the rare places that can hold PII: runs of digits (phones, cards,
# IDs, IPv4), '@' (email) and hex-colon groups (IPv6). Look-behinds still see the text before a window.
_DIGIT_RUN = re.compile(r"\d(?:[\d .()+\-]*\d)?")
_IPV6_GATE = re.compile(r"[0-9A-Fa-f]{0,4}:[0-9A-Fa-f]{0,4}:")
_IBAN_GATE = re.compile(r"[A-Z]{2}\d{2}")


def _windows(spans, n: int) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for s, e in spans:
        s, e = max(0, s), min(n, e)
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return [(s, e) for s, e in out]


def _candidates(text: str, kinds: set[str]):
    n = len(text)
    if "EMAIL" in kinds and "@" in text:
        ats, k = [], text.find("@")
        while k >= 0:
            ats.append((k - 70, k + 260))
            k = text.find("@", k + 1)
        for ws, we in _windows(ats, n):
            for m in _EMAIL.finditer(text, ws, we):
                yield "EMAIL", m.start(), m.end()
    digit_kinds = kinds & {"CN_ID", "CREDIT_CARD", "IP", "PHONE"}
    wins = _windows(((m.start() - 5, m.end() + 3) for m in _DIGIT_RUN.finditer(text)), n) if digit_kinds else []
    for ws, we in wins:
        if "CN_ID" in kinds:
            for m in _CN_ID.finditer(text, ws, we):
                if cn_id_valid(m.group()):
                    yield "CN_ID", m.start(), m.end()
            for m in _CN_ID15.finditer(text, ws, we):
                d = m.group()
                if cn_id_valid(d) and not (d[:2] in ("34", "37") and luhn_valid(d)):  # an Amex number is a card
                    yield "CN_ID", m.start(), m.end()
        if "CREDIT_CARD" in kinds:
            for m in _CARD.finditer(text, ws, we):
                d = _digits(m.group())
                if _card_shape(d) and luhn_valid(d) and len(set(d)) > 1:
                    yield "CREDIT_CARD", m.start(), m.end()
        if "IP" in kinds:
            for m in _IPV4.finditer(text, ws, we):
                yield "IP", m.start(), m.end()
        if "PHONE" in kinds:
            for rx in (_CN_MOBILE, _CN_LANDLINE, _INTL_PHONE, _NANP):
                for m in rx.finditer(text, ws, we):
                    d = _digits(m.group())
                    if 7 <= len(d) <= 15 and not (m.group().startswith("00") and len(d) < 11):
                        # "00" + country code + number: at least 9 digits after 00 ("case 00123456" is not a phone)
                        yield "PHONE", m.start(), m.end()
    if "IBAN" in kinds and _IBAN_GATE.search(text):
        for m in _IBAN.finditer(text):
            end = _iban_end(m.group())
            if end:
                yield "IBAN", m.start(), m.start() + end
    if "IP" in kinds and ":" in text and _IPV6_GATE.search(text):
        for m in _IPV6_CAND.finditer(text):
            cand = m.group().rstrip(".")
            if cand.count(":") < 2 or not any(c not in ":." for c in cand):
                continue
            try:
                ipaddress.IPv6Address(cand.split("%")[0])
            except ValueError:
                continue
            yield "IP", m.start(), m.start() + len(cand)


def check_kinds(kinds: list[str] | tuple[str, ...] | set[str] | None) -> list[str] | None:
    """``kinds`` upper-cased (None stays None: every kind); ValueError naming any that is not in :data:`KINDS`
    (the one check behind find_pii and the configs that name kinds)."""
    if kinds is None:
        return None
    out = [k.upper() for k in kinds]
    bad = sorted(set(out) - set(KINDS))
    if bad:
        raise ValueError(f"unknown PII kinds {bad}; known: {', '.join(KINDS)}")
    return out


def find_pii(text: str, kinds: list[str] | tuple[str, ...] | set[str] | None = None) -> list[PIISpan]:
    """All non-overlapping PII spans in ``text``, sorted by start. ``kinds``: subset of :data:`KINDS`."""
    want = set(KINDS) if kinds is None else set(check_kinds(kinds))
    cands = sorted(_candidates(text, want), key=lambda c: (_PRIORITY[c[0]], -(c[2] - c[1]), c[1]))
    taken: list[tuple[int, int]] = []
    out: list[PIISpan] = []
    for kind, s, e in cands:
        if any(s < te and ts < e for ts, te in taken):
            continue
        taken.append((s, e))
        out.append(PIISpan(kind, s, e, text[s:e]))
    out.sort(key=lambda p: p.start)
    return out


def redact(text: str, kinds: list[str] | tuple[str, ...] | set[str] | None = None) -> RedactResult:
    """Replace each PII span by its typed placeholder (``<EMAIL>``, ...); counts per kind."""
    spans = find_pii(text, kinds)
    if not spans:
        return RedactResult(text, {}, [])
    parts, pos, counts = [], 0, {}
    for sp in spans:
        parts.append(text[pos:sp.start])
        parts.append(PLACEHOLDERS[sp.kind])
        pos = sp.end
        counts[sp.kind] = counts.get(sp.kind, 0) + 1
    parts.append(text[pos:])
    return RedactResult("".join(parts), counts, spans)


# ---- reversible placeholders -------------------------------------------------------------------------
_NUMBERED = re.compile(r"<(" + "|".join(sorted({v[1:-1] for v in PLACEHOLDERS.values()}, key=len, reverse=True))
                       + r")_(\d{1,6})>")


def pseudonymize(text: str, kinds: list[str] | tuple[str, ...] | set[str] | None = None,
                 mapping: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """Replace each PII span by a numbered placeholder (``<EMAIL_1>``, ``<PHONE_2>`` ...) and return the text with
    the mapping placeholder -> original value, so :func:`restore` can put the values back (in a model's answer
    that needs them). The same value gets the same placeholder; pass ``mapping`` to continue numbering across
    texts (the turns of one conversation)."""
    mapping = {} if mapping is None else mapping
    by_value = {v: k for k, v in mapping.items()}
    counts: dict[str, int] = {}
    for ph in mapping:
        m = _NUMBERED.fullmatch(ph)
        if m:
            counts[m.group(1)] = max(counts.get(m.group(1), 0), int(m.group(2)))
    parts, pos = [], 0
    for sp in find_pii(text, kinds):
        ph = by_value.get(sp.text)
        if ph is None:
            base = PLACEHOLDERS[sp.kind][1:-1]
            counts[base] = counts.get(base, 0) + 1
            ph = f"<{base}_{counts[base]}>"
            mapping[ph], by_value[sp.text] = sp.text, ph
        parts += [text[pos:sp.start], ph]
        pos = sp.end
    parts.append(text[pos:])
    return "".join(parts), mapping


def restore(text: str, mapping: dict[str, str]) -> str:
    """``text`` with the numbered placeholders of ``mapping`` replaced by their values (others left as they are)."""
    if not mapping or "<" not in text:
        return text
    return _NUMBERED.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)


def placeholder_cut(text: str) -> int:
    """Where ``text`` may be cut without splitting a numbered placeholder at its end (``len(text)`` when none is
    open): a stream releases up to here, so the client never gets half of ``<EMAIL_1>``."""
    k = text.rfind("<", max(0, len(text) - 24))
    if k >= 0 and ">" not in text[k:] and re.fullmatch(r"<[A-Z_]*\d*", text[k:]):
        return k
    return len(text)
