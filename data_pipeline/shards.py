"""The shard format lives in llmforge.common.shards (shared by both halves); re-exported for the pipeline."""
from llmforge.common.shards import *  # noqa: F401,F403
from llmforge.common.shards import (CODE_OF, DTYPE_CODES, MAGIC, STATS_EXT, IndexedShard, ShardWriter,  # noqa: F401
                                    merge_shards, shard_max_id, token_dtype, write_index, write_sidecar)
