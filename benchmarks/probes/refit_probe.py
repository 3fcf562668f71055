"""Where the engine side of a refit spends its time: one vLLM engine on the benchmark's model, N refits from a refit
file of the model's own weights, with cProfile inside the vLLM worker around each reload (docs/notes/refit.md).

    flock /tmp/cipo_heavy.lock python benchmarks/probes/refit_probe.py [--model-dir DIR] [--refits 3]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from cipo_nemo.models.refit.vllm_worker import VllmRefitWorkerExtension  # noqa: E402


class ProfilingRefitExtension(VllmRefitWorkerExtension):
    def profiled_reload(self, path: str, top: int, shortcut: bool) -> str:
        profiler = cProfile.Profile()
        started = time.perf_counter()
        profiler.enable()
        self.reload_weights_from_file(path, shortcut)
        profiler.disable()
        elapsed = time.perf_counter() - started
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(top)
        stats = out.getvalue() if top else ""
        return f"reload_weights_from_file(shortcut={shortcut}) {elapsed:.3f} s\n{stats}"

    def refit_mappings(self) -> int:
        """Refit files still mapped by this worker (a removed file stays in /dev/shm while any view maps it)."""
        return sum("cipo_refit" in line for line in Path("/proc/self/maps").read_text().splitlines())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model-dir", default=None)
    parser.add_argument("--refits", type=int, default=3)
    parser.add_argument("--top", type=int, default=45)
    args = parser.parse_args()
    from safetensors.torch import load_file

    from cipo_nemo.config import load_config
    from cipo_nemo.models.generation import vllm_generation
    from cipo_nemo.models.refit.shm_file import remove_refit_file, save_weights_for_refit
    from cipo_nemo.models.hub import resolve_model_dir

    cfg = load_config(Path(__file__).resolve().parents[2] / "conf" / "cipo_smollm2_cpu.yaml")
    model_dir = args.model_dir or str(resolve_model_dir(cfg.policy.model_name))
    module = __name__ if __name__ != "__main__" else "benchmarks.probes.refit_probe"
    vllm_generation.REFIT_EXTENSION = f"{module}.ProfilingRefitExtension"
    engine = vllm_generation.VllmGeneration(model_dir=model_dir, generation=cfg.generation, max_model_len=512, seed=0)
    weights = {name: t for name, t in load_file(str(Path(model_dir) / "model.safetensors")).items()
               if name != "lm_head.weight"}
    compare_formats(weights, repeats=args.refits)
    try:
        for _ in range(args.refits):
            started = time.perf_counter()
            path = save_weights_for_refit(weights.items())
            written = time.perf_counter() - started
            for shortcut in (False, True):
                (report, *_) = engine._engine.collective_rpc("profiled_reload", args=(str(path), args.top, shortcut))
                print(f"write {written:.3f} s; {report}", flush=True)
            remove_refit_file(path)
            print(f"refit files still mapped by the worker: {engine._engine.collective_rpc('refit_mappings')}",
                  flush=True)
    finally:
        engine.shutdown()


def compare_formats(weights: dict, *, repeats: int) -> None:
    """The policy side's hand-off alone: the torch.save file (an owning copy first, as the exporter made) against
    the raw refit file, each written fresh to /dev/shm and then read back in full through its memory map."""
    import os

    import torch

    from cipo_nemo.models.refit.shm_file import load_refit_file, write_refit_file

    path = Path("/dev/shm/cipo_refit_probe.bin")
    for _ in range(repeats):
        started = time.perf_counter()
        torch.save({name: t.clone() for name, t in weights.items()}, path)
        saved = time.perf_counter() - started
        started = time.perf_counter()
        loaded = torch.load(path, mmap=True, weights_only=True)
        total = sum(float(t.sum()) for t in loaded.values())
        read = time.perf_counter() - started
        os.unlink(path)
        started = time.perf_counter()
        write_refit_file(path, weights.items())
        written = time.perf_counter() - started
        started = time.perf_counter()
        total_raw = sum(float(t.sum()) for t in load_refit_file(path).values())
        read_raw = time.perf_counter() - started
        os.unlink(path)
        assert total == total_raw
        print(f"clone+torch.save {saved:.3f} s, torch.load(mmap)+read {read:.3f} s | raw write {written:.3f} s, "
              f"raw map+read {read_raw:.3f} s", flush=True)


if __name__ == "__main__":
    main()
