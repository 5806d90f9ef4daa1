"""Small English and Chinese documents of every type ``lmstack rag index`` reads, written by the tests.

PDFs are written by hand (:func:`write_pdf`): one page per list item, English in Helvetica, Chinese in the
standard Adobe CJK font STSong-Light with the predefined ``UniGB-UCS2-H`` encoding (UTF-16 codes, no font file
embedded), which ``pypdf`` maps back to Unicode. .docx files are written with ``python-docx``.
"""

from __future__ import annotations

import json
from pathlib import Path

EN_FACT = "The X200 router supports 512 simultaneous clients."
ZH_FACT = "X200路由器最多支持512个同时连接的设备。"


def _pdf_string(text: str) -> bytes:
    if all(ord(c) < 128 for c in text):
        return b"(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)").encode() + b") Tj"
    return b"<" + text.encode("utf-16-be").hex().upper().encode() + b"> Tj"


def write_pdf(path: str | Path, pages: list[list[str]], title: str = "") -> Path:
    """A PDF with one page per item of ``pages`` (each a list of lines; a blank line separates paragraphs)."""
    objs: list[bytes] = []
    n_pages = len(pages)
    # 1 catalog, 2 pages, 3 Helvetica, 4 Type0 CJK, 5 CIDFont, 6 descriptor, then (page, content) pairs, info
    kids = " ".join(f"{7 + 2 * i} 0 R" for i in range(n_pages))
    objs.append(b"<< /Type /Catalog /Pages 2 0 R >>")
    objs.append(f"<< /Type /Pages /Kids [{kids}] /Count {n_pages} >>".encode())
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>")
    objs.append(b"<< /Type /Font /Subtype /Type0 /BaseFont /STSong-Light /Encoding /UniGB-UCS2-H "
                b"/DescendantFonts [5 0 R] >>")
    objs.append(b"<< /Type /Font /Subtype /CIDFontType0 /BaseFont /STSong-Light /CIDSystemInfo << /Registry (Adobe) "
                b"/Ordering (GB1) /Supplement 2 >> /FontDescriptor 6 0 R /DW 1000 >>")
    objs.append(b"<< /Type /FontDescriptor /FontName /STSong-Light /Flags 6 /FontBBox [-25 -254 1000 880] "
                b"/ItalicAngle 0 /Ascent 880 /Descent -120 /CapHeight 880 /StemV 93 >>")
    for i, lines in enumerate(pages):
        ops = [b"BT", b"14 TL", b"50 780 Td"]
        for line in lines:
            font = b"/F1 11 Tf" if all(ord(c) < 128 for c in line) else b"/F2 11 Tf"
            ops += [font, _pdf_string(line) if line else b"", b"T*"]
        ops.append(b"ET")
        stream = b"\n".join(o for o in ops if o)
        objs.append(f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents {8 + 2 * i} 0 R "
                    "/Resources << /Font << /F1 3 0 R /F2 4 0 R >> >> >>".encode())
        objs.append(b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream")
    objs.append(b"<< /Title " + _pdf_string(title)[:-3] + b" >>" if title else b"<< >>")
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for n, body in enumerate(objs, 1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objs) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += (f"trailer\n<< /Size {len(objs) + 1} /Root 1 0 R /Info {len(objs)} 0 R >>\nstartxref\n{xref}\n%%EOF\n"
            .encode())
    Path(path).write_bytes(bytes(out))
    return Path(path)


def write_docx(path: str | Path, title: str, sections: list[tuple[str, list[str]]]) -> Path:
    import docx

    d = docx.Document()
    d.add_heading(title, level=0)  # the "Title" style
    for heading, paras in sections:
        d.add_heading(heading, level=1)
        for p in paras:
            d.add_paragraph(p)
    d.save(str(path))
    return Path(path)


def write_corpus(root: str | Path) -> dict[str, str]:
    """Every file type in English and Chinese under ``root``; returns {source name: a fact stated in it}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    facts = {}

    def put(name: str, text: str, fact: str) -> None:
        (root / name).write_text(text, encoding="utf-8")
        facts[name] = fact

    put("notes.en.txt", "Support hours are 9 to 5 on weekdays.\n\nThe hotline number is 555-0100.",
        "The hotline number is 555-0100.")
    put("notes.zh.txt", "客服时间为工作日九点到五点。\n\n客服热线是555-0100。", "客服热线是555-0100。")
    put("guide.en.md", "# Router guide\n\n## Setup\n\nPlug it in.\n\n## Limits\n\n" + EN_FACT + "\n", EN_FACT)
    put("guide.zh.md", "# 路由器指南\n\n## 安装\n\n接通电源。\n\n## 限制\n\n" + ZH_FACT + "\n", ZH_FACT)
    nav = "<nav><a href='/'>Home</a> | <a href='/shop'>Shop</a> | <a href='/about'>About us</a></nav>"
    foot = "<footer>Copyright 2026 Example Networks. All rights reserved.</footer>"
    put("warranty.en.html", f"<html><head><title>Warranty</title></head><body>{nav}<article><h1>Warranty</h1>"
        "<p>Every router has a two-year warranty that covers hardware faults.</p><h2>Claims</h2>"
        "<p>Send warranty claims with the order number and a photo of the serial label.</p></article>"
        f"{foot}</body></html>", "Every router has a two-year warranty that covers hardware faults.")
    put("warranty.zh.html", f"<html><head><meta charset='utf-8'><title>保修</title></head><body>{nav}<article>"
        "<h1>保修</h1><p>每台路由器都提供两年保修，涵盖硬件故障。</p><h2>索赔</h2>"
        f"<p>申请保修时请提供订单号和序列号标签的照片。</p></article>{foot}</body></html>",
        "每台路由器都提供两年保修，涵盖硬件故障。")
    write_pdf(root / "manual.en.pdf", [["Quick start", "", "Connect the cable to the WAN port."],
                                       ["Reset", "", "Hold the reset button for ten seconds to restore defaults."]],
              title="Router manual")
    facts["manual.en.pdf"] = "Hold the reset button for ten seconds to restore defaults."
    write_pdf(root / "manual.zh.pdf", [["快速入门", "", "将网线连接到WAN口。"],
                                       ["重置", "", "按住重置按钮十秒钟即可恢复出厂设置。"]])
    facts["manual.zh.pdf"] = "按住重置按钮十秒钟即可恢复出厂设置。"
    write_docx(root / "policy.en.docx", "Return policy",
               [("Returns", ["Items can be returned within 30 days of delivery."]),
                ("Refunds", ["Refunds reach your card within 5 business days."])])
    facts["policy.en.docx"] = "Refunds reach your card within 5 business days."
    write_docx(root / "policy.zh.docx", "退货政策",
               [("退货", ["商品可在签收后30天内退货。"]), ("退款", ["退款将在5个工作日内退回您的银行卡。"])])
    facts["policy.zh.docx"] = "退款将在5个工作日内退回您的银行卡。"
    rows = [{"title": "Firmware", "text": "Firmware updates install automatically at 3 am."},
            {"title": "固件", "text": "固件更新会在凌晨三点自动安装。"}]
    (root / "faq.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    facts["faq.jsonl"] = "Firmware updates install automatically at 3 am."
    (root / "models.csv").write_text("model,ports,price\nX200,4,$89\nX300,8,$129\n", encoding="utf-8")
    facts["models.csv"] = "model: X300; ports: 8; price: $129"
    return facts
