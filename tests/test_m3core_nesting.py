import pytest
import torch

from m3core.config import NestingConfig, query_scales
from m3core.nesting import QueryNesting, pool_grid, pool_scales


def test_pool_scales_follow_the_m3_chain():
    assert pool_scales(24) == (1, 9, 36, 144, 576)
    assert pool_scales(12) == (1, 9, 36, 144)
    assert pool_scales(4) == (1, 4, 16)


def test_pooling_equals_block_means():
    grid = torch.arange(2 * 144 * 3, dtype=torch.float32).reshape(2, 144, 3)
    pooled = pool_grid(grid, 9)
    maps = grid.reshape(2, 12, 12, 3)
    for row in range(3):
        for col in range(3):
            block = maps[:, row * 4 : row * 4 + 4, col * 4 : col * 4 + 4].reshape(2, 16, 3)
            assert torch.allclose(pooled[:, row * 3 + col], block.mean(1))


def test_one_token_is_the_grid_mean_and_full_scale_is_identity():
    grid = torch.randn(3, 144, 5)
    assert torch.allclose(pool_grid(grid, 1)[:, 0], grid.mean(1), atol=1e-6)
    assert torch.equal(pool_grid(grid, 144), grid)


def test_pooling_rejects_a_scale_that_does_not_tile_the_grid():
    with pytest.raises(ValueError, match="cannot pool"):
        pool_grid(torch.randn(1, 144, 2), 25)


def test_first_queries_do_not_depend_on_how_many_run():
    torch.manual_seed(0)
    nesting = QueryNesting(dim=16, num_queries=8, num_heads=2).eval()
    grid = torch.randn(2, 25, 16)
    assert torch.allclose(nesting(grid, 3), nesting(grid)[:, :3], atol=1e-6)


def test_query_scales_and_config_checks():
    assert query_scales(64) == (1, 2, 4, 8, 16, 32, 64)
    with pytest.raises(ValueError, match="1..8"):
        NestingConfig(kind="query", num_queries=8, scales=(1, 16))
    with pytest.raises(ValueError, match="pool' or 'query"):
        NestingConfig(kind="tiles")
