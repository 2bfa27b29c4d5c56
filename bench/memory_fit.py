"""Does train.py fit smaller cards by itself? Imitate 16, 12 and 8 GB cards (and a card without bf16) on a large GPU and
run the tutorial's job with train.py's defaults on each.

    python bench/memory_fit.py                              # every run below; a Markdown table to stdout and $OUT
    python bench/memory_fit.py --runs 80gb,12gb,fp16        # some of them

Offline, in bench/work/ (shared with bench/bench.py): the 2B stand-in and 500 generated pictures (bench.py's prepare()),
plus a 100-picture evaluation split, so the job is the whole default one: the base model scored before training, 2 epochs at
an effective batch of 16, the held-out and evaluation pictures captioned after. Each run is train.py in its own process
with every memory setting left to it; VLCAP_GPU_MEMORY_GB makes vlcap/memory.py cap that process's GPU memory
(torch.cuda.set_per_process_memory_fraction) and plan for a card of that size, VLCAP_GPU_BF16=0 makes it plan for a card
without bf16. Recorded per run: what train.py chose and its estimate, the measured peaks (allocated and reserved), the
times, and the loss curve against the 80 GB bf16 run's (fp16 must track it within a few percent at the end).
This process imports nothing but the standard library: all GPU work happens in the train.py processes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from bench import benchmark_flags, logged_losses, prepare, prepare_eval  # noqa: E402  (bench/bench.py: the standard library only, at import)

# name: (what it imitates, environment, train.py flags beyond the job's). "80gb" is the reference for the loss curves.
RUNS = {
    "80gb": ("this card, defaults", {}, []),
    "16gb": ("16 GB card", {"VLCAP_GPU_MEMORY_GB": "16"}, []),
    "12gb": ("12 GB card", {"VLCAP_GPU_MEMORY_GB": "12"}, []),
    "8gb": ("8 GB card", {"VLCAP_GPU_MEMORY_GB": "8"}, []),
    "t4": ("16 GB card without bf16 (T4, V100)", {"VLCAP_GPU_MEMORY_GB": "16", "VLCAP_GPU_BF16": "0"}, []),
    "fp16": ("this card, --precision fp16", {}, ["--precision", "fp16"]),
    # A setting of the user's that cannot fit: one line before anything loads, not an out-of-memory error later.
    "12gb-batch16": (
        "12 GB card, --batch-size 16 --no-gradient-checkpointing",
        {"VLCAP_GPU_MEMORY_GB": "12"},
        ["--batch-size", "16", "--no-gradient-checkpointing"],
    ),
}


def losses(out: Path) -> list[float]:
    """The losses a run logged; none for a run that stopped before saving its adapter."""
    try:
        return logged_losses(out)
    except FileNotFoundError:
        return []


def train(name: str, model_dir: Path, data_json: Path, eval_json: Path, work: Path, log) -> dict:
    label, env, flags = RUNS[name]
    out = work / f"out-memfit-{name}"
    cmd = [
        sys.executable,
        "train.py",
        *benchmark_flags(model_dir, data_json, out, sample_max_new_tokens=None),
        *["--eval-json", str(eval_json), "--logging-steps", "5"],
        *flags,
    ]
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True)
    wall = time.perf_counter() - started
    log.write(f"\n===== {name}: {label}\n$ {' '.join(env_ + '=' + v for env_, v in env.items())} {' '.join(cmd)}\n")
    log.write(done.stdout + done.stderr)
    lines = (done.stdout + done.stderr).splitlines()
    said = [line for line in lines if line.startswith(("memory:", "warning: memory:", "precision:", "error:"))]
    row = {"run": name, "imitates": label, "exit": done.returncode, "wall_s": round(wall, 1), "said": said}
    settings_file = out / "adapter" / "train_settings.json"
    if done.returncode == 0 and settings_file.exists():
        s = json.loads(settings_file.read_text())
        sec, plan = s["seconds"], s.get("memory_plan", {})
        row.update(
            batch=f"{s['batch_size']} x {s['grad_accum']}",
            checkpointing=s["gradient_checkpointing"],
            captions=s["eval_batch_size"],
            vision_cache=s["vision_cache"],
            cuda_graphs=s["cuda_graphs_used"],
            precision=s.get("precision"),
            estimated_peak_gb=plan.get("estimated_peak_gb"),
            estimated_need_gb=plan.get("estimated_need_gb"),
            peak_gb=s["peak_gpu_memory_gb"],
            reserved_gb=s.get("peak_gpu_reserved_gb"),
            prep_s=sec["prepare"],
            train_s=sec["train"],
            step_ms=round(1000 * sec["steps"] / s["global_step"]),
            steps=s["global_step"],
            final_loss=s["train_loss"],
            losses=losses(out),
        )
    else:
        row["last_line"] = lines[-1] if lines else ""
    return row


def table(rows: list[dict], limit_of: dict[str, str]) -> str:
    head = (
        "| run | imitates | GPU memory cap | exit | chosen | precision | graphs | estimated peak / need GB | "
        "measured peak allocated / reserved GB | prep s | train s | ms/step | final loss | loss vs 80gb (end) |"
    )
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    ref = next((r for r in rows if r["run"] == "80gb" and r.get("losses")), None)
    for r in rows:
        if "batch" not in r:
            lines.append(
                f"| {r['run']} | {r['imitates']} | {limit_of[r['run']]} | {r['exit']} | — | — | — | — | — | — | — | — | — | "
                f"{r.get('last_line', '')[:160]} |"
            )
            continue
        chosen = (
            r["batch"]
            + (" + checkpointing" if r["checkpointing"] else "")
            + ("" if r["vision_cache"] else ", no cache")
            + ("" if r["captions"] == 32 else f", captions {r['captions']} at a time")
        )
        track = "—"
        if ref and r["losses"] and r["run"] != "80gb":
            n = min(len(ref["losses"]), len(r["losses"]), 3)
            a, b = sum(r["losses"][-n:]) / n, sum(ref["losses"][-n:]) / n
            track = f"{100 * (a - b) / b:+.1f}%"
        lines.append(
            f"| {r['run']} | {r['imitates']} | {limit_of[r['run']]} | {r['exit']} | {chosen} | {r['precision']} | "
            f"{'yes' if r['cuda_graphs'] else 'no'} | {r['estimated_peak_gb']} / {r['estimated_need_gb']} | "
            f"{r['peak_gb']} / {r['reserved_gb']} | {r['prep_s']:.1f} | {r['train_s']:.1f} | {r['step_ms']} | "
            f"{r['final_loss']:.4f} | {track} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default=",".join(RUNS), help="comma-separated, from: " + ", ".join(RUNS))
    parser.add_argument("--n", type=int, default=500, help="generated training pictures (the tutorial: 500)")
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"), help="scratch folder (git-ignored)")
    args = parser.parse_args()
    names = args.runs.split(",")
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        parser.error(f"unknown runs {unknown}; choose from {', '.join(RUNS)}")
    out_dir = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
    work = Path(args.work)
    model_dir, data_json = prepare(work, args.n)
    eval_json = prepare_eval(work)
    about = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch, transformers, peft; print(f'{torch.cuda.get_device_name()}, torch "
            "{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}')",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout.strip()
    print(about)
    log_path = (out_dir or work) / "memory_fit.log"
    rows = []
    with log_path.open("w") as log:
        for name in names:
            rows.append(train(name, model_dir, data_json, eval_json, work, log))
            r = rows[-1]
            print(json.dumps({k: v for k, v in r.items() if k != "losses"}), flush=True)
    limit_of = {
        n: (RUNS[n][1].get("VLCAP_GPU_MEMORY_GB", "none") + (" GB" if "VLCAP_GPU_MEMORY_GB" in RUNS[n][1] else ""))
        for n in names
    }
    said = "\n".join(f"- {r['run']}: " + " / ".join(r["said"]) for r in rows)
    curves = "\n".join(f"- {r['run']}: " + ", ".join(f"{x:.3f}" for x in r["losses"]) for r in rows if r.get("losses"))
    report = (
        f"\n### memory_fit — {about}, {args.n} pictures + 100 evaluation pictures\n\n{table(rows, limit_of)}\n\n"
        f"What train.py said:\n{said}\n\nLoss every 5 steps:\n{curves}\n"
    )
    print(report)
    if out_dir:
        (out_dir / "memory_fit.md").write_text(report)
        (out_dir / "memory_fit.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
