"""Seeded synthetic corpora for the dedup tests (distinct documents plus planted near-duplicates)."""

from __future__ import annotations

import random

EN_VOCAB = ("river mountain bread window garden teacher market engine letter silver forest village morning "
            "history journey kitchen library science music ocean paper question reason season signal station "
            "stone story summer system table theory travel valley winter wonder yellow animal bridge camera "
            "castle circle cloud copper desert doctor dragon energy family farmer feather finger flower friend "
            "harbor island jacket ladder lemon machine meadow mirror needle orange palace pencil planet pocket "
            "rabbit rocket saddle shadow shelter spider spring sugar tunnel velvet violin wallet weather whisper").split()
ZH_CHARS = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动同工也能下过子说产种面"
            "而方后多定行学法所民得经十三之进着等部度家电力里如水化高自二理起小物现实加量都两体制机当使点从业本去把性"
            "好应开它合还因由其些然前外天政四日那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第"
            "向道命此变条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总次品式活设及管")


def en_doc(rng: random.Random, n: int = 120) -> str:
    return " ".join(rng.choice(EN_VOCAB) for _ in range(n)) + "."


def zh_doc(rng: random.Random, n: int = 200) -> str:
    return "".join(rng.choice(ZH_CHARS) for _ in range(n)) + "。"


def perturb_en(rng: random.Random, doc: str, frac: float = 0.01) -> str:
    words = doc.split()
    for _ in range(max(1, int(len(words) * frac))):
        words[rng.randrange(len(words))] = rng.choice(EN_VOCAB)
    return " ".join(words)


def perturb_zh(rng: random.Random, doc: str, frac: float = 0.005) -> str:
    chars = list(doc)
    for _ in range(max(1, int(len(chars) * frac))):
        chars[rng.randrange(len(chars) - 1)] = rng.choice(ZH_CHARS)
    return "".join(chars)


def corpus(seed: int = 0, n_en: int = 60, n_zh: int = 40, n_dup_en: int = 20, n_dup_zh: int = 20):
    """(docs, planted) where planted maps a near-duplicate's index to its original's index."""
    rng = random.Random(seed)
    docs = [en_doc(rng) for _ in range(n_en)] + [zh_doc(rng) for _ in range(n_zh)]
    planted = {}
    for k in range(n_dup_en):
        planted[len(docs)] = k
        docs.append(perturb_en(rng, docs[k]))
    for k in range(n_dup_zh):
        planted[len(docs)] = n_en + k
        docs.append(perturb_zh(rng, docs[n_en + k]))
    return docs, planted
