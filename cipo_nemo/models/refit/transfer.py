"""The refit as the controller calls it: policy -> generation engines, once per step, by one transport.

Memory order for a colocated engine, which sleeps when the refit starts (NeMo-RL's refit order): with the file
transport the policy exports while the engine sleeps and then returns its cached device memory; the engine wakes
its weights only and reloads them; its KV cache, the largest allocation, comes back last, once the export's
transient is gone.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cipo_nemo.models.interfaces import GenerationBackend, PolicyBackend
from cipo_nemo.models.refit.profile import RefitProfile

_SHARED_MEMORY = Path("/dev/shm")


@contextmanager
def refit_file() -> Iterator[Path]:
    """A fresh path for one weight hand-off (in /dev/shm when there is one), removed afterwards."""
    directory = Path(tempfile.mkdtemp(prefix="cipo-refit-", dir=_SHARED_MEMORY if _SHARED_MEMORY.is_dir() else None))
    try:
        yield directory / "weights.pt"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def refit_weights(policy: PolicyBackend, generation: GenerationBackend) -> int:
    """Policy -> generation through one file per node: each node's first policy rank writes the HF-named
    weights, every engine loads its node's copy, then every copy is removed (refit_file only sees this node).

    Memory order for a colocated engine, which sleeps when this starts (NeMo-RL's refit order): the policy
    exports while the engine sleeps and then returns its cached device memory; the engine wakes its weights only
    and reloads them; its KV cache, the largest allocation, comes back last, once the export's transient is gone.
    """
    profile = RefitProfile("driver")
    with refit_file() as path:
        with profile.stage("export"):
            policy.export_hf_weights_to(path)
        try:
            generation.wake(tags=("weights",))
            with profile.stage("load"):
                count = generation.update_weights_from_path(path)
        finally:
            with profile.stage("remove"):
                policy.remove_exported_weights(path)
    generation.wake(tags=("kv_cache",))
    profile.write()
    return count
