"""A non-editable install works: the wheel ships conf/ (the default config is found from site-packages) and the
`cipo-nemo` console script, and its dry run passes from a directory outside the checkout."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _build_and_install(tmp_path: Path) -> Path:
    wheel_dir, target = tmp_path / "wheel", tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--quiet"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", str(REPO), "-w", str(wheel_dir)],
                   cwd=tmp_path, check=True)
    (wheel,) = wheel_dir.glob("cipo_nemo-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "cipo_nemo/conf/cipo_smollm2_cpu.yaml" in names and "cipo_nemo/conf/data/code_stdio_sample.jsonl" in names
    subprocess.run([*pip, "install", "--no-deps", "--target", str(target), str(wheel)], check=True)
    return target


def test_wheel_install_finds_its_default_config_and_dry_runs(tmp_path):
    target = _build_and_install(tmp_path)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target)}
    where = subprocess.run([sys.executable, "-c", "import cipo_nemo.__main__ as m; print(m.__file__); "
                            "print(m.DEFAULT_CONFIG)"], cwd=outside, env=env, capture_output=True, text=True, check=True)
    module_file, default_config = where.stdout.split()
    assert module_file.startswith(str(target)) and default_config.startswith(str(target))  # not the checkout
    result = subprocess.run([sys.executable, str(target / "bin" / "cipo-nemo"), "--dry-run", "grpo.num_steps=1",
                             "data.train.reasoning_gym.size=8"], cwd=outside, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dry run: preflight passed" in result.stdout
    assert f"{target}/cipo_nemo/conf/cipo_smollm2_cpu.yaml" in result.stdout  # the run line names the config used
