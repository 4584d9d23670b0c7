"""Modules built on the fused op."""
from megaclass.nn.sharded import ShardedLinearCrossEntropy, shard_range

__all__ = ["ShardedLinearCrossEntropy", "shard_range"]
