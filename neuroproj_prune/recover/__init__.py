"""The `recover` stage: distil the dense model back into a pruned checkpoint (KL on logits; full or LoRA)."""
from .distill import RecoverConfig, recover

__all__ = ["RecoverConfig", "recover"]
