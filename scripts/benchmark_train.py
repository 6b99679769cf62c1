"""Training throughput of ``magdiff train`` against a minimal plain accelerate + diffusers loop; what the cache saves.

Three runs, each a fresh process, in turn (A B S A B S ...), so that a change in the machine's load falls on all alike:

    (A) magdiff train --preset world-tiny --set ...   from the latent cache (the trainer's own loop, logs and all)
    (B) a plain loop of ~40 lines as diffusers' training examples write it: the same U-Net (built by the same
        code and seed: same architecture and initial weights), the same cache file read with safetensors, the
        same batch size, v-prediction target, min-SNR weights, AdamW settings, warm-up schedule, grad clipping and
        precision; ``loss.item()`` every step, as the examples do
    (S) magdiff train as (A) with ``data_mode: stream``: every batch decoded and encoded by the frozen VAE, image
        and text encoders in the step

Only the steady state is timed: the steps after the first ``--warmup`` (A and S: from the ``seconds`` of their
``train_log.jsonl`` records, written every ``log_every`` steps; B: a clock read at the same step boundaries), so the
start-up, the cache load (round 1's A builds the cache, before its first step) and the final checkpoint and export
are left out. Printed: steps per second per run, the ratio A/B and A/S per round, their median and spread, and the
load average before and after.

    python scripts/benchmark_train.py                              # 5 rounds of 10 warm-up + 40 timed steps
    python scripts/benchmark_train.py --rounds 3 --steps 60 --json train_bench.json
    python scripts/benchmark_train.py --profile prof.out           # one cProfile'd run of (A), then stop

Every run is started with its autogroup at nice 19 (``/proc/self/autogroup``), so that other work on the machine
keeps its share; the times are then slow, but the interleaving keeps the ratios fair.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PRESET = "world-tiny"
LOG_EVERY = 10


def overrides(out_dir: Path, cache_dir: Path, max_steps: int, data_mode: str) -> dict[str, Any]:
    """The config keys set on top of the preset (the same for A, B and S, but for ``data_mode``)."""
    return {
        "output_dir": str(out_dir),
        "cache_dir": str(cache_dir),
        "max_steps": max_steps,
        "log_every": LOG_EVERY,
        "checkpoint_every": max_steps,  # only the final one, after the timed steps
        "validate_every": 10**9,
        "prediction_type": "v_prediction",
        "snr_gamma": 5.0,
        "data_mode": data_mode,
    }


def niced(command: list[str]) -> list[str]:
    """``command`` in a new session whose autogroup runs at nice 19."""
    script = 'echo 19 > /proc/self/autogroup 2>/dev/null; exec "$@"'
    return ["setsid", "bash", "-c", script, "bash", *command]


def run(command: list[str], threads: int) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    result = subprocess.run(niced(command), capture_output=True, text=True, env=env, cwd=ROOT)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout


def magdiff_command(keys: dict[str, Any]) -> list[str]:
    command = [sys.executable, "-m", "magdiff.cli", "train", "--preset", PRESET, "--no-progress"]
    for key, value in keys.items():
        command += ["--set", f"{key}={json.dumps(value)}"]
    return command


def steady_rate_from_log(log_path: Path, warmup: int, max_steps: int) -> float:
    """Steps per second between the log records of steps ``warmup`` and ``max_steps``."""
    seconds = {}
    for line in log_path.read_text().splitlines():
        record = json.loads(line)
        if "step" in record:
            seconds[record["step"]] = record["seconds"]
    return (max_steps - warmup) / (seconds[max_steps] - seconds[warmup])


# ------------------------------------------------------------------------------------------- (B) the plain loop


def plain_loop(keys: dict[str, Any], warmup: int) -> float:
    """The minimal loop a user would write after diffusers' ``train_text_to_image.py``; returns steady steps/s."""
    import torch
    import torch.nn.functional as F
    from accelerate import Accelerator
    from diffusers import DDPMScheduler
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import compute_snr
    from safetensors.torch import load_file

    from magdiff.training.config import config_from_dict, get_preset
    from magdiff.training.trainer import build_pipeline

    config = config_from_dict(keys, get_preset(PRESET)).validate()
    torch.manual_seed(config.seed)
    pipeline = build_pipeline(config)  # the U-Net the trainer builds: same architecture and initial weights
    (cache_path,) = Path(config.cache_dir).glob("clips_*.safetensors")  # the file the trainer built
    data = load_file(str(cache_path))
    levels = sorted(int(key.split(".")[1]) for key in data if key.startswith("slot_pyramid."))
    unet = pipeline.unet.requires_grad_(True).train()
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config, prediction_type=config.prediction_type)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    optimizer = torch.optim.AdamW(
        unet.parameters(),
        lr=config.learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        weight_decay=config.weight_decay,
    )
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=config.warmup_steps)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    size, num_clips, batch_size = tuple(data["latents"].shape[-2:]), data["latents"].shape[0], config.batch_size
    started = time.perf_counter()
    for step in range(config.max_steps):
        if step == warmup:
            started = time.perf_counter()
        index = torch.randint(0, num_clips, (batch_size,))
        latents = data["latents"][index].float()  # (b, c, F, h, w)
        filled = torch.rand(batch_size, latents.shape[2]) < 0.3  # which subject slots hold the cut-out
        filled[:, 0] = True
        embeds = torch.where(filled[..., None, None], data["slot_embeds"][index].float(), data["empty_embeds"].float())
        pyramid = [
            torch.where(filled[..., None, None, None], data[f"slot_pyramid.{i}"][index], data[f"empty_pyramid.{i}"])
            .float()
            .permute(0, 2, 1, 3, 4)  # (b, c, F, h_s, w_s)
            for i in levels
        ]
        dropped = torch.rand(batch_size) < config.text_dropout
        text = torch.where(dropped[:, None, None], data["empty_text"], data["text"][index]).float()
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,))
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
        with accelerator.accumulate(unet), accelerator.autocast():
            subject = accelerator.unwrap_model(unet).encode_subject(embeds, pyramid, size)
            prediction = unet(noisy, timesteps, text, subject=subject).sample
            loss = F.mse_loss(prediction.float(), target, reduction="none").mean(dim=(1, 2, 3, 4))
            snr = compute_snr(noise_scheduler, timesteps)
            loss = (loss * torch.clamp(snr, max=config.snr_gamma) / (snr + 1)).mean()
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(unet.parameters(), config.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        _ = loss.detach().item()  # the examples' running train_loss
    return (config.max_steps - warmup) / (time.perf_counter() - started)


# ------------------------------------------------------------------------------------------- the rounds


def summary(name: str, values: list[float]) -> str:
    return f"{name}: median {statistics.median(values):.3f}, spread {min(values):.3f}-{max(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of A B S (default 5)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed first steps (a multiple of 10)")
    parser.add_argument("--steps", type=int, default=40, help="timed steps after them (a multiple of 10)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run (default 1)")
    parser.add_argument("--skip-stream", action="store_true", help="leave out (S)")
    parser.add_argument("--profile", default=None, metavar="PATH", help="cProfile one run of (A) into PATH, stop")
    parser.add_argument("--json", default=None, metavar="PATH", help="also write every figure here")
    parser.add_argument("--plain-child", default=None, help=argparse.SUPPRESS)  # (B), in its own process
    args = parser.parse_args()
    if args.plain_child:
        keys = json.loads(args.plain_child)
        print(json.dumps({"steps_per_second": plain_loop(keys, args.warmup)}))
        return
    if args.warmup % LOG_EVERY or args.steps % LOG_EVERY or args.warmup < LOG_EVERY or args.steps < LOG_EVERY:
        parser.error(f"--warmup and --steps must be positive multiples of {LOG_EVERY}")
    max_steps = args.warmup + args.steps

    work = Path(tempfile.mkdtemp(prefix="magdiff-train-bench-"))
    cache_dir = work / "cache"
    keys = {mode: overrides(work / mode, cache_dir, max_steps, mode) for mode in ("cache", "stream")}
    if args.profile:
        prepare = [*magdiff_command({**keys["cache"], "max_steps": 1}), "--prepare-only"]
        run(prepare, args.threads)  # the cache, built before the profiled run
        profiled = [sys.executable, "-m", "cProfile", "-o", args.profile, *magdiff_command(keys["cache"])[1:]]
        run(profiled, args.threads)
        print(f"wrote {args.profile}: {' '.join(profiled)}")
        return

    load_before = " ".join(f"{value:.2f}" for value in os.getloadavg())
    print(
        f"{os.cpu_count()} CPUs, load average {load_before}; {args.rounds} rounds of {args.warmup} warm-up and "
        f"{args.steps} timed steps, OMP_NUM_THREADS={args.threads}"
    )
    print("(A) " + " ".join(magdiff_command(keys["cache"])))
    rates: dict[str, list[float]] = {"A": [], "B": [], "S": []}
    for round_index in range(args.rounds):
        for name in ("A", "B", "S"):
            if name == "S" and args.skip_stream:
                continue
            mode = "stream" if name == "S" else "cache"
            log = Path(keys[mode]["output_dir"]) / "train_log.jsonl"
            log.unlink(missing_ok=True)
            if name == "B":
                command = [
                    sys.executable,
                    __file__,
                    "--warmup",
                    str(args.warmup),
                    "--plain-child",
                    json.dumps(keys[mode]),
                ]
                rate = json.loads(run(command, args.threads).strip().splitlines()[-1])["steps_per_second"]
            else:
                run(magdiff_command(keys[mode]), args.threads)
                rate = steady_rate_from_log(log, args.warmup, max_steps)
            rates[name].append(rate)
            print(f"round {round_index + 1} ({name}) {rate:7.3f} steps/s", flush=True)
    load_after = " ".join(f"{value:.2f}" for value in os.getloadavg())

    for name, label in (("A", "magdiff train, cache"), ("B", "plain loop, cache"), ("S", "magdiff train, stream")):
        if rates[name]:
            print(summary(f"({name}) {label} steps/s", rates[name]))
    ratios = [a / b for a, b in zip(rates["A"], rates["B"])]
    print("A/B per round: " + ", ".join(f"{ratio:.3f}" for ratio in ratios))
    print(
        summary("A/B (magdiff / plain)", ratios)
        + f"; target >= 0.95: {'met' if statistics.median(ratios) >= 0.95 else 'NOT met'}"
    )
    if rates["S"]:
        saved = [a / s for a, s in zip(rates["A"], rates["S"])]
        print("A/S per round: " + ", ".join(f"{ratio:.2f}" for ratio in saved))
        print(summary("A/S (cache / stream)", saved))
    print(f"load average before {load_before}, after {load_after}")
    if args.json:
        record = {
            "rounds": args.rounds,
            "warmup": args.warmup,
            "steps": args.steps,
            "threads": args.threads,
            "load_before": load_before,
            "load_after": load_after,
            "steps_per_second": rates,
            "command_a": magdiff_command(keys["cache"]),
        }
        Path(args.json).write_text(json.dumps(record, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
