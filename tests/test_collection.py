"""Captioning a collection (infer.py FOLDER): folders walked lazily, broken pictures skipped, a run killed at any point
continued by the same command, and two processes under torchrun writing the file one process writes."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch

from vlcap import captioning, collection, picture_paths
from vlcap.captions_file import CaptionsFile, RunSettings

from helpers import REPO, load_captioner, run_script

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def draw(path: Path, seed: int, size=(56, 56)) -> str:
    from make_coco_folder import COLOURS, SHAPES, draw_picture  # tools/ is on sys.path (conftest)

    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    draw_picture(rng.choice(COLOURS), rng.choice(SHAPES), size, rng).save(path)
    return str(path)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> Path:
    """A folder of 80 shape pictures, 20 of them in two subfolders."""
    root = tmp_path_factory.mktemp("collection") / "photos"
    for i in range(60):
        draw(root / f"p{i:03d}.jpg", i)
    for i in range(20):
        draw(root / ("holiday" if i % 2 else "garden") / f"q{i:03d}.png", 100 + i)
    return root


def infer_command(adapter: Path, out: Path, *extra: str) -> list[str]:
    return ["--adapter", str(adapter), "--device", "cpu", "--output", str(out), "--max-new-tokens", "6", *extra]


@pytest.fixture(scope="module")
def one_run(trained, pictures, tmp_path_factory) -> str:
    """The captions file of one uninterrupted process over the folder, 2 pictures a batch."""
    adapter, _ = trained
    out = tmp_path_factory.mktemp("one") / "captions.jsonl"
    result = run_script("infer.py", *infer_command(adapter, out, "--batch-size", "2", str(pictures)), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "captioned 80 of 80 images" in result.stdout
    return out.read_text()


# ----------------------------------------------------------------------------------------------------------- the paths
def test_folders_lists_and_files_are_found_in_order(tmp_path):
    root = tmp_path / "photos"
    for name in ("b.jpg", "a.png", "sub/c.jpg", "sub/deeper/d.webp", ".hidden.jpg", "._a.jpg", "notes.md", "z.JPG"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")
    (root / "loop").symlink_to(root)  # a folder reached twice is walked once
    (tmp_path / "list.txt").write_text(f"photos/a.png\n\n{root / 'b.jpg'}\r\nmissing.jpg\n")
    found = list(picture_paths.find([str(root), str(tmp_path / "list.txt"), "x.gif"]))
    s = str(root)
    assert found == [
        f"{s}/a.png",
        f"{s}/b.jpg",
        f"{s}/sub/c.jpg",
        f"{s}/sub/deeper/d.webp",
        f"{s}/z.JPG",
        f"{tmp_path}/photos/a.png",
        f"{s}/b.jpg",
        f"{tmp_path}/missing.jpg",
        "x.gif",
    ]


def test_a_huge_folder_is_walked_as_listed_not_listed_first(tmp_path, monkeypatch):
    monkeypatch.setattr(picture_paths, "FOLDER_SORTED", 5)
    for i in range(12):
        (tmp_path / f"{i:02d}.jpg").write_bytes(b"x")
    listed = [e.name for e in os.scandir(tmp_path)]
    assert [Path(p).name for p in picture_paths.find([str(tmp_path)])] == listed


def test_the_listing_is_not_read_ahead_of_the_first_batch(trained, pictures, tmp_path):
    """A stream of 80 paths that fails if more than the decoding workers' share (1 worker x 2 tasks ahead) and the
    captioning loop's (the batches its rows hold, and the next one waiting for free rows), 2 pictures each, is taken
    before the first caption is written."""
    adapter, _ = trained
    model, processor, settings = load_captioner(adapter)
    out = tmp_path / "c.jsonl"
    paths = sorted(str(p) for p in pictures.rglob("*.*"))
    limit = (1 * collection.PREFETCH + captioning.ROWS_PER_PICTURE + 1) * 2

    def listing():
        for taken, path in enumerate(paths):
            if taken >= limit and not out.exists():
                raise AssertionError(f"{taken + 1} paths taken before the first caption")
            yield path

    output = CaptionsFile.open(out, run_settings(settings), overwrite=False)
    recipe = captioning.Recipe(settings["prompt"], 56, batch_size=2, max_new_tokens=4)
    threads = torch.get_num_threads()
    summary = collection.caption_collection(
        model, processor, picture_paths.PictureStream(listing(), output.done), recipe, output, workers=1
    )
    assert torch.get_num_threads() == threads  # the threads left to the worker are given back
    assert summary.captioned == len(paths) == 80
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == paths


def test_the_loop_leaves_the_cores_to_its_decoding_workers(monkeypatch):
    monkeypatch.setattr(collection, "_cores", lambda: 16)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert collection.cpu_threads(torch.device("cuda"), 8) == 1  # on the GPU it only copies pictures
    assert collection.cpu_threads(torch.device("cpu"), 8) == 8  # on the CPU, the cores the workers leave
    assert collection.cpu_threads(torch.device("cpu"), 20) == 1
    assert collection.cpu_threads(torch.device("cuda"), 0) == torch.get_num_threads()  # no workers: as it was
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes share the machine's cores
    assert collection.cpu_threads(torch.device("cpu"), 3) == 5


def run_settings(settings: dict) -> RunSettings:
    return RunSettings(None, None, None, settings["prompt"], 56, 4, "auto", 2)


# --------------------------------------------------------------------------------------------------- broken pictures
def png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height and holds a few bytes of pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\0" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")


def test_broken_pictures_among_good_ones_are_each_reported_and_the_rest_captioned(trained, tmp_path):
    adapter, _ = trained
    root = tmp_path / "mixed"
    good = [draw(root / f"{i}.jpg", i) for i in (0, 2, 5, 7)] + [draw(root / "sub" / "8.png", 8)]
    whole = (root / "0.jpg").read_bytes()
    broken = {
        "1.jpg": (whole[: len(whole) // 2], "not a readable image"),  # truncated
        "3.jpg": (b"<html>not a picture</html>", "not a readable image"),
        "4.png": (b"", "an empty file (0 bytes)"),
        "6.png": (png_header(12000, 9000), "too large (12000 x 9000 pixels"),  # 108 megapixels
    }
    for name, (data, _) in broken.items():
        (root / name).write_bytes(data)
    out = tmp_path / "c.jsonl"
    result = run_script("infer.py", *infer_command(adapter, out, "--batch-size", "3", str(root)))
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "DecompressionBomb" not in result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning: skipped")]
    assert len(warnings) == len(broken), warnings
    for name, (_, why) in broken.items():
        (line,) = [w for w in warnings if f"{root / name}:" in w]
        assert why in line, line
    assert [json.loads(line)["image"] for line in out.read_text().splitlines()] == good
    summary = [line for line in result.stdout.splitlines() if line.startswith("captioned ")]
    assert len(summary) == 1 and summary[0].startswith(f"captioned 5 of 9 images -> {out}"), summary
    assert "; 4 skipped (2 not a readable image, 1 an empty file, 1 too large; see the warnings above)" in summary[0]
    again = run_script("infer.py", *infer_command(adapter, out, "--batch-size", "3", str(root)))
    assert again.returncode == 1 and "all 5 pictures are captioned" in again.stdout, again.stderr[-2000:]
    assert "4 cannot be used" in again.stdout and len(again.stderr.strip().splitlines()) == 4, again.stderr


# ------------------------------------------------------------------------------------------------ stopped and continued
def test_killed_at_a_random_point_and_run_again_gives_the_uninterrupted_runs_file(trained, pictures, one_run, tmp_path):
    """SIGKILL after a random number of captions, then a torn line as a power cut leaves one; the same command then
    writes exactly the file one uninterrupted run writes: every picture once, in the same order."""
    adapter, _ = trained
    seed = random.randrange(10**6)
    after = random.Random(seed).randrange(1, 60)
    out = tmp_path / "captions.jsonl"
    command = [sys.executable, str(REPO / "infer.py"), *infer_command(adapter, out, "--batch-size", "2", str(pictures))]
    with (tmp_path / "log").open("w") as log:
        run = subprocess.Popen(command, stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=ENV, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 300
            while _lines(out) < after and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert run.poll() is None, f"the run ended before {after} captions (seed {seed})"
            run.send_signal(signal.SIGKILL)
        finally:
            run.kill()
            run.wait(timeout=60)
    made = _lines(out)
    assert after <= made < 80, (after, made, seed)
    first = json.loads(one_run.splitlines()[made])
    with out.open("a") as f:
        f.write(json.dumps(first)[:25])  # torn: no end of line
    result = run_script("infer.py", *command[2:], cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_text() == one_run, f"seed {seed}, killed after {made} captions"
    assert f"{out} ended in a broken line" in result.stderr
    assert f"captioned {80 - made} of {80 - made} images -> {out}; {made} captioned before" in result.stdout

    again = run_script("infer.py", *command[2:], cwd=tmp_path)  # nothing left: nothing loaded, nothing written
    assert again.returncode == 0 and "all 80 pictures are captioned" in again.stdout, again.stderr[-2000:]
    assert out.read_text() == one_run


def test_the_gpu_out_of_memory_is_one_line_naming_a_smaller_batch_and_the_captions_are_kept(
    trained, pictures, one_run, tmp_path
):
    """The GPU running out of memory after two batches of 4 (raised as torch raises it; this machine has no GPU to
    fill): one line that names the batch to rerun with, the two batches' captions kept as whole lines, and that rerun
    finishes the file one uninterrupted run writes."""
    adapter, _ = trained
    out = tmp_path / "captions.jsonl"
    failing = (
        "import runpy, sys, torch\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from vlcap import captioning\n"
        "real = captioning.caption_stream\n"
        "def caption_stream(*args, **kwargs):\n"
        "    for made, batch in enumerate(real(*args, **kwargs)):\n"
        "        if made == 2:\n"
        "            raise torch.OutOfMemoryError('CUDA out of memory. Tried to allocate 2.00 GiB')\n"
        "        yield batch\n"
        "captioning.caption_stream = caption_stream\n"
        f"sys.argv = [{str(REPO / 'infer.py')!r}, *sys.argv[1:]]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n"
    )
    command = infer_command(adapter, out, "--batch-size", "4", str(pictures))
    result = subprocess.run(
        [sys.executable, "-c", failing, *command], capture_output=True, text=True, env=ENV, timeout=600
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: the GPU ran out of memory captioning 4 pictures at a time; the captions made so far are kept in "
        f"{out}: run the same command with --batch-size 2 to continue."
    )
    assert "Traceback" not in result.stderr
    assert out.read_text().splitlines() == one_run.splitlines()[:8]  # one_run: batches of 2, the same captions here
    command[command.index("--batch-size") + 1] = "2"
    again = run_script("infer.py", *command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert out.read_text() == one_run


def _lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def test_another_prompt_is_refused_and_overwrite_starts_afresh(tmp_path):
    out = tmp_path / "c.jsonl"
    first = RunSettings(None, None, "model", "COCO Yes:", 56, 6, "auto", 2)
    output = CaptionsFile.open(out, first, overwrite=False)
    output.add([{"image": "a.jpg", "caption": "a red circle"}])
    output.close()
    with pytest.raises(Exception, match=r"another run \(prompt 'COCO Yes:' then, 'Describe:' now\)"):
        CaptionsFile.open(out, RunSettings(None, None, "model", "Describe:", 56, 6, "auto", 2), overwrite=False)
    again = CaptionsFile.open(out, first, overwrite=False)
    assert again.done == {str(tmp_path / "a.jpg")} or again.done == {os.path.abspath("a.jpg")}
    assert again.add([{"image": "a.jpg", "caption": "twice"}]) == 0  # never written twice
    fresh = CaptionsFile.open(out, RunSettings(None, None, "model", "Describe:", 56, 6, "auto", 2), overwrite=True)
    assert out.read_text() == '{"image": "a.jpg", "caption": "a red circle"}\n'  # kept until the first new caption
    fresh.add([{"image": "b.jpg", "caption": "a blue square"}])
    fresh.close()
    assert out.read_text() == '{"image": "b.jpg", "caption": "a blue square"}\n'


def test_a_full_disk_keeps_whole_lines_and_says_how_to_continue(tmp_path):
    """The file may grow by 100 bytes more (RLIMIT_FSIZE, as a full disk does): the write that does not fit is cut
    back, the file keeps its whole lines, and the error says to run the same command again."""
    script = (
        "import resource, signal, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "from vlcap.captions_file import CaptionsFile, RunSettings\n"
        "from vlcap.cli import UserError\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "out = CaptionsFile.open(sys.argv[1], RunSettings(None, None, 'm', 'p', 56, 6, 'auto', 2), overwrite=False)\n"
        "out.add([{'image': 'a.jpg', 'caption': 'a red circle'}])\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (100, 100))\n"
        "try:\n"
        "    out.add([{'image': f'{i}.jpg', 'caption': 'a caption long enough to fill the disk'} for i in range(4)])\n"
        "except UserError as e:\n"
        "    print(e)\n"
    )
    out = tmp_path / "c.jsonl"
    result = subprocess.run([sys.executable, "-c", script, str(out)], capture_output=True, text=True, timeout=60)
    assert "run the same command again to continue" in result.stdout, result.stdout + result.stderr
    assert out.read_text() == '{"image": "a.jpg", "caption": "a red circle"}\n'


# ----------------------------------------------------------------------------------------------- several processes
def test_two_processes_under_torchrun_write_the_file_one_process_writes(trained, pictures, one_run, tmp_path):
    """The folder, then a list naming three of its pictures again: each picture once, as one process writes it."""
    adapter, _ = trained
    out = tmp_path / "captions.jsonl"
    again = tmp_path / "again.txt"
    again.write_text("".join(json.loads(line)["image"] + "\n" for line in one_run.splitlines()[5:8]))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    args = infer_command(adapter, out, "--batch-size", "2", str(pictures), str(again))
    result = subprocess.run(
        [*command, str(REPO / "infer.py"), *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_text() == one_run
    assert result.stdout.count("captioned 80 of 83 images") == 1  # process 0 alone reports
    assert "; 3 listed twice" in result.stdout


def test_a_killed_process_stops_the_other_with_one_line_and_the_same_command_continues(
    trained, pictures, one_run, tmp_path
):
    adapter, _ = trained
    out = tmp_path / "captions.jsonl"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launcher, str(REPO / "infer.py"), *infer_command(adapter, out, "--batch-size", "2", str(pictures))]
    with (tmp_path / "stderr").open("w+") as log:
        run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=ENV, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 300
            while _lines(out) < 8 and run.poll() is None and time.monotonic() < deadline:
                time.sleep(0.01)
            assert run.poll() is None, "the run ended before the test could kill a process"
            (process_1,) = [pid for pid in _children(run.pid) if "RANK=1" in _environment(pid)]
            os.kill(process_1, signal.SIGKILL)
            status = run.wait(timeout=120)
        finally:
            run.kill()
            run.wait(timeout=60)
    assert status != 0
    lines = (tmp_path / "stderr").read_text().replace("\r", "\n").splitlines()
    (line,) = [s for s in lines if s.startswith("error: ")]  # process 0's one line
    rerun = f"run the same command again to continue: torchrun --nproc_per_node 2 {' '.join(command[6:])}"
    assert line.endswith(rerun), line
    assert not any(s.startswith("[rank0]") for s in lines), lines[-30:]  # no traceback from process 0
    assert 8 <= _lines(out) < 80
    result = subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert out.read_text() == one_run


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _environment(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")


def test_each_process_takes_its_own_consecutive_part_of_every_round():
    paths = [f"{i}.jpg" for i in range(17)]
    parts = [list(collection.tasks(iter(paths), 2, rank, 3)) for rank in range(3)]
    assert [len(p) for p in parts] == [3, 3, 3]  # 6 a round: 6 + 6 + 5, the last as 2 + 2 + 1
    for number in range(3):
        tasks = [p[number] for p in parts]
        assert len({t.round_digest for t in tasks}) == 1
        assert [path for t in tasks for path in t.paths] == paths[6 * number : 6 * number + 6]
    assert [t.paths for t in (p[2] for p in parts)] == [("12.jpg", "13.jpg"), ("14.jpg", "15.jpg"), ("16.jpg",)]


def test_a_file_continued_from_another_folder_keeps_its_relative_paths_right(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    settings = RunSettings(None, None, "model", "COCO Yes:", 56, 6, "auto", 2)
    out = tmp_path / "c.jsonl"
    monkeypatch.chdir(first)
    output = CaptionsFile.open(out, settings, overwrite=False)
    output.add([{"image": "a.jpg", "caption": "a red circle"}])
    output.close()
    monkeypatch.chdir(second)
    output = CaptionsFile.open(out, settings, overwrite=False)
    assert output.done == {str(first / "a.jpg")}
    assert output.add([{"image": "a.jpg", "caption": "a blue square"}]) == 1  # second/a.jpg is another picture
    output.close()
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["image"] for r in lines] == ["a.jpg", str(second / "a.jpg")]
    monkeypatch.chdir(first)
    again = CaptionsFile.open(out, settings, overwrite=False)
    assert again.done == {str(first / "a.jpg"), str(second / "a.jpg")}
    assert again.captions(["a.jpg", str(second / "a.jpg")]) == {
        "a.jpg": "a red circle",
        str(second / "a.jpg"): "a blue square",
    }
