"""Training and captioning speed of train.py / infer.py on one GPU, with a real architecture (random weights).

    python bench/bench.py                                    # Qwen2-VL-2B, all variants; appends to bench/RESULTS.md
    python bench/bench.py --variants fast --n 5000           # one variant on 5,000 pictures (issue: scale)
    python bench/bench.py --arch qwen2_5_vl --variants plain,fast,low-memory   # Qwen2.5-VL-3B's shape
    python bench/bench.py --arch qwen3_vl                    # Qwen3-VL-2B's shape
    python bench/bench.py --gpus 2 --n 500                   # data parallel: 1 GPU and 2 under torchrun, then checks
    python bench/bench.py --gpus 2 --n 5000 --no-checks      # the same scaling rows on 5,000 pictures
    python bench/bench.py --n 20000 --prepare-only           # build the stand-in and 20,000 pictures (one command)
    python bench/bench.py --n 20000 --variants fast,spill,spill --max-steps 200 --no-inference   # the cache beyond the GPU

`spill` keeps 2 GB of the vision cache on the GPU and 2 GB in host memory and reads the rest from its file (written
once; a second `spill` in the same call reads the file back instead of encoding: its prep time is that). `--max-steps`
stops every variant after that many steps; the entry then adds a computed full-split epoch (82,783 pictures) from the
measured preparation per picture and time per step. Host GB is the peak resident memory of train.py's largest process.

Offline, in bench/work/: builds the family's stand-in (tools/make_offline_model.py --arch ARCH --size full, into
bench/work/model-ARCH), N generated 640x480 JPEGs with COCO-length captions (tools/make_coco_folder.py -> data2csv.py ->
csv2json.py), then runs train.py itself with the tutorial's recipe (the last 4 held out, 2 epochs, effective batch 16, LoRA
r=64/alpha=16/dropout 0.05 on the seven language-model projections, lr 1e-4, train.py's default image size: 280x280 for
Qwen2-VL and Qwen2.5-VL, 288x288 for Qwen3-VL) in each variant, each in its own process so peak memory is its own. Prints
a table and writes the same as a Markdown entry (date, card, versions, family) to --results.

--gpus N (a machine with N GPUs): instead of the variants, train.py's default fast path on one GPU and under
`torchrun --nproc_per_node N`, at effective batch 16 and 32 (the batch per GPU divided by N): samples per second,
scaling efficiency against one GPU at effective batch 16, each process's peak memory, the mean loss against one GPU at
the same effective batch. Then (unless --no-checks) 8 steps without dropout whose per-step losses must agree: N GPUs
with graphs against N GPUs eager and against one GPU, and graphs against eager with gradient accumulation (8 x 2).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tools")]

from make_offline_model import FAMILIES  # noqa: E402  (the families a stand-in can be built of)

# Each variant is train.py's flags on top of the recipe; "fast" is train.py's defaults.
VARIANTS = {
    "tutorial-recipe": [
        "--batch-size",
        "4",
        "--grad-accum",
        "4",
        "--gradient-checkpointing",
        "--vision-cache-gb",
        "0",
        "--no-cuda-graphs",
        "--max-steps",
        "6",
    ],  # per-step time only: the full run is ~5 minutes
    "plain": ["--vision-cache-gb", "0", "--no-cuda-graphs"],
    "cache": ["--no-cuda-graphs"],
    "fast": [],
    "low-memory": ["--low-memory"],
    # The vision cache beyond the GPU (feature_store.VisionCache): 2 GB on the GPU, 2 GB in host memory, the rest in its file.
    "spill": ["--vision-cache-gb", "2", "--host-cache-gb", "2"],
    "spill-file": ["--vision-cache-gb", "2", "--host-cache-gb", "0"],  # everything beyond the GPU read from the file
    # CUDA graphs must not change the arithmetic: 8 steps without dropout (whose draws differ by design), eager vs graphs.
    "check-eager": ["--no-cuda-graphs", "--lora-dropout", "0", "--max-steps", "8", "--logging-steps", "1"],
    "check-graphs": ["--lora-dropout", "0", "--max-steps", "8", "--logging-steps", "1"],
}


# --gpus N: effective batch -> (name, processes, train.py flags; `{b16}` / `{b32}` the batch per GPU for effective batch
# 16 / 32). One GPU at 16 is train.py's default.
SCALING = {
    16: [("1 GPU", 1, []), ("N GPUs", None, ["--batch-size", "{b16}"])],
    32: [("1 GPU", 1, ["--batch-size", "32"]), ("N GPUs", None, ["--batch-size", "{b32}"])],
}
CHECK = ["--lora-dropout", "0", "--max-steps", "8", "--logging-steps", "1"]
CHECKS = {
    "1 GPU graphs": (1, CHECK),
    "N GPUs eager": (None, ["--batch-size", "{b16}", "--no-cuda-graphs", *CHECK]),
    "N GPUs graphs": (None, ["--batch-size", "{b16}", *CHECK]),
    "1 GPU 8x2 eager": (1, ["--batch-size", "8", "--grad-accum", "2", "--no-cuda-graphs", *CHECK]),
    "1 GPU 8x2 graphs": (1, ["--batch-size", "8", "--grad-accum", "2", *CHECK]),
}
# (check, against it, what the difference must be): graphs against eager replay the same kernels.
COMPARE = [
    ("N GPUs graphs", "N GPUs eager", "bf16 noise at most; ~0 expected"),
    ("N GPUs graphs", "1 GPU graphs", "bf16 noise (other batch shapes, other sum order)"),
    ("1 GPU 8x2 graphs", "1 GPU 8x2 eager", "bf16 noise at most; ~0 expected"),
    ("1 GPU 8x2 graphs", "1 GPU graphs", "bf16 noise"),
]


def logged_losses(out: Path) -> list[float]:
    from plot import logged_steps_and_losses

    return [loss for _, loss in logged_steps_and_losses(out)]


def comma_ints(text: str) -> list[int]:
    """A flag's comma-separated numbers: "16,32" -> [16, 32]."""
    return [int(n) for n in text.split(",")]


def run(cmd: list[str], log: Path) -> float:
    return run_measured(cmd, log)[0]


def run_measured(cmd: list[str], log: Path) -> tuple[float, float]:
    """(seconds, peak resident memory in GB of the command's largest process: itself or a child it waited for)."""
    started = time.perf_counter()
    with log.open("a") as f:
        process = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, cmd)
    return time.perf_counter() - started, usage.ru_maxrss * 1024 / 1e9  # kB on Linux


def benchmark_flags(model_dir: Path, data_json: Path, out: Path, sample_max_new_tokens: int | None = 32) -> list[str]:
    """train.py's flags common to every benchmark run: the stand-in, the data, a fresh output folder, no SwanLab, no
    checkpoint (the logged losses are in the adapter's train_settings.json), and captions of the length the captioning
    figures use (None: train.py's own)."""
    captions = ["--sample-max-new-tokens", str(sample_max_new_tokens)] if sample_max_new_tokens is not None else []
    return [
        "--model-dir",
        str(model_dir),
        "--data-json",
        str(data_json),
        "--output-dir",
        str(out),
        "--overwrite",
        "--swanlab-mode",
        "disabled",
        "--save-steps",
        "100000",
        *captions,
    ]


def train_command(processes: int, flags: list[str]) -> list[str]:
    """train.py on one GPU, or under torchrun on `processes` GPUs of this machine."""
    if processes == 1:
        return [sys.executable, "train.py", *flags]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(processes),
        "train.py",
        *flags,
    ]


def multi_gpu(args, model_dir: Path, data_json: Path) -> list[str]:
    """--gpus N: the scaling rows, then the checks; the Markdown lines of the entry."""
    gpus = args.gpus
    if 16 % gpus:
        raise SystemExit(f"--gpus {gpus}: the effective batch of 16 must split evenly over the GPUs (2, 4, 8 or 16).")
    sizes = {"{b16}": str(16 // gpus), "{b32}": str(32 // gpus)}

    def shown(name: str) -> str:
        return name.replace("N GPUs", f"{gpus} GPUs")

    def go(name: str, processes: int | None, flags: list[str]) -> dict | None:
        processes = processes or gpus
        flags = [sizes.get(f, f) for f in flags]
        slug = shown(name).replace(" ", "-") + "-" + "-".join(flags).replace("--", "")
        out = Path(args.work) / f"out-{args.arch}-gpus-{slug}-{args.n}"
        steps = ["--max-steps", str(args.max_steps)] if args.max_steps > 0 and "--max-steps" not in flags else []
        cmd = train_command(
            processes,
            [*benchmark_flags(model_dir, data_json, out), *flags, *steps, *shlex.split(args.train_args)],
        )
        log = Path(args.work) / f"{args.arch}-gpus-{slug}-{args.n}.log"
        try:  # one failed run must not lose the others' figures
            wall = run(cmd, log)
        except subprocess.CalledProcessError:
            print(f"{name} {' '.join(flags)} failed; the end of {log}:\n" + log.read_text()[-3000:])
            return None
        s = json.loads((out / "adapter" / "train_settings.json").read_text())
        sec, steps = s["seconds"], s["global_step"]
        peaks = [
            p["allocated"] for p in s.get("peak_gpu_memory_gb_by_process") or [{"allocated": s["peak_gpu_memory_gb"]}]
        ]
        row = {
            "name": shown(name),
            "processes": processes,
            "batch": s["batch_size"],
            "accumulation": s["grad_accum"],
            "effective": s["effective_batch"],
            "steps": steps,
            "prep_s": sec["prepare"],
            "capture_s": sec["capture"],
            "train_s": sec["train"],
            "step_ms": 1000 * sec["steps"] / steps,
            "samples_per_s": steps * s["effective_batch"] / sec["train"],
            "peaks_gb": peaks,
            "loss": s["train_loss"],
            "graphs": s["cuda_graphs_used"],
            "wall_s": wall,
            "losses": logged_losses(out),
        }
        print(json.dumps(row))
        return row

    runs = [run_ for effective in args.effective for run_ in SCALING[effective]]
    rows = [go(name, processes, flags) for name, processes, flags in runs]
    lines = [
        (
            "| run | batch per GPU x GPUs (x accumulation) | effective batch | steps | prep s | graph capture s | "
            "train s | ms/step | samples/s | scaling efficiency | peak GB per GPU | mean loss | loss vs 1 GPU |"
        ),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    base = rows[0] if runs[0] == SCALING[16][0] else None
    for (name, _, flags), r in zip(runs, rows):
        if r is None:
            lines.append(f"| {shown(name)} {' '.join(sizes.get(f, f) for f in flags)} | failed |")
            continue
        alone = next((o for o in rows if o and o["processes"] == 1 and o["effective"] == r["effective"]), None)
        efficiency = f"{100 * r['samples_per_s'] / (r['processes'] * base['samples_per_s']):.0f}%" if base else "—"
        versus = f"{r['loss'] - alone['loss']:+.4f}" if alone and alone is not r else "—"
        accumulation = f" x {r['accumulation']}" if r["accumulation"] > 1 else ""
        lines.append(
            f"| {r['name']}{'' if r['graphs'] else ' (eager)'} | {r['batch']} x {r['processes']}{accumulation} | "
            f"{r['effective']} | {r['steps']} | {r['prep_s']:.1f} | {r['capture_s']:.1f} | {r['train_s']:.1f} | "
            f"{r['step_ms']:.0f} | {r['samples_per_s']:.0f} | {efficiency} | "
            f"{' / '.join(f'{p:.1f}' if p is not None else '—' for p in r['peaks_gb'])} | {r['loss']:.4f} | {versus} |"
        )
    lines.append(
        "\nScaling efficiency: samples/s over (GPUs x one GPU's samples/s at effective batch 16, its default). "
        "Peak GB per GPU: each process's own (train_settings.json's peak_gpu_memory_gb_by_process)."
    )
    if args.no_checks:
        return lines
    checks = {name: go(name, processes, flags) for name, (processes, flags) in CHECKS.items()}
    lines += [
        "\n8 steps without dropout, per-step losses (train.py --lora-dropout 0 --max-steps 8 --logging-steps 1):\n",
        "| check | against | largest relative loss difference | expected | graphs used |",
        "| --- | --- | --- | --- | --- |",
    ]
    for a, b, expected in COMPARE:
        ra, rb = checks[a], checks[b]
        if ra is None or rb is None:
            lines.append(f"| {shown(a)} | {shown(b)} | failed | {expected} | |")
            continue
        worst = max(abs(x - y) / abs(y) for x, y in zip(ra["losses"], rb["losses"]))
        print(f"{shown(a)} {ra['losses']}\n{shown(b)} {rb['losses']}\nlargest relative difference {worst:.2e}")
        lines.append(f"| {shown(a)} | {shown(b)} | {worst:.1e} | {expected} | {ra['graphs']} / {rb['graphs']} |")
    return lines


def prepare(work: Path, n: int, arch: str = "qwen2_vl", size: tuple[int, int] = (640, 480)) -> tuple[Path, Path]:
    """The stand-in model folder and a data_vl.json of n training pictures (made once, then reused)."""
    model, data = (
        work / f"model-{arch}",
        work / (f"data-{n}" if size == (640, 480) else f"data-{n}-{size[0]}x{size[1]}"),
    )
    work.mkdir(parents=True, exist_ok=True)
    if not (model / "config.json").exists():
        build = [sys.executable, "tools/make_offline_model.py", "--arch", arch, "--size", "full", "--out", str(model)]
        print(f"building the {arch} stand-in: {run(build, work / f'model-{arch}.log'):.0f} s")
    return model, make_split(data, n, "train", size)


def prepare_eval(work: Path, n: int = 100) -> Path:
    """A COCO-validation-like split of n pictures with references (data_vl_eval.json), made once, then reused."""
    return make_split(work / f"eval-{n}", n, "validation")


def make_split(data: Path, n: int, split: str, size: tuple[int, int] = (640, 480), background: str = "white") -> Path:
    """n generated pictures of a COCO 2014 split turned into conversations by the pipeline's own scripts (a COCO
    folder -> data2csv.py -> csv2json.py), as a user makes them; the JSON's path. `background`: make_coco_folder's."""
    validation = split == "validation"
    json_path = data / ("data_vl_eval.json" if validation else "data_vl.json")
    if json_path.exists():
        return json_path
    data.mkdir(parents=True, exist_ok=True)
    py, coco = sys.executable, str(data / "coco")
    picture_split, seed = ("val2014", "1") if validation else ("train2014", "0")
    steps = [
        [py, "tools/make_coco_folder.py", "--out", coco, "--n", str(n), "--split", picture_split, "--seed", seed]
        + ["--width", str(size[0]), "--height", str(size[1]), "--background", background],
        [py, "data2csv.py", "--source", coco, "--split", split, "--n", str(n), "--image-dir", str(data / "images")]
        + ["--csv", str(data / "data.csv"), "--workers", "16"],
        [py, "csv2json.py", "--csv", str(data / "data.csv"), "--json", str(json_path), "--workers", "16"],
    ]
    print(f"{n} {split} pictures: {sum(run(cmd, data / 'prepare.log') for cmd in steps):.0f} s")
    return json_path


FULL_SPLIT = 82_783  # train2014's pictures
FULL_SPLIT_STEPS = -(-(FULL_SPLIT - 4) // 16)  # the last 4 held out, batches of 16


def full_split_epoch(row: dict, n: int) -> str:
    """One epoch of the full split as this run's figures predict it: data reading and encoding scale with the pictures,
    the model load and the set-up do not; then FULL_SPLIT_STEPS steps at the measured time per step."""
    scale = FULL_SPLIT / n
    parts = row["prep_parts"] or {"before_model": 0.0, "load_model": 0.0, "after_model": row["prep_s"]}
    prep = parts["before_model"] * scale + parts["load_model"] + parts["after_model"] * scale + row["setup_total_s"]
    steps = FULL_SPLIT_STEPS * row["step_ms"] / 1000
    return f"preparation {prep / 60:.1f} min + training {steps / 60:.1f} min = **{(prep + steps) / 60:.1f} min**"


def matmul_tflops() -> float:
    """bf16 matrix-product rate of this card, measured now (the MFU denominator)."""
    import torch

    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 20 * 2 * 8192**3 / (start.elapsed_time(end) / 1e3) / 1e12


def job_flops(model_dir: Path, data_json: Path, epochs: int = 2, test_size: int = 4) -> float:
    """FLOPs the 2-epoch job needs at least: vision forward, language model forward + backward to activations
    (LoRA's own products are <1% and left out), the LM head on caption tokens only; per sample seen. At train.py's
    default image size for the family."""
    import torch
    from PIL import Image
    from transformers import AutoConfig

    from vlcap import qwen, vision_encoding
    from vlcap.training_data import encode_example

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = qwen.model_class(model_dir)(config)
    linear = lambda m: sum(p.numel() for n, p in m.named_parameters() if p.dim() == 2)  # noqa: E731
    vision, language = linear(model.model.visual), linear(model.model.language_model.layers)
    head = config.text_config.hidden_size * config.text_config.vocab_size
    processor = qwen.load_processor(model_dir)
    side = qwen.resolve_image_size(processor, None)
    patches = vision_encoding.image_token_count(processor, side) * processor.image_processor.merge_size**2
    items = json.loads(data_json.read_text())[:-test_size]
    blank = Image.new("RGB", (side, side), "white")
    prompt_tokens = len(encode_example(processor, blank, "", "COCO Yes:", 8192)["input_ids"]) - 1
    total = 0.0
    for item in items:
        answer = len(processor.tokenizer(item["conversations"][1]["value"])["input_ids"]) + 1
        total += 2 * vision * patches + 4 * language * (prompt_tokens + answer) + 4 * head * answer
    return epochs * total


def inference(adapter: Path, data_json: Path, n: int = 64, new_tokens: int = 32) -> dict:
    """Captions per second, transformers' generate against fastdecode's loop: one batched call of n pictures (the fast
    loop's first call of a shape includes its CUDA-graph capture; the second reuses it) and one picture at a time; and
    how many of the n captions the two give alike."""
    import torch

    from vlcap import captioning, formats, images, qwen

    settings = formats.read_adapter_settings(adapter)
    model, processor = qwen.load_for_captioning(adapter, settings, None, "cuda")
    items = json.loads(data_json.read_text())[:n]
    pictures = [images.load(formats.image_of(it), settings.image_size) for it in items]
    captions = {}

    def timed(batch, batch_size, fast):
        torch.cuda.synchronize()
        start = time.perf_counter()
        captions[fast] = captioning.caption_images(
            model, processor, batch, settings.prompt, batch_size, new_tokens, fast=fast
        )
        torch.cuda.synchronize()
        return time.perf_counter() - start

    result = {}
    for fast in (False, True):
        name = "fast" if fast else "generate"
        timed(pictures[:8], 8, fast)  # warm-up (another shape: the timed call below captures its own graph)
        result[f"{name}_batched_per_s"] = n / timed(pictures, n, fast)
        result[f"{name}_again_per_s"] = n / timed(pictures, n, fast)
        result[f"{name}_single_per_s"] = 8 / timed(pictures[:8], 1, fast)
        timed(pictures, n, fast)
    result["same_captions"] = sum(a == b for a, b in zip(captions[False], captions[True]))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--arch",
        default="qwen2_vl",
        choices=list(FAMILIES),
        help="model family, as the full-size stand-in of tools/make_offline_model.py",
    )
    parser.add_argument(
        "--variants",
        default=",".join(v for v in VARIANTS if not v.startswith("spill")),
        help="comma-separated, from: " + ", ".join(VARIANTS) + " (default: all but the spill ones)",
    )
    parser.add_argument("--n", type=int, default=500, help="generated pictures (the tutorial: 500)")
    parser.add_argument("--work", default=str(ROOT / "bench" / "work"), help="scratch folder (git-ignored)")
    parser.add_argument("--results", default=str(ROOT / "bench" / "RESULTS.md"), help="Markdown file to append to")
    parser.add_argument("--no-inference", action="store_true", help="skip the captioning benchmark")
    parser.add_argument(
        "--gpus",
        type=int,
        default=0,
        help="N > 1: data parallel over N GPUs under torchrun against one GPU, instead of the variants",
    )
    parser.add_argument("--no-checks", action="store_true", help="with --gpus: skip the 8-step loss checks")
    parser.add_argument(
        "--effective",
        default="16,32",
        type=comma_ints,
        help="with --gpus: the effective batches to run, from 16 and 32 (scaling efficiency needs 16)",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=-1,
        help="stop every variant after this many optimizer steps (-1: the 2 epochs)",
    )
    parser.add_argument("--width", type=int, default=640, help="generated pictures' width (COCO's are about 640x480)")
    parser.add_argument("--height", type=int, default=480, help="generated pictures' height")
    parser.add_argument("--prepare-only", action="store_true", help="build the stand-in and the pictures, then stop")
    parser.add_argument("--train-args", default="", help='more train.py flags for every variant, e.g. "--workers 15"')
    args = parser.parse_args()
    import torch
    import transformers

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    model_dir, data_json = prepare(work, args.n, args.arch, (args.width, args.height))
    print(f"prepared {model_dir} and {data_json} in {time.perf_counter() - started:.0f} s")
    if args.prepare_only:
        return
    rate = matmul_tflops()
    flops = job_flops(model_dir, data_json)
    print(f"bf16 matmul {rate:.0f} TFLOP/s; job {flops / 1e15:.2f} PFLOP, floor {flops / rate / 1e12:.2f} s")
    if args.gpus > 1:
        if torch.cuda.device_count() < args.gpus:
            raise SystemExit(f"--gpus {args.gpus}, but this machine has {torch.cuda.device_count()} GPU(s).")
        card = torch.cuda.get_device_name()
        version = torch.cuda.nccl.version()
        nccl = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
        lines = [
            (
                f"\n### {datetime.date.today()} — data parallel, {args.gpus} x {card}, "
                f"{FAMILIES[args.arch].name} stand-in ({args.arch}), torch {torch.__version__} (NCCL {nccl}), "
                f"transformers {transformers.__version__}, {args.n} pictures\n"
            ),
            *multi_gpu(args, model_dir, data_json),
        ]
        entry = "\n".join(lines) + "\n"
        print(entry)
        with open(args.results, "a") as f:
            f.write(entry)
        return

    rows = []
    for name in args.variants.split(","):
        out = work / f"out-{args.arch}-{name}-{args.n}"
        cmd = [sys.executable, "train.py", *benchmark_flags(model_dir, data_json, out), *VARIANTS[name]]
        if args.max_steps > 0 and "--max-steps" not in VARIANTS[name]:
            cmd += ["--max-steps", str(args.max_steps)]
        cmd += shlex.split(args.train_args)
        wall, host_gb = run_measured(cmd, work / f"{args.arch}-{name}-{args.n}.log")
        s = json.loads((out / "adapter" / "train_settings.json").read_text())
        steps, sec = s["global_step"], s["seconds"]
        full = s["optimizer_steps"] == steps and "--max-steps" not in VARIANTS[name] and args.max_steps <= 0
        row = {
            "variant": name,
            "steps": steps,
            "prep_s": sec["prepare"],
            "setup_s": sec["to_first_step"] - sec["prepare"] - sec["capture"],
            "capture_s": sec["capture"],
            "train_s": sec["train"],
            "step_ms": 1000 * sec["steps"] / steps,
            "samples_per_s": steps * s["effective_batch"] / sec["train"],
            "peak_gb": s["peak_gpu_memory_gb"],
            "loss": s["train_loss"],
            "wall_s": wall,
            "image_size": s["image_size"],
            "host_gb": host_gb,
            "setup_total_s": sec["to_first_step"] - sec["prepare"],
            "imports_s": sec.get("imports"),
            "prep_parts": sec.get("prepare_parts"),
            "mfu": flops / (sec["train"] * rate * 1e12) if full else None,
        }
        rows.append(row)
        print(json.dumps(row))
    check = None
    if {"check-eager", "check-graphs"} <= {r["variant"] for r in rows}:
        eager, graphs = (logged_losses(work / f"out-{args.arch}-{v}-{args.n}") for v in ("check-eager", "check-graphs"))
        check = max(abs(a - b) / abs(a) for a, b in zip(eager, graphs))
        print(f"losses eager {eager}\nlosses graphs {graphs}\nmax relative difference {check:.2e}")
    # The cache beyond the GPU must read the same features in the same order: the same losses as the cache on the GPU.
    spilled = {}
    if "fast" in {r["variant"] for r in rows}:
        on_gpu = logged_losses(work / f"out-{args.arch}-fast-{args.n}")
        for v in sorted({r["variant"] for r in rows if r["variant"].startswith("spill")}):
            losses = logged_losses(work / f"out-{args.arch}-{v}-{args.n}")
            spilled[v] = (
                max(abs(a - b) / abs(a) for a, b in zip(on_gpu, losses)) if len(losses) == len(on_gpu) else None
            )
            print(f"losses fast {on_gpu}\nlosses {v} {losses}\nmax relative difference {spilled[v]}")
    training_rows = [r for r in rows if not r["variant"].startswith("check")]
    infer_row = None
    if training_rows and not args.no_inference:
        try:  # a failure here must not lose the training figures above
            infer_row = inference(
                work / f"out-{args.arch}-{training_rows[-1]['variant']}-{args.n}" / "adapter", data_json
            )
            print(json.dumps(infer_row))
        except Exception:
            traceback.print_exc()

    card = torch.cuda.get_device_name()
    versions = f"torch {torch.__version__}, transformers {transformers.__version__}"
    family = f"{FAMILIES[args.arch].name} stand-in ({args.arch}, full size, random weights)"
    size = rows[0]["image_size"] if rows else "?"
    extra = f" with `{args.train_args}`" if args.train_args else ""
    lines = [
        f"\n### {datetime.date.today()} — {family}, {card}, {versions}, {args.n} pictures at {size}x{size}{extra}\n",
        f"bf16 matmul measured {rate:.0f} TFLOP/s; the job is {flops / 1e15:.2f} PFLOP (floor {flops / rate / 1e12:.2f} s).\n",
        "| variant | steps | prep s | prep: data / model load / encoding | set-up s | graph capture s | train s | ms/step | samples/s | peak GB | host GB | MFU | mean loss |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in training_rows:
        mfu = f"{100 * r['mfu']:.0f}%" if r["mfu"] else "—"
        parts = " / ".join(f"{v:.1f}" for v in r["prep_parts"].values()) if r["prep_parts"] else "—"
        lines.append(
            f"| {r['variant']} | {r['steps']} | {r['prep_s']:.1f} | {parts} | {r['setup_s']:.1f} | {r['capture_s']:.1f} | {r['train_s']:.1f} | {r['step_ms']:.0f} | "
            f"{r['samples_per_s']:.0f} | {r['peak_gb']:.1f} | {r['host_gb']:.1f} | {mfu} | {r['loss']:.3f} |"
        )
    if check is not None:
        lines.append(f"\nCUDA graphs vs eager, 8 steps without dropout: largest relative loss difference {check:.1e}.")
    for v, difference in spilled.items():
        said = "not comparable (different numbers of logged losses)" if difference is None else f"{difference:.1e}"
        lines.append(f"\n{v} vs fast (the cache on the GPU), logged losses: largest relative difference {said}.")
    if args.max_steps > 0 and training_rows:
        lines.append(
            f"\nEach variant stopped after {args.max_steps} steps. A full-split epoch computed from these figures "
            f"(82,783 pictures, {FULL_SPLIT_STEPS:,} steps of 16; preparation scaled per picture but the model load):\n"
        )
        for r in training_rows:
            lines.append(f"- {r['variant']}: {full_split_epoch(r, args.n)}")
    if infer_row:
        r = infer_row
        lines.append(
            f"\nCaptioning 64 pictures at {size}x{size}, 32 new tokens ({training_rows[-1]['variant']} adapter, merged), "
            "captions/s: batched (first call of the shape / again) and one at a time.\n\n"
            "| decoder | batched, first call | batched, again | one at a time |\n| --- | --- | --- | --- |"
        )
        for name in ("generate", "fast"):
            lines.append(
                f"| {name} | {r[name + '_batched_per_s']:.0f} | {r[name + '_again_per_s']:.0f} | {r[name + '_single_per_s']:.1f} |"
            )
        lines.append(f"\nThe fast loop's captions equal generate's for {r['same_captions']} of 64 pictures.")
    if training_rows:
        lines.append(
            f"\nImporting torch and transformers (before the clock starts): {training_rows[0]['imports_s']} s."
        )
        try:  # a missing matplotlib must not lose the figures above
            from plot import logged_steps_and_losses, plot_losses

            runs = {
                r["variant"]: logged_steps_and_losses(work / f"out-{args.arch}-{r['variant']}-{args.n}")
                for r in training_rows
            }
            png = plot_losses(
                runs,
                Path(args.results).with_name(f"losses-{args.arch}-{datetime.date.today()}-{args.n}.png"),
                f"training loss, {args.n} pictures, {card}",
            )
            lines.append(f"\n![training loss of each variant]({png.name})")
        except Exception:
            traceback.print_exc()
    entry = "\n".join(lines) + "\n"
    print(entry)
    with open(args.results, "a") as f:
        f.write(entry)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
