"""The prefill benchmark's library function on the tiny random model: output shape and FLOP growth."""

from __future__ import annotations

import json

import pytest

from statekv.benchmarks.prefill import (POLICY_NAMES, BenchConfig, crossover, format_crossovers, format_table,
                                       run_benchmark, run_inits)
from statekv.testing.checkpoints import save_tiny_checkpoint


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench_prefill")
    # 6 tokens per chunk, capacity 12: reached after 2 chunks; 8 and 16 frames = 4 and 8 chunks
    run_benchmark(BenchConfig(size="tiny", frames=[8, 16], capacity=12, repeats=1, device="cpu", dtype="float32"),
                  out)
    return out, json.loads((out / "prefill.json").read_text())


def test_json_has_config_versions_and_per_policy_entries(report):
    _, data = report
    assert {"config", "environment", "results", "growth"} <= data.keys()
    cfg = data["config"]
    assert cfg["size"] == "tiny" and cfg["frames"] == [8, 16] and cfg["capacity"] == 12 and cfg["repeats"] == 1
    assert cfg["tokens_per_chunk"] == 6 and cfg["device"] == "cpu" and cfg["dtype"] == "float32"
    assert {"torch", "transformers", "device"} <= data["environment"].keys()
    assert set(data["results"]) == set(POLICY_NAMES) == set(data["growth"])
    for name in POLICY_NAMES:
        entries = data["results"][name]
        assert [e["frames"] for e in entries] == [8, 16]
        for e, chunks in zip(entries, [4, 8]):
            assert e["chunks"] == chunks and e["video_tokens"] == 6 * chunks
            assert len(e["total_s_runs"]) == 1 and e["total_s"] > 0
            assert len(e["chunk_s"]) == chunks and all(s > 0 for s in e["chunk_s"])
            assert sum(e["chunk_s"]) <= e["total_s"] * 1.001
            assert len(e["chunk_flops"]) == chunks and sum(e["chunk_flops"]) == e["flops"] > 0
            assert e["peak_bytes"] > 0
        assert {"flops_ratio", "loglog_slope", "marginal_flops_start", "marginal_flops_end"} <= data["growth"][name].keys()
    assert "statekv" in format_table(data)


def test_records_init_and_load_average(report):
    _, data = report
    assert data["config"]["model"]["init"] == "wide"
    load = data["load_average"]
    assert set(load) == {"before", "after"}
    assert all(len(load[k]) == 3 and all(x >= 0 for x in load[k]) for k in load)
    assert "load average (1/5/15 min) before" in format_table(data) and "init=wide" in format_table(data)


def test_statekv_flops_linear_full_faster(report):
    _, data = report
    full, statekv = data["results"]["full"][-1]["chunk_flops"], data["results"]["statekv"][-1]["chunk_flops"]
    # once capacity is reached (chunk 2 on), every StateKV chunk costs the same: total FLOPs linear in length
    assert statekv[-1] == statekv[len(statekv) // 2] == statekv[2]
    assert statekv[2] > statekv[1]  # before that the state is still filling up
    # Full's chunks keep getting dearer: each attends to everything before it
    assert full[-1] > full[len(full) // 2] > full[2]
    assert data["growth"]["statekv"]["marginal_end_over_middle"] == 1.0
    assert data["growth"]["full"]["marginal_end_over_middle"] > 1.0
    assert data["growth"]["full"]["flops_ratio"] > data["growth"]["statekv"]["flops_ratio"]
    # same prefix and vision work: StateKV never costs more than Full, and the same while under capacity
    assert statekv[:2] == full[:2]
    assert data["results"]["full"][-1]["flops"] > data["results"]["statekv"][-1]["flops"]


def test_png_written(report):
    out, data = report
    png = out / "prefill.png"
    assert png.exists() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["files"]["png"] == str(png)


def test_one_shot_forward_ratios_and_crossover(report):
    _, data = report
    one_shot = data["one_shot"]
    assert [o["frames"] for o in one_shot] == [8, 16] and all(o["total_s"] > 0 for o in one_shot)
    assert [o["tokens"] for o in one_shot] == [data["config"]["prefix_tokens"] + 6 * c for c in (4, 8)]
    for name in POLICY_NAMES:
        for e, o in zip(data["results"][name], one_shot):
            assert e["ratio_to_one_shot"] == e["total_s"] / o["total_s"]
        assert data["crossover"][name]["unit"] == "chunks"
    table = format_table(data)
    assert "one-shot" in table and "crossover statekv vs one-shot forward" in table


def test_crossover_interpolates_between_the_bracketing_lengths():
    assert crossover([8, 16, 32, 64], [1.3, 1.2, 1.1, 0.8])["first_measured"] == 64
    at = crossover([8, 16, 32, 64], [1.3, 1.2, 1.1, 0.8])["interpolated"]
    assert 32 < at < 64 and abs(at - 32 * 2 ** (1 / 3)) < 1e-9  # 1/3 of the way from 1.1 to 0.8, in log length
    assert crossover([8, 16], [0.9, 0.8]) == {"first_measured": 8, "interpolated": None, "below_shortest": True}
    assert crossover([8, 16], [1.2, 1.1])["first_measured"] is None


def test_default_init_checkpoint_keeps_the_class_init(tmp_path):
    """"default" must not be the widened N(0, 0.2) init of the tests: the class's own (initializer_range 0.02)."""
    import torch
    from safetensors.torch import load_file

    def q_proj_std(init):
        path = save_tiny_checkpoint(tmp_path / init, "qwen2_vl", seed=0, init=init)
        weights = {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}
        return torch.stack([v.float().std() for k, v in weights.items() if k.endswith("q_proj.weight")]).mean()

    assert abs(q_proj_std("wide") - 0.2) < 0.02
    assert abs(q_proj_std("default") - 0.02) < 0.005


def test_run_inits_runs_and_prints_both_checkpoints(tmp_path):
    config = BenchConfig(size="tiny", frames=[4, 8], capacity=12, repeats=1, device="cpu", dtype="float32",
                         policies=["statekv"], measure_flops=False, measure_memory=False)
    reports = run_inits(config, out_dir=tmp_path)
    assert list(reports) == ["wide", "default"]
    for init, data in reports.items():
        assert data["config"]["model"]["init"] == init
        assert json.loads((tmp_path / init / "prefill.json").read_text())["config"]["model"]["init"] == init
        assert [e["chunks"] for e in data["results"]["statekv"]] == [2, 4]
    text = format_crossovers(reports)
    assert "checkpoint init wide" in text and "checkpoint init default" in text and text.count("crossover") == 2
