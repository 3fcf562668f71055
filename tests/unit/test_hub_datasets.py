"""Datasets by hub id (`data.*.kind: hf`): a dataset repository as the hub stores it (parquet shards per config and
split, README YAML `configs:`), found in a real Hugging Face cache layout at a pinned revision and read through the
real `datasets.load_dataset`; the field mapping (dotted fields, chat rows); the one download in the preflight
before any worker; the offline stop, the same line in the dry run.

Nothing is downloaded: the cache is the on-disk layout huggingface_hub's `snapshot_download(...,
local_files_only=True)` resolves (tests/hub_layout.py), and the download the preflight asks for is a stand-in
that checks its arguments, counts its calls and writes into that layout what the real one would.
"""

from __future__ import annotations

from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

import cipo_nemo.__main__ as entry
from cipo_nemo.config import load_config
from cipo_nemo.data.hub_datasets import fetch_dataset
from cipo_nemo.data.sources import DataError, load_items
from cipo_nemo.models.tiny import build_tiny_model_dir
from cipo_nemo.preflight import run_preflight
from tests.hub_layout import put_in_cache, write_dataset_repo

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "conf" / "cipo_base.yaml"
REPO_ID = "acme/sums"
SHA_MAIN, SHA_V2 = "c" * 40, "d" * 40
REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download


def sums(prefix: str, count: int, offset: int = 0) -> list[dict]:
    return [{"question": f"{prefix}: what is {i} + {offset}?", "final": str(i + offset), "uid": f"{prefix}-{i}"}
            for i in range(count)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return build_tiny_model_dir(tmp_path_factory.mktemp("model") / "tiny")


def sums_repo(root: Path, *, offset: int) -> Path:
    """Two configs x two splits, each split in two parquet shards."""
    return write_dataset_repo(root, {
        "easy": {"train": sums("easy-train", 6, offset), "test": sums("easy-test", 4, offset)},
        "hard": {"train": sums("hard-train", 6, offset), "test": sums("hard-test", 5, offset)},
    }, shards=2)


def hf_overrides(path: str, *extra: str, section: str = "train") -> list[str]:
    return [f"data.{section}.kind=hf", f"data.{section}.hf.path={path}", f"data.{section}.hf.fields.prompt=question",
            f"data.{section}.hf.fields.answer=final", *extra]


def train_source(*overrides: str):
    return load_config(BASE, list(overrides)).data.train


# ---------------------------------------------------------------------------------------------- reading


def test_a_cached_hub_dataset_gives_the_config_and_split_asked_for_at_the_pinned_revision(offline_hub, tmp_path):
    put_in_cache(offline_hub, REPO_ID, SHA_MAIN, sums_repo(tmp_path / "main", offset=0), repo_type="dataset")
    put_in_cache(offline_hub, REPO_ID, SHA_V2, sums_repo(tmp_path / "v2", offset=100), ref="v2", repo_type="dataset")
    items, report = load_items(train_source(*hf_overrides(REPO_ID, "data.train.hf.name=hard",
                                                          "data.train.hf.split=test")))
    assert [item.prompt for item in items] == [f"hard-test: what is {i} + 0?" for i in range(5)]  # both shards
    assert [item.answer for item in items] == ["0", "1", "2", "3", "4"]
    assert items[0].id == items[0].origin == "acme/sums:hard:test[0]" and report.source == "acme/sums:hard:test"
    pinned, _ = load_items(train_source(*hf_overrides(REPO_ID, "data.train.hf.name=easy", "data.train.hf.revision=v2",
                                                      "data.train.hf.fields.id=uid")))
    assert [item.answer for item in pinned] == [str(100 + i) for i in range(6)]  # v2's rows, the train split
    assert pinned[0].id == "easy-train-0"


def test_dotted_fields_and_chat_rows_map_as_for_files(tmp_path):
    # verl's layout: the prompt column is a chat, the gold sits in a nested column; the default repo layout
    rows = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{i} + 1?"}],
             "reward_model": {"ground_truth": str(i + 1), "style": "rule"}} for i in range(3)]
    rows.append({"prompt": [{"role": "assistant", "content": "no user turn"}],
                 "reward_model": {"ground_truth": "9", "style": "rule"}})
    directory = write_dataset_repo(tmp_path / "verl_like", {"default": {"train": rows}})
    items, report = load_items(train_source(
        "data.train.kind=hf", f"data.train.hf.path={directory}", "data.train.hf.fields.answer=reward_model.ground_truth"))
    assert [item.answer for item in items] == ["1", "2", "3"]
    assert items[0].prompt is None and items[0].messages[-1] == {"role": "user", "content": "0 + 1?"}
    assert report.skipped == {"bad_messages": 1}


@pytest.mark.parametrize(("overrides", "message"), [
    (["data.train.hf.name=medium"], "BuilderConfig 'medium' not found. Available: ['easy', 'hard']"),
    (["data.train.hf.name=easy", "data.train.hf.split=validation"],
     "Unknown split \"validation\". Should be one of ['train', 'test']"),
    ([], "Config name is missing. Please pick one among the available configs: ['easy', 'hard']"),
    (["data.train.hf.name=easy", "data.train.hf.fields.answer=solution"],
     "acme/sums:easy:train: no column(s) solution (set data.<train|validation>.<file|hf>.fields.*); "
     "columns: question, final, uid"),
])
def test_a_config_split_or_column_that_is_not_there_is_one_line_naming_what_is(overrides, message, offline_hub, tmp_path):
    put_in_cache(offline_hub, REPO_ID, SHA_MAIN, sums_repo(tmp_path / "main", offset=0), repo_type="dataset")
    with pytest.raises(DataError) as caught:
        run_preflight(load_config(BASE, hf_overrides(REPO_ID, *overrides, "verifier.num_workers=1")))
    assert str(caught.value).startswith("data.train: ") and message in str(caught.value)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------- the preflight


class Downloads:
    """The stand-in for huggingface_hub.snapshot_download: cache lookups stay the real library's; a download is
    recorded (with its arguments) and leaves the repository in the cache as the real one would."""

    def __init__(self, cache: Path, source: Path) -> None:
        self.cache, self.source, self.events = cache, source, []

    def snapshot_download(self, repo_id, *, repo_type=None, revision=None, local_files_only=False, **kwargs):
        if local_files_only:
            return REAL_SNAPSHOT_DOWNLOAD(repo_id, repo_type=repo_type, revision=revision, local_files_only=True,
                                          **kwargs)
        assert kwargs == {}, kwargs  # the default cache, no other options
        self.events.append(("download", repo_id, repo_type, revision))
        put_in_cache(self.cache, repo_id, SHA_V2, self.source, ref=revision or "main", repo_type=repo_type)
        return REAL_SNAPSHOT_DOWNLOAD(repo_id, repo_type=repo_type, revision=revision, local_files_only=True)

    def run_training(self, cfg, items):
        self.events.append(("workers start", [item.answer for item in items["train"]]))
        return 0


def _main(capsys, model_dir: Path, *overrides: str, dry_run: bool = False) -> tuple[int, str, str]:
    code = entry.main(["--config", str(BASE), *(["--dry-run"] if dry_run else []), "verifier.num_workers=1",
                       "policy.backend=hf", "generation.backend=hf", f"policy.model_name={model_dir}", *overrides])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_preflight_downloads_an_absent_dataset_once_before_any_worker(offline_hub, tmp_path, model_dir, capsys,
                                                                          monkeypatch):
    downloads = Downloads(offline_hub, sums_repo(tmp_path / "served", offset=0))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", downloads.snapshot_download)
    monkeypatch.setattr(entry, "run_training", downloads.run_training)
    args = hf_overrides(REPO_ID, "data.train.hf.name=easy", "data.train.hf.revision=v2",
                        f"run.output_dir={tmp_path / 'run'}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    code, out, err = _main(capsys, model_dir, *args, dry_run=True)  # the dry run never downloads
    assert code == 0, err
    assert (f"data.train.hf.path acme/sums at revision 'v2': absent: will be downloaded in the preflight into {offline_hub}"
            in out) and downloads.events == []
    code, out, err = _main(capsys, model_dir, *args)
    assert code == 0, err
    snapshot = offline_hub / "datasets--acme--sums" / "snapshots" / SHA_V2
    assert downloads.events == [("download", REPO_ID, "dataset", "v2"), ("workers start", [str(i) for i in range(6)])]
    assert f"data.train.hf.path acme/sums at revision 'v2': present in {snapshot}" in out
    assert "acme/sums:easy:train: 6 items" in out
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the next run finds it in the cache, offline too
    code, _, err = _main(capsys, model_dir, *args)
    assert code == 0, err
    assert [event[0] for event in downloads.events] == ["download", "workers start", "workers start"]


@pytest.mark.parametrize("section", ["train", "validation"])
def test_offline_an_absent_dataset_stops_the_run_and_the_dry_run_with_one_line(section, offline_hub, tmp_path, model_dir,
                                                                                 capsys, monkeypatch):
    monkeypatch.setattr(entry, "run_training", lambda *args: pytest.fail("workers started without the dataset"))
    args = [f"run.output_dir={tmp_path / 'run'}", *hf_overrides(REPO_ID)]
    if section == "validation":  # the training data is a file here; the held-out set is the hub dataset
        train = tmp_path / "train.jsonl"
        train.write_text('{"prompt": "1 + 1?", "answer": "2"}\n')
        fields = "fields: {id: null, prompt: question, messages: null, answer: final, family: null}"
        args = [f"run.output_dir={tmp_path / 'run'}", "data.train.kind=file", f"data.train.file.path={train}",
                "++data.validation={kind: hf, family: math, reasoning_gym: {name: basic_arithmetic, size: 1, seed: 0, "
                f"options: {{}}}}, file: {{path: null, format: auto, split: null, {fields}}}, hf: {{path: {REPO_ID}, "
                f"name: null, split: test, revision: null, {fields}}}}}"]
    dry = _main(capsys, model_dir, *args, dry_run=True)
    run = _main(capsys, model_dir, *args)
    assert dry[0] == run[0] == 2 and dry[2] == run[2]
    assert run[2].strip() == (f"data error: data.{section}.hf.path: dataset 'acme/sums' is not in the Hugging Face "
                              f"cache {offline_hub} and HF_HUB_OFFLINE=1 forbids downloading it: download it into that cache "
                              "first (hf download acme/sums --repo-type dataset)")
    assert "preflight passed" not in dry[1]


def test_a_failed_download_is_one_line_naming_the_dataset(offline_hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(repo_id, *, repo_type=None, revision=None):
        assert repo_type == "dataset"
        raise OSError("Connection refused")

    with pytest.raises(DataError) as caught:
        fetch_dataset(REPO_ID, "v2", key="data.train.hf.path", download=unreachable)
    assert str(caught.value) == (f"data.train.hf.path: downloading dataset '{REPO_ID}' at revision 'v2' into "
                                 f"{offline_hub} failed: OSError: Connection refused")
