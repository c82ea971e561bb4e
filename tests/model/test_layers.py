import math

import torch

from bagel import flow
from bagel.model.layers import RMSNorm, apply_rope, rope_cos_sin, sincos_2d_table, timestep_features


def test_sincos_tables_equal_the_stored_official_ones(official_dir):
    from safetensors.torch import load_file

    state = load_file(str(official_dir / "ema.safetensors"))
    assert torch.equal(sincos_2d_table(16, 64), state["latent_pos_embed.pos_embed"])
    assert torch.equal(sincos_2d_table(16, 64), state["vit_pos_embed.pos_embed"])


def test_rms_norm_fast_path_is_the_qwen2_formula_bit_for_bit():
    """fp32 RMSNorm runs one fused op; it gives Qwen2's float32 formula exactly, forward and
    backward, so fixture parity and training numerics do not move."""
    g = torch.Generator().manual_seed(0)
    norm = RMSNorm(32, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(32, generator=g))
    x = torch.randn(5, 3, 32, generator=g, requires_grad=True)
    upstream = torch.randn(5, 3, 32, generator=g)

    def qwen2(x):
        x32 = x.float()
        return norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)

    fast, ref = norm(x), qwen2(x)
    assert torch.equal(fast, ref)
    for a, b in zip(torch.autograd.grad(fast, (x, norm.weight), upstream),
                    torch.autograd.grad(ref, (x, norm.weight), upstream)):
        assert torch.equal(a, b)


def test_sincos_layout_column_first():
    t = sincos_2d_table(4, 8)  # D/4 = 2 frequencies; w_0 = 1
    r, c = 2, 3
    row = t[r * 4 + c]
    assert math.isclose(row[0].item(), math.sin(c), abs_tol=1e-6)  # first half encodes the column
    assert math.isclose(row[4].item(), math.sin(r), abs_tol=1e-6)


def test_rope_relative_property():
    """q.k after RoPE depends only on the position difference."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 1, 16, generator=g), torch.randn(1, 1, 16, generator=g)
    def dot(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), 16, 1e6, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([pk]), 16, 1e6, torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    torch.testing.assert_close(dot(5, 2), dot(103, 100))


def test_rope_is_qwen2_rotate_half_bit_for_bit():
    """The sign folded into the sin table changes nothing: forward and backward are Qwen2's
    x * cos + rotate_half(x) * sin with the textbook tables, bit for bit."""
    g = torch.Generator().manual_seed(0)
    pos, d = torch.randint(0, 5000, (64,), generator=g), 32
    x = torch.randn(64, 4, d, generator=g, requires_grad=True)
    inv = 1.0 / (1e6 ** (torch.arange(0, d, 2).float() / d))
    emb = torch.cat([pos.float()[:, None] * inv] * 2, dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    ref = x * emb.cos()[:, None] + torch.cat([-x2, x1], dim=-1) * emb.sin()[:, None]
    ours = apply_rope(x, *rope_cos_sin(pos, d, 1e6, torch.float32))
    assert torch.equal(ours, ref)
    grad = torch.randn(ref.shape, generator=g)
    assert torch.equal(torch.autograd.grad(ours, x, grad)[0], torch.autograd.grad(ref, x, grad)[0])


def test_timestep_features_cos_first_no_scaling():
    f = timestep_features(torch.tensor([0.5]), 256)
    assert math.isclose(f[0, 0].item(), math.cos(0.5), abs_tol=1e-6)  # f_0 = 1, t not x1000
    assert math.isclose(f[0, 128].item(), math.sin(0.5), abs_tol=1e-6)


def test_flow_conventions():
    x0, eps = torch.randn(5, 4), torch.randn(5, 4)
    t = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0])
    xt = flow.add_noise(x0, eps, t)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[-1], eps[-1])
    # the velocity target moves x_t along t: x_t + dt * v = x_{t+dt}
    v = flow.velocity_target(x0, eps)
    torch.testing.assert_close(flow.add_noise(x0, eps, t + 0.1), xt + 0.1 * v)
    # an exact velocity integrates back to the data
    x = eps.clone()
    grid = flow.sampling_timesteps(7, 3.0)
    for i in range(len(grid) - 1):
        x = flow.euler_step(x, v, grid[i], grid[i + 1])
    torch.testing.assert_close(x, x0, atol=1e-5, rtol=1e-5)


def test_guidance_of_a_batch_of_images_is_per_image():
    """apply_cfg over (B, N, C) (a denoising step's images at once) equals B calls on (N, C): the
    global renorm is taken per image, never over the batch."""
    g = torch.Generator().manual_seed(0)
    v, v_text, v_img = (torch.randn(3, 12, 16, generator=g) * (1 + torch.arange(3.0))[:, None, None] for _ in range(3))
    for renorm in flow.RENORM_TYPES:
        batch = flow.apply_cfg(v, v_text, v_img, 4.0, 1.5, renorm, 0.0)
        for b in range(3):
            one = flow.apply_cfg(v[b], v_text[b], v_img[b], 4.0, 1.5, renorm, 0.0)
            torch.testing.assert_close(batch[b], one, atol=1e-6, rtol=1e-6)
    one_norm = flow.apply_cfg(v.flatten(0, 1), v_text.flatten(0, 1), v_img.flatten(0, 1), 4.0, 1.5, "global", 0.0)
    assert not torch.allclose(flow.apply_cfg(v, v_text, v_img, 4.0, 1.5, "global", 0.0), one_norm.view(3, 12, 16))


def test_shift_and_grid_match_fixture(reference):
    grid = flow.sampling_timesteps(7, 3.0)
    torch.testing.assert_close(grid[:-1], torch.tensor(reference.meta["infer"]["t2i"]["steps_t"]))
    assert float(flow.shift_timesteps(torch.tensor(0.5), 1.0)) == 0.5
    torch.testing.assert_close(flow.timesteps_from_logits(torch.tensor([float("-inf"), 0.0]), 2.0),
                               torch.tensor([0.0, 2 / 3]))
