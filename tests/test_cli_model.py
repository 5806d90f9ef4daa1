"""`lmstack info` and the CLI's error contract (one line, exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import make_hf_model


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lmstack.cli", *args], capture_output=True, text=True, timeout=120)


def test_info_reports_architecture_and_parameters(tmp_path):
    hf = make_hf_model("qwen2", tmp_path)
    n = sum(p.numel() for p in hf.parameters())  # transformers counts tied weights once
    r = run_cli("info", str(tmp_path))
    assert r.returncode == 0, r.stderr
    assert "qwen2" in r.stdout
    assert f"{n:,}" in r.stdout
    assert "bf16" in r.stdout and "int4" in r.stdout


def test_missing_dir_one_line_exit_2(tmp_path):
    r = run_cli("info", str(tmp_path / "missing"))
    assert r.returncode == 2
    assert r.stderr.strip().startswith("lmstack: ")
    assert "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_unsupported_model_type_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    r = run_cli("info", str(tmp_path))
    assert r.returncode == 2
    assert "gpt_neox" in r.stderr and "llama, qwen2, qwen3, mistral" in r.stderr


def test_debug_shows_traceback(tmp_path):
    r = run_cli("--debug", "info", str(tmp_path / "missing"))
    assert r.returncode != 0
    assert "Traceback" in r.stderr
