"""A feature cache on disk: safetensors shards, a JSON manifest per shard, and the metadata of
everything that changes the features (see `format.py` for the layout and its guarantees).

    from vision_tower.cache import FeatureCache
    cache = FeatureCache("cache/clip336", feature="patch")
    feats = cache["00453/004539375.jpg"]          # (576, 1024), memory-mapped
"""

from ..errors import CacheError
from .format import (
    FORMAT, HEADER_RESERVE, VERSION, ShardWriter, cache_metadata, check_or_write_metadata, file_sha256, manifest_path,
    PLAN_FILE, open_rows, read_plan, shard_header, shard_index, shard_manifest, shard_name, write_json_atomic,
)
from .reader import (
    CacheDataset, FeatureCache, Views, check_committed, inspect_cache, read_metadata, restore_metadata,
)
from .writer import CacheWriter, RankLock, clean_shard, resume_plan, shard_files

__all__ = [
    "FeatureCache", "CacheDataset", "CacheWriter", "RankLock", "CacheError", "ShardWriter", "inspect_cache",
    "check_committed", "read_metadata", "restore_metadata", "Views", "FORMAT", "VERSION",
    "HEADER_RESERVE", "cache_metadata", "check_or_write_metadata", "clean_shard", "file_sha256", "open_rows",
    "manifest_path", "shard_header", "shard_manifest", "shard_name", "write_json_atomic", "resume_plan", "shard_files",
    "shard_index", "read_plan", "PLAN_FILE",
]
