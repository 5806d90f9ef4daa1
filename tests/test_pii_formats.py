"""lmstack.text.pii: the formats issue 16 measured as missed (Chinese landlines, 19-digit cards grouped 4-4-4-4-3,
15-digit first-generation resident IDs) and their look-alikes. Checksums here are computed independently of
lmstack (Luhn by digit sums, GB 11643 weights derived as 2^(17-i) mod 11)."""

from __future__ import annotations

import random

import pytest

from lmstack.text.pii import cn_id_valid, find_pii, redact


def _luhn_ok(n: str) -> bool:
    s = 0
    for i, c in enumerate(n[::-1]):
        d = int(c) * (2 if i % 2 else 1)
        s += d // 10 + d % 10
    return s % 10 == 0


def _luhn_complete(prefix: str) -> str:
    return next(prefix + str(d) for d in range(10) if _luhn_ok(prefix + str(d)))


def _found(text: str) -> list[tuple[str, str]]:
    return [(s.kind, s.text) for s in find_pii(text)]


@pytest.mark.parametrize("phone", ["010-62751234", "(0755)8888-1234", "（0755）88881234", "021-6234-5678",
                                   "0571 8765 4321", "+86 10 6275 1234", "020-83456789转801", "(010)6275-1235"])
def test_chinese_landlines(phone):
    for text in (f"电话{phone}，谢谢", f"Call {phone} today."):
        assert _found(text) == [("PHONE", phone)], text


@pytest.mark.parametrize("text", ["订单号 2024-01-15", "SF0106275123456", "v0.10.2", "编号 010-2024-001", "取件码 12-3-4567",
                                  "工单 00123456 已关闭", "Case ID 00123456"])
def test_landline_lookalikes(text):
    assert _found(text) == []


def test_19_digit_cards_in_every_grouping():
    rng = random.Random(0)
    for _ in range(20):
        card = _luhn_complete("62" + "".join(rng.choice("0123456789") for _ in range(16)))
        g = [card[:4], card[4:8], card[8:12], card[12:16], card[16:]]
        for written in (card, " ".join(g), "-".join(g), f"{card[:4]} {card[4:8]} {card[8:12]} {card[12:]}"):
            assert _found(f"卡号{written}。") == [("CREDIT_CARD", written)]
        wrong = card[:-1] + str((int(card[-1]) + 1) % 10)
        assert _found(" ".join([wrong[:4], wrong[4:8], wrong[8:12], wrong[12:16], wrong[16:]])) == []


def test_card_issuer_shape_rules_out_barcodes_and_order_numbers():
    ean = "6901234567892"  # an EAN-13 barcode that happens to pass Luhn
    assert _luhn_ok(ean) and _found(f"商品编码 {ean}") == []
    order = _luhn_complete("01062345678901")  # 15 digits starting with 0: no card starts with 0
    assert _found(f"order {order}") == []
    assert _found("Visa 4222222222222") == [("CREDIT_CARD", "4222222222222")]  # 13 digits: Visa only


def _id15(region: str, yymmdd: str, seq: str) -> str:
    return region + yymmdd + seq


def test_first_generation_15_digit_ids():
    for s in (_id15("110105", "491231", "002"), _id15("440301", "850612", "123"), _id15("650102", "040229", "001")):
        assert cn_id_valid(s) and _found(f"身份证{s}号") == [("CN_ID", s)]
    for bad in (_id15("110105", "491331", "002"),   # month 13
                _id15("990105", "491231", "002"),   # no province 99
                _id15("110105", "010229", "002")):  # 1901-02-29 does not exist
        assert not cn_id_valid(bad) and _found(f"编号 {bad}") == []
    assert _found("Amex 378282246310005") == [("CREDIT_CARD", "378282246310005")]  # a card, not a 37... ID


def test_eighteen_digit_ids_need_a_province_code():
    body = "99010519491231002"
    w = [2 ** (17 - i) % 11 for i in range(17)]
    full = body + "10X98765432"[sum(int(c) * x for c, x in zip(body, w)) % 11]
    assert not cn_id_valid(full)  # checksum right, province 99 does not exist


def test_boundaries_next_to_han_characters():
    assert _found("邮箱是wangli@example.cn，发票") == [("EMAIL", "wangli@example.cn")]
    assert _found("电话415-555-2671吗") == [("PHONE", "415-555-2671")]
    assert _found("Call 415 555 2671 now") == [("PHONE", "415 555 2671")]
    assert _found("build 415 155 2671") == []  # exchange cannot start with 1


def test_redaction_round_trip_of_the_new_kinds():
    card = _luhn_complete("621700123456789012")
    grouped = " ".join([card[:4], card[4:8], card[8:12], card[12:16], card[16:]])
    text = f"卡号 {grouped}，电话 (0755)8888-1234，身份证 110105491231002。"
    r = redact(text)
    assert r.text == "卡号 <CREDIT_CARD>，电话 <PHONE>，身份证 <CN_ID>。"
    assert r.counts == {"CREDIT_CARD": 1, "PHONE": 1, "CN_ID": 1}
    assert redact(r.text).text == r.text
