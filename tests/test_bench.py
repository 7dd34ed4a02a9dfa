"""`escepe bench` / escepe_rt.bench: every number is there and consistent (no timing asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

import escepe_rt
from compiler.cli import main
from escepe_rt.bench import benchmark, format_report

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fashion_resnet18.escepe"


def test_benchmark_reports_every_number():
    images = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    r = benchmark(EXAMPLE, batches=(1, 4), seconds=0.0, min_runs=2, inputs=images, repeat=1)
    assert r["load_first_ms"] > 0 and r["load_median_ms"] > 0
    assert [s["section"] for s in r["sections"]] == [0, 1, 2, 3]
    assert all(s["f32_weight_bytes"] > 0 and s["decode_ms"] > 0 for s in r["sections"])
    # throughput counts every weight as float32 (the shipped file keeps float32 panels, padded)
    spec = escepe_rt.load(EXAMPLE).spec
    for s in r["sections"]:
        begin, end = spec.sections[s["section"]]
        weights = [spec.nodes[i].weight for i in range(begin, end)]
        count = sum(int(np.prod(spec.tensors[w].shape)) for w in weights if w >= 0)
        assert s["f32_weight_bytes"] == 4 * count and s["bytes_kept"] >= s["f32_weight_bytes"]
    assert {(row["mode"], row["batch"]) for row in r["latency"]} == {
        (m, b) for m in ("early_exit", "dense") for b in (1, 4)
    }
    for row in r["latency"]:
        assert row["runs"] >= 2 and row["p50_ms"] <= row["p99_ms"]
    h = r["exit_histogram"]
    assert h["samples"] == 8 and sum(h["counts"]) == 8
    assert r["peak_rss_mb"] > 0
    text = format_report(r)
    assert "lazy decode" in text and "exit histogram" in text
    assert r["programs_unavailable"] is None and "run as section programs" in text
    # the Fashion example: its 13 3x3 stride-1 convs of 16-128 channels run Winograd (4 at
    # 28x28x16, 3 each at 14x14x32, 7x7x64, 4x4x128), its other 19 convs the direct kernels
    # the shipped file's codebooks predate float16 rounding: its panels are float32
    assert r["conv_kernels"] == {
        "winograd": 13,
        "direct": 19,
        "direct_f16": 0,
        "depthwise": 0,
        "im2col_sgemm": 0,
    }
    assert "convs: 13 winograd, 19 direct" in text


def test_cli_bench_json(capsys):
    assert main(["bench", str(EXAMPLE), "--batches", "1", "--seconds", "0", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["latency"][0]["batch"] == 1 and len(r["sections"]) == 4
