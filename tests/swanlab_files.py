"""Read back what SwanLab wrote for a run: its scalar series, its media (with captions) and its config."""

from __future__ import annotations

from pathlib import Path


def read_run(run_dir: Path) -> dict:
    """{"scalars": {key: [(step, value)]}, "media": {key: [(filename, caption)]}, "config": text of config.yaml}."""
    from swanlab.proto.swanlab.record.v1.record_pb2 import Record
    from swanlab.sdk.internal.core_python.store import DataStoreReader

    (log_file,) = run_dir.glob("run-*.swanlab")
    scalars, media = {}, {}
    reader = DataStoreReader()
    reader.open(log_file)
    for raw in reader:
        record = Record()
        record.ParseFromString(raw)
        if record.HasField("scalar"):
            scalars.setdefault(record.scalar.key, []).append((record.scalar.step, record.scalar.value.number))
        elif record.HasField("media"):
            items = [(i.filename, i.caption) for i in record.media.value.items]
            media.setdefault(record.media.key, []).extend(items)
    reader.close()
    config = (run_dir / "files" / "config.yaml").read_text()
    return {"scalars": scalars, "media": media, "config": config}


def only_run(log_dir: Path) -> Path:
    runs = sorted(log_dir.glob("run-*"))
    assert len(runs) == 1, f"expected one SwanLab run in {log_dir}, found {runs}"
    return runs[0]
