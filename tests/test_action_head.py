"""Flow-matching DiT head: objective, Euler integration and time sampling against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from modeling_vipa.action_head import VipaActionHead, timestep_embedding
from modeling_vipa.configuration_vipa import VipaActionHeadConfig


def _head(**overrides) -> VipaActionHead:
    torch.manual_seed(0)
    return VipaActionHead(VipaActionHeadConfig.tiny(**overrides), cond_dim=24)


def test_timestep_embedding_formula() -> None:
    tau = torch.tensor([0.0, 0.25, 0.9])
    got = timestep_embedding(tau, 8, scale=1000.0).numpy()
    w = 10000.0 ** (-np.arange(4) / 4)
    ang = 1000.0 * tau.numpy()[:, None] * w[None]
    np.testing.assert_allclose(got, np.concatenate([np.cos(ang), np.sin(ang)], -1), rtol=1e-5, atol=1e-5)


def test_loss_is_mse_to_a_minus_eps_at_the_interpolated_point() -> None:
    head = _head()
    h_cond, state = torch.randn(3, 4, 24), torch.randn(3, 8)
    a, eps, tau = torch.randn(3, 4, 7), torch.randn(3, 4, 7), torch.tensor([0.1, 0.5, 0.8])
    captured = {}
    original = head.forward

    def spy(noisy, t, s, h, m=None, **kw):
        captured["noisy"], captured["tau"] = noisy.clone(), t.clone()
        return original(noisy, t, s, h, m, **kw)

    head.forward = spy
    loss = head.flow_matching_loss(h_cond, state, a, noise=eps, tau=tau)
    an, en, tn = a.double().numpy(), eps.double().numpy(), tau.double().numpy()[:, None, None]
    np.testing.assert_allclose(captured["noisy"].numpy(), (1 - tn) * en + tn * an, rtol=1e-6, atol=1e-6)
    v = original(captured["noisy"], tau, state, h_cond).detach().double().numpy()
    np.testing.assert_allclose(float(loss), np.mean((v - (an - en)) ** 2), rtol=1e-5)


@pytest.mark.parametrize("steps", [1, 4, 10])
def test_euler_integration_of_known_fields(steps: int) -> None:
    head = _head()
    eps = torch.randn(2, 4, 7)
    h_cond, state = torch.randn(2, 4, 24), torch.randn(2, 8)
    # v = -a: Euler gives (1 - 1/N)^N eps
    head.forward = lambda a, tau, s, h, m=None, **kw: -a
    got = head.sample(h_cond, state, num_steps=steps, noise=eps)
    np.testing.assert_allclose(got.numpy(), (1 - 1 / steps) ** steps * eps.numpy(), rtol=1e-5, atol=1e-6)
    # v = tau: the steps sample tau = 0, 1/N, ..., (N-1)/N, so a = eps + sum_i (i/N)(1/N) = eps + (N-1)/(2N)
    head.forward = lambda a, tau, s, h, m=None, **kw: tau[:, None, None].expand_as(a)
    got = head.sample(h_cond, state, num_steps=steps, noise=eps)
    np.testing.assert_allclose(got.numpy(), eps.numpy() + (steps - 1) / (2 * steps), rtol=1e-5, atol=1e-6)


def test_sample_with_the_conditioning_computed_once_equals_the_plain_euler_loop() -> None:
    """`sample` computes the state token and the cross-attention K/V once; the result must equal Euler steps
    that each run the whole head from (state, h_cond)."""
    torch.manual_seed(0)
    head = _head().eval()
    h_cond, state, eps = torch.randn(2, 4, 24), torch.randn(2, 8), torch.randn(2, 4, 7)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    got = head.sample(h_cond, state, num_steps=5, noise=eps, cond_mask=mask)
    a = eps.clone()
    with torch.no_grad():
        for i in range(5):
            a = a + 0.2 * head(a, torch.full((2,), i * 0.2), state, h_cond, mask)
    np.testing.assert_allclose(got.numpy(), a.numpy(), rtol=1e-5, atol=1e-6)


def test_exact_flow_reaches_the_target_from_noise() -> None:
    """With v = a* - eps (the flow-matching target) the integrated chunk is a* for any N."""
    head = _head()
    eps, target = torch.randn(1, 4, 7), torch.randn(1, 4, 7)
    head.forward = lambda a, tau, s, h, m=None, **kw: (target - eps).expand_as(a)
    got = head.sample(torch.randn(1, 4, 24), torch.randn(1, 8), num_steps=7, noise=eps)
    np.testing.assert_allclose(got.numpy(), target.numpy(), rtol=1e-5, atol=1e-5)


def test_head_learns_a_state_conditioned_chunk() -> None:
    head = _head()
    opt = torch.optim.AdamW(head.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    state = torch.randn(8, 8, generator=gen)
    actions = torch.tanh(state[:, :7])[:, None].expand(8, 4, 7).contiguous()
    h_cond = torch.randn(8, 4, 24, generator=gen)

    def eval_loss() -> float:
        g = torch.Generator().manual_seed(1)
        eps, tau = torch.randn(8, 4, 7, generator=g), torch.rand(8, generator=g)
        with torch.no_grad():
            return float(head.flow_matching_loss(h_cond, state, actions, noise=eps, tau=tau))

    before = eval_loss()
    for _ in range(60):
        opt.zero_grad()
        head.flow_matching_loss(h_cond, state, actions).backward()
        opt.step()
    assert eval_loss() < 0.6 * before


def test_beta_time_sampling_matches_scipy() -> None:
    head = _head(time_sampling="beta", beta_alpha=1.5, beta_beta=1.0, time_max=0.999)
    torch.manual_seed(3)
    tau = head.sample_tau(20000, torch.device("cpu")).numpy()
    assert tau.min() >= 0 and tau.max() <= 0.999
    ref = stats.beta(1.5, 1.0)
    assert stats.kstest(tau / 0.999, ref.cdf).pvalue > 1e-3
    uniform = _head().sample_tau(20000, torch.device("cpu")).numpy()
    assert stats.kstest(uniform, "uniform").pvalue > 1e-3


def test_bad_shapes_say_what_was_expected() -> None:
    head = _head()
    h_cond = torch.randn(2, 4, 24)
    with pytest.raises(ValueError, match=r"state must have shape \(2, 8\).*got \(2, 6\)"):
        head.flow_matching_loss(h_cond, torch.randn(2, 6), torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match=r"horizon.*got \(2, 5, 7\)"):
        head.flow_matching_loss(h_cond, torch.randn(2, 8), torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="NaN"):
        head.flow_matching_loss(h_cond, torch.full((2, 8), float("nan")), torch.randn(2, 4, 7))
    with pytest.raises(ValueError, match="num_steps"):
        head.sample(h_cond, torch.randn(2, 8), num_steps=0)
    with pytest.raises(ValueError, match="time_sampling"):
        VipaActionHeadConfig(time_sampling="logit_normal")
    with pytest.raises(ValueError, match="hidden_size"):
        VipaActionHeadConfig(hidden_size=30, num_heads=4)
