from __future__ import annotations

import pytest
import torch
from torch import nn

from vgg_xai.config import VARIANTS, TrialConfig
from vgg_xai.errors import UserError
from vgg_xai.model import build_model, count_parameters, flops_per_image

VGG_VARIANTS = ["plain", "bn", "bn_dropout", "l2", "bn_augment"]
CNN_VARIANTS = ["plain", "bn", "bn_l2", "bn_l2_augment"]


def _vgg11_cifar_params(width: float, bn: bool, head: str) -> int:
    """Counted by hand from the layer list: 3x3 convs with bias, BN weight+bias, the head."""
    chans = [round(c * width) for c in (64, 128, 256, 256, 512, 512, 512, 512)]
    total, c_in = 0, 3
    for c in chans:
        total += c_in * c * 9 + c + (2 * c if bn else 0)
        c_in = c
    if head == "mlp":
        return total + (c_in * 1000 + 1000) + (1000 * 512 + 512) + (512 * 10 + 10)
    return total + c_in * 10 + 10


def test_width1_mlp_count_derived_by_hand():
    # 1,792 + 73,856 + 295,168 + 590,080 + 1,180,160 + 3 x 2,359,808 = 9,220,480 conv parameters,
    # 513,000 + 512,512 + 5,130 = 1,030,642 in the head.
    assert count_parameters(build_model(TrialConfig(variant="plain", width=1.0))) == 10_251_122
    assert count_parameters(build_model(TrialConfig(variant="bn", width=1.0))) == 10_251_122 + 2 * 2752


@pytest.mark.parametrize("arch,variants", [("vgg11_cifar", VGG_VARIANTS), ("simple_cnn", CNN_VARIANTS)])
@pytest.mark.parametrize("width", [0.125, 0.5])
@pytest.mark.parametrize("head", ["mlp", "linear"])
def test_shapes_and_counts(arch, variants, width, head):
    for variant in variants:
        cfg = TrialConfig(arch=arch, variant=variant, width=width, head=head)
        model = build_model(cfg).eval()
        x = torch.randn(3, 3, 32, 32)
        f, logits = model.features_and_logits(x)
        assert logits.shape == (3, 10)
        last_c = model.last_conv()[1].out_channels
        assert f.shape == (3, 512 if head == "mlp" else last_c)
        assert torch.equal(model(x), logits)
        assert len(model.batchnorms()) == (len(model.conv_layers()) if cfg.bn else 0)
        has_dropout = any(isinstance(m, nn.Dropout) for m in model.modules())
        assert has_dropout == bool(cfg.dropout)
        if arch == "vgg11_cifar":
            assert [n for n, _ in model.conv_layers()] == [f"conv{i}" for i in range(1, 9)]
            assert count_parameters(model) == _vgg11_cifar_params(width, bool(cfg.bn), head)
            assert model.features.conv8 is model.last_conv()[1]
            # two max-pools: the last conv sees 8x8
            out = model.features(x)
            assert out.shape[-2:] == (8, 8)


def test_variants_are_the_seed_switches():
    assert VARIANTS["l2"] == dict(bn=False, dropout=False, l2=True, augment=False)
    cfg = TrialConfig(variant="bn_dropout")
    assert (cfg.bn, cfg.dropout, cfg.l2, cfg.augment) == (True, True, False, False)
    custom = TrialConfig(variant="my_mix", bn=False, dropout=True, l2=True, augment=True)
    assert custom.trial_id == "my_mix-lr1e-3-s0"
    with pytest.raises(UserError, match="custom variant must set all of bn, dropout, l2, augment"):
        TrialConfig(variant="my_mix", bn=True)


def test_kaiming_init_differs_and_is_seeded():
    torch.manual_seed(0)
    a = build_model(TrialConfig(variant="plain", width=0.125, init="kaiming"))
    torch.manual_seed(0)
    b = build_model(TrialConfig(variant="plain", width=0.125))
    w_a, w_b = a.features.conv1.weight, b.features.conv1.weight
    assert not torch.equal(w_a, w_b)
    # Kaiming normal, fan_out: std = sqrt(2 / (out * 9))
    conv = a.features.conv5
    expected = (2.0 / (conv.out_channels * 9)) ** 0.5
    assert abs(conv.weight.std().item() - expected) / expected < 0.1
    assert torch.count_nonzero(conv.bias) == 0


def test_flops_of_width1():
    # conv MACs at 32x32 for the first four convs, 16x16 after the first pool; then the head.
    model = build_model(TrialConfig(variant="plain"))
    convs = [(3, 64, 32), (64, 128, 32), (128, 256, 32), (256, 256, 32), (256, 512, 16), (512, 512, 16),
             (512, 512, 16), (512, 512, 16)]
    macs = sum(ci * co * 9 * hw * hw for ci, co, hw in convs) + 512 * 1000 + 1000 * 512 + 512 * 10
    assert flops_per_image(model) == 2 * macs


def test_config_validation_names_key_and_allowed():
    with pytest.raises(UserError, match="lr_schedule: 'cosine' is not one of const_1e-3, const_1e-2, alternate"):
        TrialConfig(lr_schedule="cosine")
    with pytest.raises(UserError, match="unknown key"):
        TrialConfig.from_dict({"epochz": 3})
    with pytest.raises(UserError, match="epochs: expected int"):
        TrialConfig.from_dict({"epochs": "3"})
    cfg = TrialConfig(variant="bn_augment", lr_schedule="alternate", alternate_period=2, width=0.125)
    assert TrialConfig.from_dict(cfg.to_dict()) == cfg
    assert [cfg.lr_at(e) for e in range(6)] == [1e-3, 1e-3, 1e-2, 1e-2, 1e-3, 1e-3]
