"""`lmstack data run --executor ray` on a local Ray (2 CPUs) gives the same data.jsonl, byte for byte, and the
same step report as the local executor on the same input: EN + ZH documents in several files and several Ray
blocks, with exact and near duplicates planted across files (partitions). Ray's start-up takes 30-90 s on a
loaded 2-core machine, so this runs in `make test-ray`, not `make test`."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from lmstack.cli import main as cli_main  # noqa: E402
from lmstack.data.pipeline import run_pipeline  # noqa: E402

FIX = Path(__file__).parent / "data_fixtures"
EN = [d.strip() for d in (FIX / "good_en.txt").read_text(encoding="utf-8").split("=====\n") if d.strip()]
ZH = [d.strip() for d in (FIX / "good_zh.txt").read_text(encoding="utf-8").split("=====\n") if d.strip()]


def _near(text: str, rng: random.Random) -> str:
    words = text.split(" ")
    k = rng.randrange(len(words))
    words[k] = words[k] + "s"  # one word changed: a near duplicate
    return " ".join(words)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def _corpus(root: Path) -> dict:
    rng = random.Random(0)
    base = EN + ZH
    files = [[], [], []]
    for k in range(60):
        t = f"Note {k}. " + base[k % len(base)] + f" Item {k * 7919 % 1000}."
        files[k % 3].append(t)
        if k % 5 == 0:
            files[(k + 1) % 3].append(_near(t, rng))  # near duplicate in another file
        if k % 7 == 0:
            files[(k + 2) % 3].append(t.upper() if t.isascii() else t)  # exact duplicate (dedup key) elsewhere
    files[2].append("Too short.")
    files[1].append(EN[1] + " Mail jane.roe@example.com now.")
    for i, docs in enumerate(files):
        with gzip.open(root / f"part{i}.jsonl.gz", "wt", encoding="utf-8") as f:
            for t in docs:
                f.write(json.dumps({"text": t, "url": f"u{i}"}, ensure_ascii=False) + "\n")
    return {"inputs": [{"path": str(root / "part*.jsonl.gz"), "name": "web", "keep_fields": ["url"]}],
            "workers": 2, "batch_size": 8, "dedup": {"threshold": 0.7}}


def test_ray_output_equals_local(tmp_path, local_ray):
    cfg = _corpus(tmp_path)
    loc = run_pipeline(cfg, tmp_path / "local")
    got = run_pipeline(cfg, tmp_path / "ray", executor="ray")
    steps_l = {s["name"]: s for s in loc["steps"]}
    steps_r = {s["name"]: s for s in got["steps"]}
    assert steps_l["exact_dedup"]["removed"]["exact_duplicate"] >= 5
    assert steps_l["near_dedup"]["removed"]["near_duplicate"] >= 5
    assert steps_r == steps_l  # every count, reason and example
    assert (tmp_path / "ray" / "data.jsonl").read_bytes() == (tmp_path / "local" / "data.jsonl").read_bytes()
    assert got["histograms"] == loc["histograms"] and got["totals"] == loc["totals"]
    assert got["executor"]["name"] == "ray" and got["executor"]["cpus"] == 2
    assert not (tmp_path / "ray" / "_staging").exists()


def test_cli_executor_ray(tmp_path, local_ray, capsys):
    cfg = _corpus(tmp_path)
    (tmp_path / "c.yaml").write_text(json.dumps(cfg), encoding="utf-8")
    rc = cli_main(["data", "run", "-c", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o"), "--executor", "ray"])
    assert rc in (0, None)
    assert "near_dedup" in capsys.readouterr().out
    assert json.loads((tmp_path / "o" / "report.json").read_text())["executor"]["name"] == "ray"
