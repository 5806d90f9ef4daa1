"""PII detection/redaction: every planted item is found, checksum look-alikes are left alone.

Reference values are the published examples: Luhn test cards (Visa/Mastercard/Amex test numbers),
the GB 11643-1999 sample ID 11010519491231002X, the ISO 13616 sample IBANs."""

from __future__ import annotations

import pytest

from lmstack.text.pii import KINDS, cn_id_valid, find_pii, iban_valid, luhn_valid, redact

PLANTED = {
    "EMAIL": ["john.doe@example.com", "li_ming+news@mail.example.cn", "a.b-c@sub.domain.org"],
    "PHONE": ["13812345678", "+86 139 1234 5678", "+44 20 7946 0958", "+1 (415) 555-2671", "415-555-2671",
              "0086-150-1234-5678"],
    "IP": ["192.168.1.1", "8.8.8.8", "2001:db8::1", "fe80::1ff:fe23:4567:890a", "2001:0db8:85a3:0000:0000:8a2e:0370:7334"],
    "CREDIT_CARD": ["4111 1111 1111 1111", "5500-0000-0000-0004", "378282246310005", "6011111111111117"],
    "CN_ID": ["11010519491231002X", "440308199901010012"],
    "IBAN": ["GB82 WEST 1234 5698 7654 32", "DE89370400440532013000", "FR1420041010050500013M02606"],
}
LOOKALIKES = [
    "4111 1111 1111 1112",        # Luhn fails
    "378282246310006",            # Luhn fails
    "110105194912310021",         # ID checksum wrong (should be X)
    "110105194913310028",         # month 13
    "GB82 WEST 1234 5698 7654 33",  # IBAN mod 97 wrong
    "1234",                       # short number
    "12:30:45",                   # a time, not IPv6
    "version 1.2.3.4.5",          # not an IPv4 address
    "256.1.1.1",                  # octet out of range
    "user at example dot com",
    "page 2023-2024",
]


def test_reference_checksums():
    assert luhn_valid("4111111111111111") and luhn_valid("79927398713")  # Wikipedia Luhn example
    assert not luhn_valid("79927398710")
    assert cn_id_valid("11010519491231002X") and not cn_id_valid("110105194912310021")
    assert iban_valid("GB82WEST12345698765432") and iban_valid("GB82 WEST 1234 5698 7654 32")
    assert not iban_valid("GB82WEST12345698765433")


def test_planted_items_all_found_with_their_kind():
    for kind, items in PLANTED.items():
        for item in items:
            text = f"Contact: {item}, thanks. 联系方式：{item}。"
            spans = find_pii(text)
            found = [(s.kind, s.text) for s in spans]
            assert found.count((kind, item)) == 2, (item, found)


def test_lookalikes_left_alone():
    for item in LOOKALIKES:
        text = f"Reference {item} in the order."
        assert find_pii(text) == [], (item, find_pii(text))


def test_redact_mixed_document_counts_and_placeholders():
    text = ("Write to anna@example.org or 王先生 13912345678; server 10.0.0.7 (2001:db8::42). "
            "Card 4111-1111-1111-1111, 身份证 11010519491231002X, IBAN DE89 3704 0044 0532 0130 00. "
            "Not a card: 4111 1111 1111 1112.")
    r = redact(text)
    assert r.counts == {"EMAIL": 1, "PHONE": 1, "IP": 2, "CREDIT_CARD": 1, "CN_ID": 1, "IBAN": 1}
    for ph in ("<EMAIL>", "<PHONE>", "<IP_ADDRESS>", "<CREDIT_CARD>", "<CN_ID>", "<IBAN>"):
        assert ph in r.text
    assert "4111 1111 1111 1112" in r.text and "王先生" in r.text
    for s in r.spans:
        assert text[s.start:s.end] == s.text


def test_kinds_subset_and_unknown_kind():
    text = "mail x@example.com ip 1.2.3.4"
    r = redact(text, kinds=["IP"])
    assert r.text == "mail x@example.com ip <IP_ADDRESS>" and r.counts == {"IP": 1}
    with pytest.raises(ValueError, match="unknown PII kind"):
        find_pii(text, kinds=["SSN"])
    assert set(KINDS) == {"EMAIL", "PHONE", "IP", "CREDIT_CARD", "CN_ID", "IBAN"}


def test_no_pii_text_unchanged():
    text = "今天天气很好。The meeting is at 10:30 in room 204, see section 3.2.1."
    r = redact(text)
    assert r.text == text and r.counts == {} and r.spans == []


def test_redaction_is_idempotent_and_digit_free_text_is_clean():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=60, deadline=None)
    @given(st.text(alphabet="abcdefxyzABCDEFGHXYZ .,;-+()[]/\n\t中文电话号码身份证，。！éß", max_size=200))
    def no_pii_without_digits(s):
        assert find_pii(s, kinds=["PHONE", "IP", "CREDIT_CARD", "CN_ID", "IBAN", "EMAIL"]) == []

    @settings(max_examples=60, deadline=None)
    @given(st.lists(st.sampled_from([*sum(PLANTED.values(), []), *LOOKALIKES, " ", "，", "x", "电话", "\n"]),
                    max_size=12))
    def idempotent(parts):
        # items separated by "; " (numbers separated by a bare space can read as one longer phone number)
        once = redact("; ".join(parts)).text
        assert redact(once).text == once

    no_pii_without_digits()
    idempotent()
