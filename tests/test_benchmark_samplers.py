"""scripts/benchmark_samplers.py: settings run on the same clips, shards merge exactly, the table picks right."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_samplers.py"


@pytest.fixture(scope="module")
def samplers():
    spec = importlib.util.spec_from_file_location("benchmark_samplers", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _setting(name: str, steps: int, seconds: float, results: dict[str, float], dtype: str = "float32") -> dict:
    scheduler = name.split(":")[0]
    return {
        "name": name,
        "scheduler": scheduler,
        "steps": steps,
        "dtype": dtype,
        "num_samples": 10,
        "seconds_per_clip": seconds,
        "results": results,
    }


def test_settings_are_parsed_or_refused(samplers):
    assert samplers.parse_setting("unipc:10") == {
        "name": "unipc:10",
        "scheduler": "unipc",
        "steps": 10,
        "dtype": "float32",
    }
    assert samplers.parse_setting("ddim:25:bfloat16")["dtype"] == "bfloat16"
    for bad in ("unipc", "unipc:ten", "ddim:0", "a:1:b:c"):
        with pytest.raises(SystemExit, match="SCHEDULER:STEPS"):
            samplers.parse_setting(bad)


def test_the_table_picks_the_fewest_steps_within_the_tolerance_on_every_figure(samplers):
    reference = {
        "generation/motion_correct": 0.90,
        "editing/mask_iou": 0.70,
        "generation/background_distance": 5.0,
        "generation/subject_colour_error": 30.0,
    }
    settings = {
        "ddim:50": _setting("ddim:50", 50, 2.0, reference),
        # 0.01 off on IoU, 2.55/255 off on the colour error: both within 0.02 of their scale
        "ddim:25": _setting(
            "ddim:25", 25, 1.0, {**reference, "editing/mask_iou": 0.69, "generation/subject_colour_error": 32.55}
        ),
        # within on motion, off on IoU by 0.03: not chosen although it has fewer steps
        "unipc:10": _setting("unipc:10", 10, 0.4, {**reference, "editing/mask_iou": 0.67}),
        # off only on a pixel distance, which is not held to the tolerance
        "unipc:15": _setting("unipc:15", 15, 0.6, {**reference, "generation/background_distance": 9.0}),
        # off by 10/255 on the colour error
        "dpm-solver++:10": _setting("dpm-solver++:10", 10, 0.4, {**reference, "generation/subject_colour_error": 40.0}),
        # bf16 is reported, never chosen as the default sampler
        "ddim:10:bfloat16": _setting("ddim:10:bfloat16", 10, 0.3, reference, dtype="bfloat16"),
    }
    lines = samplers.table({"settings": settings}, 0.02)
    assert lines[-1] == "fastest within 0.02 of ddim:50 on every figure: unipc:15"
    assert not any("background_distance" in line for line in lines)
    worst = next(line for line in lines if line.startswith("| largest difference"))
    assert worst.split("|")[2:8] == [" 0.000 ", " 0.010 ", " 0.030 ", " 0.000 ", " 0.039 ", " 0.000 "]
    settings["unipc:15"]["results"]["generation/motion_correct"] = 0.85
    settings["ddim:25"]["results"]["editing/mask_iou"] = 0.65
    lines = samplers.table({"settings": settings}, 0.02)
    assert lines[-1] == "fastest within 0.02 of ddim:50 on every figure: none"
    assert lines[-2] == "fastest no worse than 0.02 of ddim:50 on every figure: none"
    # better by more than the tolerance: not "within", but "no worse than"
    settings["ddim:25"]["results"]["editing/mask_iou"] = 0.75
    lines = samplers.table({"settings": settings}, 0.02)
    assert lines[-1] == "fastest within 0.02 of ddim:50 on every figure: none"
    assert lines[-2] == "fastest no worse than 0.02 of ddim:50 on every figure: ddim:25"
    loss = next(line for line in lines if line.startswith("| largest loss"))
    assert loss.split("|")[3] == " 0.010 "  # ddim:25: IoU better by 0.05, colour error worse by 2.55/255


def test_two_shards_merge_into_the_run_over_both(samplers, saved_tiny_model, tmp_path, monkeypatch):
    def run(*argv: str) -> dict:
        monkeypatch.setattr(sys, "argv", ["benchmark_samplers.py", "--model", str(saved_tiny_model), *argv])
        samplers.main()
        return json.loads(Path(argv[argv.index("--out") + 1]).read_text())

    common = ("--settings", "ddim:2,unipc:2", "--tasks", "generation,editing", "--truncate-prompt")
    whole = run(*common, "--num-samples", "2", "--out", str(tmp_path / "whole.json"))
    run(*common, "--num-samples", "1", "--out", str(tmp_path / "a.json"))
    run(*common, "--num-samples", "1", "--first-sample", "1", "--out", str(tmp_path / "b.json"))
    merged = run("--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m.json"))
    assert list(merged["settings"]) == ["ddim:2", "unipc:2"]
    for name in ("ddim:2", "unipc:2"):
        assert merged["settings"][name]["num_samples"] == 2
        assert merged["settings"][name]["results"] == pytest.approx(whole["settings"][name]["results"])
    # the two samplers saw the same clips and prompts
    prompts = {
        name: [row.get("caption") for row in whole["settings"][name]["per_sample"]] for name in whole["settings"]
    }
    assert prompts["ddim:2"] == prompts["unipc:2"]
