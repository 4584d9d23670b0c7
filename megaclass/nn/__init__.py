"""Modules built on the fused op: the class-sharded classifier, its top-k, clipping and checkpoint shards;
dropout keyed per sample."""
from megaclass.nn.checkpoint import head_shard_state, load_head_shard, save_head_shard
from megaclass.nn.dropout import row_seeded_dropout
from megaclass.nn.sharded import ShardedLinearCrossEntropy, clip_head_grad_, shard_range, sharded_topk

__all__ = ["ShardedLinearCrossEntropy", "clip_head_grad_", "head_shard_state", "load_head_shard", "row_seeded_dropout",
           "save_head_shard", "shard_range", "sharded_topk"]
