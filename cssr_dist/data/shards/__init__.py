"""WebDataset shards: the index (`index`), tar reading (`tar`), writing (`writer`), raw
listings of on-disk data sets (`sources`), the rank/worker-aware stream (`stream`) and the
command line behind `tools/make_shards.py` (`cli`)."""

from .index import ShardIndex, read_index
from .stream import ShardLoader, build_shard_loaders, iter_shard

__all__ = ["ShardIndex", "ShardLoader", "build_shard_loaders", "iter_shard", "read_index"]
