import math

import pytest
import torch
import torch.nn.functional as F

from m3core.config import NestingConfig, query_scales
from m3core.nesting import QueryBlock, Resampler, pool_grid, pool_scales


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
    nesting = QueryBlock(dim=16, num_queries=8, num_heads=2).eval()
    grid = torch.randn(2, 25, 16)
    assert torch.allclose(nesting(grid, 3), nesting(grid)[:, :3], atol=1e-6)


def test_query_scales_and_config_checks():
    assert query_scales(64) == (1, 2, 4, 8, 16, 32, 64)
    with pytest.raises(ValueError, match="1..8"):
        NestingConfig(kind="query", num_queries=8, scales=(1, 16))
    with pytest.raises(ValueError, match="nesting kind must be one of"):
        NestingConfig(kind="tiles")


def resampler_equations(weights: dict, features: torch.Tensor, m: int, grid: int) -> torch.Tensor:
    """MQT-LLaVA's Resampler written out: queries ln_q(query + pos), keys ln_k(pos resized to
    the tower's grid), values ln_v(features), one 16-or-h-head attention, out_proj, then proj."""
    pos = weights["pos_embed"].float()
    width = pos.shape[1]
    side = math.isqrt(pos.shape[0])
    maps = pos.reshape(1, side, side, width).permute(0, 3, 1, 2)
    resized = F.interpolate(maps, size=(grid, grid), mode="bicubic", align_corners=False)
    key_pos = resized.permute(0, 2, 3, 1).reshape(grid * grid, width)

    def norm(x, name):
        mean = x.mean(-1, keepdim=True)
        var = x.var(-1, unbiased=False, keepdim=True)
        scaled = (x - mean) / torch.sqrt(var + 1e-6)
        return scaled * weights[f"{name}.weight"] + weights[f"{name}.bias"]

    q_in = norm(weights["query"][:m] + pos[:m], "ln_q")
    k_in = norm(key_pos, "ln_k")
    v_in = norm(features, "ln_v")
    wq, wk, wv = weights["attn.in_proj_weight"].chunk(3)
    bq, bk, bv = weights["attn.in_proj_bias"].chunk(3)
    q, k, v = q_in @ wq.T + bq, k_in @ wk.T + bk, v_in @ wv.T + bv
    heads = weights["heads"]
    dh = width // heads
    out = []
    for h in range(heads):
        cols = slice(h * dh, (h + 1) * dh)
        scores = q[:, cols] @ k[:, cols].T / math.sqrt(dh)  # (m, L): the same for every image
        out.append(scores.softmax(-1) @ v[..., cols])  # (N, m, dh)
    attended = torch.cat(out, -1) @ weights["attn.out_proj.weight"].T
    return (attended + weights["attn.out_proj.bias"]) @ weights["proj"]


def test_resampler_follows_mqt_llava_equations_and_keeps_the_first_queries():
    torch.manual_seed(0)
    module = Resampler(kv_dim=16, embed_dim=12, num_queries=16, num_heads=4, grid_side=6).eval()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    weights = {k: v.detach() for k, v in module.state_dict().items()} | {"heads": 4}
    features = torch.randn(2, 36, 16)
    with torch.no_grad():
        full = module(features)
        for m in (1, 3, 16):
            expected = resampler_equations(weights, features, m, 6)
            torch.testing.assert_close(module(features, m), expected, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(full[:, :m], expected, atol=1e-5, rtol=1e-5)


def test_resampler_position_embedding_is_mqt_llavas_sincos():
    module = Resampler(kv_dim=8, embed_dim=4, num_queries=4, num_heads=2, grid_side=3)
    pos = module.pos_embed  # rows: cells (0,0), (0,1), (1,0), (1,1); first half: the column
    omega = torch.tensor([1.0, 1.0 / 100.0])
    for cell, (row, col) in enumerate([(0, 0), (0, 1), (1, 0), (1, 1)]):
        expected = torch.cat(
            [(col * omega).sin(), (col * omega).cos(), (row * omega).sin(), (row * omega).cos()]
        )
        torch.testing.assert_close(pos[cell], expected)
