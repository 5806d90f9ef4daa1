"""Cheap script- and stop-word-based language identification: ``zh``, ``en`` or ``other``.

No model file is needed (nothing can be downloaded at run time). The rules:

* ``zh``: Han characters make up at least ``zh_min`` of the letters, and there is little kana (Japanese) or
  Hangul (Korean). Score = Han share of letters.
* ``en``: Latin letters dominate, and English function words are frequent compared with those of other
  Latin-script languages (French, German, Spanish, Italian, Portuguese, Dutch). Score = English stop-word hits
  over all stop-word hits, scaled by the Latin share.
* everything else, including texts with too few letters to judge: ``other``.

This is the approach of CLD-style script detection plus a stop-word vote (as in the ``langdetect`` /
FineWeb "stop-word presence" heuristics); it is reliable for zh vs en vs other on paragraph-length text and
weak on single short sentences. For more languages, plug in fastText ``lid.176`` upstream.
"""

from __future__ import annotations

import re

EN_STOP = frozenset(
    "the be to of and a in that have i it for not on with he as you do at this but his by from they we say her "
    "she or an will my one all would there their what so up out if about who get which go me when make can like "
    "time no just him know take people into year your good some could them see other than then now look only "
    "come its over think also back after use two how our work first well way even new want because any these "
    "give day most us is are was were has had been".split()
)
_OTHER_STOP = frozenset(
    # fr
    "le la les des est et une un du dans pour que qui pas sur au avec ce sont il elle nous vous ils par plus "
    # de
    "der die das und ist nicht ein eine zu den von mit sich auf für dem des im auch es wird sind "
    # es / pt / it
    "el los las y en por con una es lo como pero del para su al se muy não os uma em da do das dos são é "
    "il di che non della per gli sono anche alla nella "
    # nl
    "het een van en de dat op te niet zijn voor met wordt ook".split()
) - EN_STOP

_WORD = re.compile(r"[A-Za-z\u00C0-\u024F']+")


def _is_han(cp: int) -> bool:
    return 0x4E00 <= cp <= 0x9FFF or 0x3400 <= cp <= 0x4DBF or 0x20000 <= cp <= 0x2A6DF or 0xF900 <= cp <= 0xFAFF


HAN_RE = re.compile("[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002a6df]")
_KANA = re.compile("[\u3040-\u30ff]")
_HANGUL = re.compile("[\uac00-\ud7af\u1100-\u11ff]")
_LATIN = re.compile("[A-Za-z\u00c0-\u024f]")
_LETTER = re.compile(r"[^\W\d_]")
SAMPLE_CHARS = 3000


def count_matches(rx: re.Pattern, text: str) -> int:
    """Characters of ``text`` matched by the one-character class ``rx`` (sub is much faster than findall)."""
    return len(text) - len(rx.sub("", text))


def script_counts(text: str) -> dict[str, int]:
    """Letters per script: han, kana, hangul, latin, other (non-letters are not counted)."""
    latin = count_matches(_LATIN, text)
    if text.isascii():
        return {"han": 0, "kana": 0, "hangul": 0, "latin": latin, "other": 0}
    han = count_matches(HAN_RE, text)
    kana = count_matches(_KANA, text)
    hangul = count_matches(_HANGUL, text)
    letters = count_matches(_LETTER, text)
    other = max(0, letters - han - kana - hangul - latin)
    return {"han": han, "kana": kana, "hangul": hangul, "latin": latin, "other": other}


def detect_language(text: str, zh_min: float = 0.3, min_letters: int = 10) -> tuple[str, float]:
    """Return ``(lang, score)`` with lang in ``{"zh", "en", "other"}`` and score in [0, 1]."""
    sample = text[:SAMPLE_CHARS]
    c = script_counts(sample)
    letters = sum(c.values())
    if letters < min_letters:
        return "other", 0.0
    han_share = c["han"] / letters
    if han_share >= zh_min and c["kana"] < 0.05 * letters and c["hangul"] < 0.05 * letters:
        return "zh", round(min(1.0, han_share / max(han_share + c["latin"] / letters * 0.5, 1e-9)), 4)
    latin_share = c["latin"] / letters
    if latin_share < 0.5:
        return "other", round(1.0 - latin_share, 4)
    words = [w.lower() for w in _WORD.findall(sample)]
    if not words:
        return "other", 0.0
    en = sum(map(EN_STOP.__contains__, words))
    oth = sum(map(_OTHER_STOP.__contains__, words))
    if en == 0:
        return "other", round(latin_share, 4)
    # a stop-word vote: English text has many English function words and few foreign ones
    share = en / (en + oth)
    density = en / len(words)
    if share >= 0.6 and (density >= 0.08 or len(words) < 12):
        return "en", round(share * latin_share, 4)
    return "other", round(1.0 - share * latin_share, 4)
