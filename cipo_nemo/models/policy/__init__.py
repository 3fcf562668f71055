"""Policy backends: the Megatron worker (megatron_worker.py, one per rank, TP/PP/DP) and the in-process Hugging Face
policy (hf_policy.py).

Importing this package imports neither of them, nor megatron or the config (pydantic): the GPU check uses its
torch-only modules (chunked_logprobs.py) on machines without them. The Megatron worker imports megatron (after the
CPU compatibility patches, cpu_compat.py) when it is built.
"""
