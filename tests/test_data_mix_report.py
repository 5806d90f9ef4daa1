"""lmstack data mix: temperature and explicit-weight shares against the formulas on fixed numbers, the limits
(T=1 natural, large T uniform), epochs under a budget, the CLI on real files with a plot, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lmstack.data.mix_report import mix_report, temperature_shares, weight_shares
from lmstack.errors import ConfigError


def test_shares_follow_the_formulas():
    sizes = {"web": 900.0, "code": 90.0, "zh": 10.0}
    t2 = temperature_shares(sizes, 2.0)
    z = 900 ** 0.5 + 90 ** 0.5 + 10 ** 0.5  # 30 + 9.4868 + 3.1623
    assert t2["web"] == pytest.approx(30 / z) and t2["zh"] == pytest.approx(10 ** 0.5 / z)
    assert temperature_shares(sizes, 1.0) == pytest.approx({"web": 0.9, "code": 0.09, "zh": 0.01})
    assert temperature_shares(sizes, 1e6) == pytest.approx({k: 1 / 3 for k in sizes}, rel=1e-4)
    assert weight_shares(sizes, {"web": 1, "code": 3}) == {"web": 0.25, "code": 0.75, "zh": 0.0}
    rep = mix_report(sizes, temperature=2.0, budget_tokens=2000)
    zh = next(r for r in rep["domains"] if r["domain"] == "zh")
    assert zh["share_before"] == pytest.approx(0.01) and zh["epochs"] == pytest.approx(2000 * t2["zh"] / 10)
    with pytest.raises(ConfigError):
        mix_report(sizes)
    with pytest.raises(ConfigError, match="unknown domains"):
        weight_shares(sizes, {"books": 1})


def test_cli_mix_with_plot(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "x" * 400}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "y" * 100}) + "\n")
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "data", "mix", f"en={tmp_path / 'a.jsonl'}",
                        f"zh={tmp_path / 'b.jsonl'}", "--weights", "en=1,zh=1", "--plot", str(tmp_path / "m.png")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)
    assert [round(d["share_before"], 3) for d in rep["domains"]] == [0.8, 0.2]
    assert [d["share_after"] for d in rep["domains"]] == [0.5, 0.5]
    assert (tmp_path / "m.png").read_bytes()[:4] == b"\x89PNG"
    r = subprocess.run([sys.executable, "-m", "lmstack.cli", "data", "mix", "nodomain"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 2 and r.stderr.startswith("lmstack: ") and "Traceback" not in r.stderr
