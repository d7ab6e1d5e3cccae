"""AttentionDiffusionUNet: shapes, timestep and text conditioning, attention gates, checkpointing, export;
MeanPredictionUNet, the same denoiser as an image-to-image network."""

from __future__ import annotations

import pytest
import torch
from monai.networks.blocks import SpatialAttentionBlock

from custom.networks import AttentionDiffusionUNet, AttentionGate, MeanPredictionUNet, mean_prediction_input

pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny(**kwargs) -> AttentionDiffusionUNet:
    torch.manual_seed(0)
    args = dict(channels=(8, 16, 32), attention_levels=(False, True, True), norm_num_groups=4, num_head_channels=8,
                context_dim=12)
    return AttentionDiffusionUNet(**{**args, **kwargs})


def _perturb(net: torch.nn.Module) -> None:
    """Move every weight, so the zero-initialised fusion outputs no longer hide the context."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def test_output_shape_and_timestep_dependence():
    net = _tiny().eval()
    _perturb(net)  # MONAI zero-initialises the last convolution of each residual block
    x = torch.rand(2, 2, 16, 24, 32)
    with torch.no_grad():
        out = net(x, torch.tensor([0, 14]))
        assert out.shape == (2, 1, 16, 24, 32)
        assert not torch.allclose(out, net(x, torch.tensor([5, 5])))
    with pytest.raises(ValueError, match="divisible"):
        net(torch.rand(1, 2, 10, 16, 16), torch.tensor([1]))


def test_context_changes_the_output_only_through_the_fusion_blocks():
    net = _tiny().eval()
    x, t = torch.rand(1, 2, 16, 16, 16), torch.tensor([4])
    c1, c2 = torch.randn(1, 3, 12), torch.randn(1, 5, 12)
    with torch.no_grad():
        # zero-initialised fusion: at initialisation the text cannot change anything
        assert torch.allclose(net(x, t, c1), net(x, t, None))
        _perturb(net)
        a, b, unconditioned = net(x, t, c1), net(x, t, c2), net(x, t, None)
    assert not torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, unconditioned, atol=1e-4)
    fused_levels = [m for m in net.modules() if type(m).__name__ == "_Level" and m.fusion is not None]
    assert len(fused_levels) == 3  # encoder levels 1 and 2, decoder level 1 (level 2 is the bottom)


def test_unconditioned_network_has_no_fusion_and_ignores_context():
    net = _tiny(with_conditioning=False).eval()
    _perturb(net)
    x, t = torch.rand(1, 2, 16, 16, 16), torch.tensor([2])
    with torch.no_grad():
        assert torch.equal(net(x, t, torch.randn(1, 3, 12)), net(x, t))
    assert all(m.fusion is None for m in net.modules() if type(m).__name__ == "_Level")


def test_attention_gates_sit_on_every_skip_and_gate_it():
    net = _tiny().eval()
    gates = [m for m in net.modules() if isinstance(m, AttentionGate)]
    assert len(gates) == 2  # one per skip connection of a 3-level U-Net
    coefficients = []
    for gate in gates:
        gate.psi.register_forward_hook(lambda _m, _i, out: coefficients.append(torch.sigmoid(out)))
    with torch.no_grad():
        net(torch.rand(1, 2, 16, 16, 16), torch.tensor([3]))
    assert [c.shape[2:] for c in coefficients] == [(8, 8, 8), (16, 16, 16)]
    assert all(c.min() > 0 and c.max() < 1 and c.std() > 0 for c in coefficients)


def test_checkpointing_gives_the_same_gradients():
    x, t, c = torch.rand(1, 2, 16, 16, 16), torch.tensor([7]), torch.randn(1, 3, 12)
    grads = []
    for use_checkpointing in (False, True):
        net = _tiny(use_checkpointing=use_checkpointing).train()
        _perturb(net)
        net(x, t, c).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_bottleneck_attention_is_optional_and_the_network_exports():
    net = _tiny(bottleneck_attention=False)
    assert isinstance(net.mid_attention, torch.nn.Identity)
    net = _tiny().eval()
    _perturb(net)
    x, t, c = torch.rand(1, 2, 16, 16, 16), torch.tensor([3]), torch.randn(1, 3, 12)
    exported = torch.export.export(net, (x, t, c))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x, t, c), net(x, t, c), atol=1e-5)


def test_invalid_configurations_are_refused():
    with pytest.raises(ValueError, match="attention_levels"):
        _tiny(attention_levels=(False, True))
    with pytest.raises(ValueError, match="norm_num_groups"):
        _tiny(norm_num_groups=3)
    # what `monai.bundle run --use_text false` passes: a string, which would switch the text on
    for flag in ("with_conditioning", "residual_output", "interval_conditioning", "interval_scaling"):
        with pytest.raises(TypeError, match=f"{flag} must be True or False, got 'false'"):
            _tiny(**{flag: "false"})


def test_residual_output_starts_as_the_identity_and_learns():
    net = AttentionDiffusionUNet(channels=(8, 16, 16), attention_levels=(False, True, True), num_head_channels=8,
                                 context_dim=12, residual_output=True)
    x = torch.rand(2, 2, 16, 16, 16)
    out = net(x, torch.tensor([1, 2]), torch.randn(2, 3, 12))
    assert torch.equal(out, x[:, 1:2])
    out.sum().backward()
    assert net.out[-1].weight.grad.abs().sum() > 0


def test_mean_prediction_network_is_the_denoiser_called_on_the_initial_scan_alone():
    denoiser = _tiny(residual_output=True).eval()
    _perturb(denoiser)
    mean_net = MeanPredictionUNet(14, 0.95, **dict(channels=(8, 16, 32), attention_levels=(False, True, True),
                                                   norm_num_groups=4, num_head_channels=8, context_dim=12,
                                                   residual_output=True)).eval()
    # the same parameters and no other state: a denoiser's weights load strictly, key for key
    assert mean_net.state_dict().keys() == denoiser.state_dict().keys()
    mean_net.load_state_dict(denoiser.state_dict())
    y0, c = torch.rand(2, 1, 16, 16, 16), torch.randn(2, 3, 12)
    x, t = mean_prediction_input(y0, 14, 0.95)
    assert torch.equal(x, torch.cat([0.95 * y0, y0], 1)) and t.tolist() == [14, 14]
    with torch.no_grad():
        assert torch.equal(mean_net(y0, context=c), denoiser(x, t, c))
        assert torch.equal(mean_net(y0), denoiser(x, t))
        # with timesteps it is the denoiser, as the diffusion sampler calls it
        xt = torch.rand(2, 2, 16, 16, 16)
        assert torch.equal(mean_net(xt, torch.tensor([3, 9]), c), denoiser(xt, torch.tensor([3, 9]), c))


def test_both_networks_compile_to_torchscript_with_the_same_output():
    """MONAI's ckpt_export scripts network_def; the scripted program must compute what the module computes."""
    denoiser = _tiny().eval()
    _perturb(denoiser)
    mean_net = MeanPredictionUNet(14, 0.95, channels=(8, 16, 32), attention_levels=(False, True, True),
                                  norm_num_groups=4, num_head_channels=8, context_dim=12).eval()
    mean_net.load_state_dict(denoiser.state_dict())
    y0, xt, t, c = torch.rand(1, 1, 16, 16, 16), torch.rand(1, 2, 16, 16, 16), torch.tensor([5]), torch.randn(1, 3, 12)
    scripted_denoiser, scripted_mean = torch.jit.script(denoiser), torch.jit.script(mean_net)
    with torch.no_grad():
        assert torch.allclose(scripted_denoiser(xt, t, c), denoiser(xt, t, c), atol=1e-6)
        for args, kwargs in (((y0,), {}), ((y0,), {"context": c}), ((xt, t, c), {})):
            assert torch.allclose(scripted_mean(*args, **kwargs), mean_net(*args, **kwargs), atol=1e-6)


def test_scriptable_bottleneck_attention_is_monais_bit_for_bit():
    """Same values and memory layout as MONAI's SpatialAttentionBlock, so the weights give the same outputs."""
    net = _tiny().eval()
    _perturb(net)
    h = torch.randn(2, 32, 4, 4, 4)
    with torch.no_grad():
        ours, monais = net.mid_attention(h), SpatialAttentionBlock.forward(net.mid_attention, h)
    assert torch.equal(ours, monais) and ours.stride() == monais.stride()


def test_interval_conditioning_starts_as_the_network_without_it_and_then_follows_the_weeks(tmp_path):
    """Zero-initialised interval embedding: old weights load (new_modules) and predict as before; once trained,
    the interval changes the output, None means the default 52 weeks, and TorchScript agrees."""
    from custom.checkpoints import load_network_weights

    old = _tiny(residual_output=True).eval()
    _perturb(old)
    torch.save(old.state_dict(), tmp_path / "old.pt")
    new = _tiny(residual_output=True, interval_conditioning=True).eval()
    with pytest.raises(ValueError, match="do not fit"):
        load_network_weights(new, tmp_path / "old.pt")
    load_network_weights(new, tmp_path / "old.pt", new_modules=["interval_embed"])
    x, t = torch.rand(2, 2, 16, 16, 16), torch.tensor([3, 3])
    with torch.no_grad():
        assert torch.equal(new(x, t, weeks=torch.tensor([26.0, 78.0])), old(x, t))
        for p in new.interval_embed.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
        short, long = new(x, t, weeks=torch.tensor([26.0])), new(x, t, weeks=torch.tensor([78.0]))
        assert (short - long).abs().max() > 1e-4
        assert torch.equal(new(x, t), new(x, t, weeks=torch.tensor([52.0])))
        per_case = new(x, t, weeks=torch.tensor([26.0, 78.0]))
        assert torch.allclose(per_case[:1], short[:1], atol=1e-6) and torch.allclose(per_case[1:], long[1:], atol=1e-6)
    # the old file still lacks no weight but interval_embed's: any other missing weight is still an error
    state = old.state_dict()
    del state["stem.weight"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match="do not fit"):
        load_network_weights(new, tmp_path / "broken.pt", new_modules=["interval_embed"])
    mean_net = MeanPredictionUNet(7, 1.0, channels=(8, 16, 32), attention_levels=(False, True, True),
                                  norm_num_groups=4, num_head_channels=8, context_dim=12, interval_conditioning=True)
    mean_net.load_state_dict(new.state_dict())
    scripted = torch.jit.script(mean_net.eval())
    y0, weeks = torch.rand(1, 1, 16, 16, 16), torch.tensor([30.0])
    with torch.no_grad():
        assert torch.allclose(scripted(y0, weeks=weeks), mean_net(y0, weeks=weeks), atol=1e-6)
        assert not torch.allclose(mean_net(y0, weeks=weeks), mean_net(y0))


def test_interval_scaling_makes_the_change_linear_in_the_interval(tmp_path):
    """From weights trained without it: the change at 52 weeks is the old one, half of it at 26 weeks, 1.5x at 78;
    a trained time-independent head adds the same at every interval."""
    from custom.checkpoints import load_network_weights

    old = _tiny(residual_output=True).eval()
    _perturb(old)
    torch.save(old.state_dict(), tmp_path / "old.pt")
    new = _tiny(residual_output=True, interval_scaling=True).eval()
    load_network_weights(new, tmp_path / "old.pt", new_modules=["static_out"])
    x, t = torch.rand(2, 2, 16, 16, 16), torch.tensor([3, 3])
    y0 = x[:, 1:2]
    with torch.no_grad():
        change = old(x, t) - y0
        assert torch.allclose(new(x, t) - y0, change, atol=1e-6)  # no interval: the default 52 weeks
        for weeks, factor in ((26.0, 0.5), (78.0, 1.5)):
            assert torch.allclose(new(x, t, weeks=torch.tensor([weeks])) - y0, factor * change, atol=1e-6)
        new.static_out.bias.fill_(0.1)
        both = new(x, t, weeks=torch.tensor([26.0, 78.0])) - y0
        assert torch.allclose(both[:1], 0.1 + 0.5 * change[:1], atol=1e-6)
        assert torch.allclose(both[1:], 0.1 + 1.5 * change[1:], atol=1e-6)
    with pytest.raises(ValueError, match="residual_output"):
        _tiny(interval_scaling=True)


def test_pass_through_combines_the_estimate_with_x_t_as_its_table_says_and_belongs_to_the_weights():
    from custom.scheduler import ResidualShiftScheduler

    table = ResidualShiftScheduler().pass_through_coefficients(0.09)
    plain = _tiny(residual_output=True)
    _perturb(plain)
    combined = _tiny(residual_output=True, pass_through=table)
    with pytest.raises(RuntimeError, match="pass_through"):
        combined.load_state_dict(plain.state_dict())
    combined.load_state_dict({**plain.state_dict(), "pass_through": table})
    x = torch.rand(2, 2, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    context = torch.randn(2, 3, 12, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([0, 9])
    with torch.no_grad():
        f, out = plain(x, timesteps, context), combined(x, timesteps, context)
    for i, t in enumerate(timesteps.tolist()):
        a, b, k = table[t].tolist()
        assert torch.allclose(out[i], a * x[i, 0:1] + b * x[i, 1:2] + k * f[i], atol=1e-6)
    # at t = 1 the output is almost x_t itself, whatever the network estimates
    assert float((out[0] - x[0, 0:1]).abs().max()) < 0.1 * float((f[0] - x[0, 0:1]).abs().max())
    with pytest.raises(ValueError, match="pass_through"):
        _tiny(pass_through=table[:, :2])
    # the weights carry the table: the network without it refuses them
    with pytest.raises(RuntimeError, match="pass_through"):
        plain.load_state_dict(combined.state_dict())
    # without the table the state dict is the one weights from before it existed have
    assert "pass_through" not in plain.state_dict()
