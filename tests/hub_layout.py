"""Hub data as it arrives, built by the tests: huggingface_hub's cache layout for a model or dataset repository,
and dataset repositories as the hub stores them (parquet shards per config and split, README YAML `configs:`).

Nothing here downloads. `put_in_cache` writes what `snapshot_download` leaves behind (content-addressed blobs, a
snapshot of symlinks, refs/<ref> naming the commit), which huggingface_hub's own `snapshot_download(...,
local_files_only=True)` then resolves; `write_dataset_repo` writes the files of a dataset repository."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# split -> rows, per config name
DatasetConfigs = Mapping[str, Mapping[str, Sequence[Mapping[str, Any]]]]


def put_in_cache(cache: Path, repo_id: str, commit: str, source: Path, *, ref: str | None = "main",
                 repo_type: str = "model") -> Path:
    """Store `source`'s files as revision `commit` of `repo_id` in huggingface_hub's cache layout; returns the
    snapshot directory."""
    repo = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in source.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


def write_dataset_repo(directory: Path, configs: DatasetConfigs, *, shards: int = 1) -> Path:
    """A dataset repository as the hub stores one pushed with `push_to_hub`: `<config>/<split>-0000i-of-0000n.parquet`
    per config and split, and a README whose YAML `configs:` maps each config's splits to their shards. A single
    config named "default" uses the default layout instead: `data/<split>-*.parquet` and no configs block."""
    directory.mkdir(parents=True, exist_ok=True)
    only_default = list(configs) == ["default"]
    yaml = ["---", "configs:"]
    for config, splits in configs.items():
        folder = "data" if only_default else config
        yaml += [f"- config_name: {config}", "  data_files:"]
        for split, rows in splits.items():
            _write_shards(directory / folder, split, rows, shards=shards)
            yaml += [f"  - split: {split}", f"    path: {folder}/{split}-*"]
    readme = "# a dataset card\n" if only_default else "\n".join(yaml) + "\n---\n# a dataset card\n"
    (directory / "README.md").write_text(readme)
    return directory


def _write_shards(folder: Path, split: str, rows: Sequence[Mapping[str, Any]], *, shards: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(list(rows))
    size = -(-len(rows) // shards)  # ceil
    for index in range(shards):
        part = table.slice(index * size, size)
        pq.write_table(part, folder / f"{split}-{index:05d}-of-{shards:05d}.parquet")
