"""The GRPO objective against hand-computed values."""

import math

import pytest
import torch

from bagel.train.grpo import clipped_objective, gaussian_kl, group_advantages, policy_loss


def test_group_advantages_by_hand():
    r = torch.tensor([1.0, 0.0, 0.5, 0.5, 2.0, 2.0])
    adv = group_advantages(r, group_size=3, eps=0.0 + 1e-12)
    # group 1: mean 0.5, population std sqrt(1/6)
    s1 = math.sqrt(((0.5) ** 2 + (0.5) ** 2 + 0) / 3)
    assert adv[:3].tolist() == pytest.approx([0.5 / s1, -0.5 / s1, 0.0], rel=1e-6)
    # group 2: 0.5, 2, 2 -> mean 1.5, std sqrt((1 + 0.25 + 0.25) / 3)
    s2 = math.sqrt(1.5 / 3)
    assert adv[3:].tolist() == pytest.approx([-1.0 / s2, 0.5 / s2, 0.5 / s2], rel=1e-6)
    assert group_advantages(torch.tensor([3.0, 3.0]), 2).tolist() == [0.0, 0.0]  # equal rewards teach nothing


def test_group_advantages_refuse_bad_groups():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="do not split into groups of 3"):
        group_advantages(torch.ones(4), 3)


def test_clipped_objective_by_hand():
    # two steps x two samples; advantages +1 and -2; clip 0.2
    logp_old = torch.zeros(2, 2)
    ratios = torch.tensor([[1.5, 1.5], [0.5, 1.1]])
    logp_new = ratios.log().requires_grad_()
    adv = torch.tensor([1.0, -2.0])
    loss, ratio, clipped = clipped_objective(logp_new, logp_old, adv, clip=0.2)
    # per term: min(r A, clip(r) A)
    terms = [min(1.5 * 1, 1.2 * 1), min(1.5 * -2, 1.2 * -2), min(0.5 * 1, 0.8 * 1), min(1.1 * -2, 1.1 * -2)]
    assert loss.item() == pytest.approx(-sum(terms) / 4, rel=1e-6)
    assert clipped.tolist() == [[True, False], [False, False]]
    loss.backward()
    # d/dlogp of -r*A/4 where the unclipped term is chosen, 0 where the clipped one is
    expected = torch.tensor([[0.0, -(1.5 * -2) / 4], [-(0.5 * 1) / 4, -(1.1 * -2) / 4]])
    torch.testing.assert_close(logp_new.grad, expected)
    assert torch.allclose(ratio, ratios)


def test_kl_of_equal_std_gaussians_by_hand():
    mean = torch.tensor([[1.0, 2.0], [0.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0], [0.0, 3.0]])
    kl = gaussian_kl(mean, ref, std=0.5)
    assert kl.tolist() == pytest.approx([(1 + 4) / 2 / (2 * 0.25), 9 / 2 / (2 * 0.25)])
    # the closed form agrees with torch's Normal KL, averaged per element
    d = torch.distributions
    exact = d.kl_divergence(d.Normal(mean, 0.5), d.Normal(ref, 0.5)).mean(1)
    torch.testing.assert_close(kl, exact)


def test_policy_loss_adds_the_weighted_kl():
    logp = torch.zeros(1, 2, requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    kl = torch.tensor([[0.2, 0.4]])
    out = policy_loss(logp, torch.zeros(1, 2), adv, clip=0.2, kl=kl, kl_weight=0.5)
    assert out.loss.item() == pytest.approx(0.0 + 0.5 * 0.3)
    assert out.ratio_mean == 1.0 and out.clip_fraction == 0.0 and out.kl == pytest.approx(0.3)
