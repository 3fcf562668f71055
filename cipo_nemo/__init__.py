"""cipo_nemo: CIPO (Correction-Oriented Policy Optimization) on Megatron-core, vLLM and Ray.

CIPO is not CISPO: NeMo-RL, TRL and verl ship "CISPO" (MiniMax-M1's clipped-IS loss), a different method.
"""

__version__ = "0.1.0"
