"""Policy backends: the Megatron worker (one per rank, TP/PP/DP) and the in-process Hugging Face policy.

Importing this package does not import megatron; the Megatron worker imports it (after the CPU compatibility
patches, cpu_compat.py) when it is built.
"""

from cipo_nemo.models.policy.hf_policy import HFPolicy
from cipo_nemo.models.policy.megatron_worker import MegatronPolicyWorker

__all__ = ["HFPolicy", "MegatronPolicyWorker"]
