"""ParallelDims refuses bad layouts before anything is allocated, naming the numbers."""

import pytest

from rlhf_engine.models import TransformerConfig
from rlhf_engine.parallel import LayoutError, ParallelDims


def test_fill_and_world_size_mismatch():
    assert ParallelDims(dp_replicate=2, dp_shard=-1, pp=4, tp=8, world_size=1024).dp_shard == 16
    with pytest.raises(LayoutError, match=r"2\*3\*1\*2 = 12, but the world size is 8"):
        ParallelDims(dp_replicate=2, dp_shard=3, pp=1, tp=2, world_size=8)
    with pytest.raises(LayoutError, match=r"world size 10 is not divisible by dp_replicate\*pp\*tp = 1\*1\*4 = 4"):
        ParallelDims(dp_replicate=1, dp_shard=-1, pp=1, tp=4, world_size=10)


def test_indivisible_model_names_every_problem():
    cfg = TransformerConfig(vocab_size=1031, hidden_size=96, intermediate_size=250, num_layers=5, num_heads=12,
                            num_kv_heads=2)
    with pytest.raises(LayoutError) as exc:
        ParallelDims(dp_replicate=1, dp_shard=1, pp=2, tp=4, world_size=8).check_model(cfg, stages=3)
    msg = str(exc.value)
    for part in ("num_kv_heads=2 is not divisible by tp=4", "intermediate_size=250 is not divisible by tp=4",
                 "vocab_size=1031 is not divisible by tp=4", "num_layers=5 is fewer than the 6 pipeline stages"):
        assert part in msg
    assert "num_heads" not in msg  # 12 heads split fine
    # layers need not divide evenly over the stages: 5 layers on pp=2 is a 3 + 2 (or cost-balanced) split
    ParallelDims(dp_replicate=1, dp_shard=1, pp=2, tp=1, world_size=2).check_model(cfg)
