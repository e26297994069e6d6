import pytest
import torch

from moe import MoE, build_model


@pytest.fixture
def model(tiny_structure):
    torch.manual_seed(0)
    model = build_model(tiny_structure)
    with torch.no_grad():  # the paper's zero init makes every gate equal; spread them for testing
        model.moe.w_gate.normal_(0, 1)
        model.moe.w_noise.normal_(0, 0.5)
    return model


def test_scripted_equals_eager(model):
    images = torch.rand(64, 1, 28, 28)
    scripted = torch.jit.script(model.eval())
    eager_logits, eager_gates = model(images)
    script_logits, script_gates = scripted(images)
    torch.testing.assert_close(script_logits, eager_logits, rtol=0, atol=1e-6)
    torch.testing.assert_close(script_gates, eager_gates, rtol=0, atol=0)


def test_top_k_weights_are_renormalised(model, tiny_structure):
    _, gates = model.eval()(torch.rand(128, 1, 28, 28))
    assert ((gates > 0).sum(1) == tiny_structure["TOP"]).all()
    torch.testing.assert_close(gates.sum(1), torch.ones(128))


def test_noise_only_in_training(model):
    images = torch.rand(256, 1, 28, 28)
    model.eval()
    first, second = model(images), model(images)
    assert torch.equal(first[1], second[1]) and torch.equal(first[0], second[0])
    model.train()
    torch.manual_seed(1)
    _, noisy_a = model(images)
    torch.manual_seed(2)
    _, noisy_b = model(images)
    assert not torch.equal(noisy_a, noisy_b)
    assert not torch.equal(noisy_a, first[1])
    model.moe.noisy_gating = False
    _, clean_train = model(images)
    assert torch.equal(clean_train, first[1])


def test_noise_is_added_to_logits_before_top_k():
    moe = MoE(dim=4, hidden=8, experts=4, top=1).train()
    with torch.no_grad():
        moe.w_gate.zero_()
        moe.w_noise.fill_(5.0)  # huge noise, all-equal clean logits: top-1 varies across rows
    x = torch.ones(500, 4)
    _, gates = moe(x)
    chosen = gates.argmax(1).bincount(minlength=4)
    assert (chosen > 50).all(), chosen  # noise before top-k spreads rows over every expert
    assert torch.equal(gates.max(1).values, torch.ones(500))


@pytest.mark.parametrize("kind", ["shazeer", "switch"])
def test_balance_loss_is_differentiable_and_lowers_imbalance(kind):
    torch.manual_seed(0)
    moe = MoE(dim=16, hidden=8, experts=4, top=1, balance_loss=kind, w_importance=1.0, w_load=1.0,
              w_switch=1.0).train()
    x = torch.randn(512, 16) + 1.0
    with torch.no_grad():
        moe.w_gate.normal_(0, 0.1)
        moe.w_gate[:, 0] += 0.3  # nearly every row prefers expert 0
    _, gates, loss = moe.forward_with_loss(x)
    loss.backward()
    assert moe.w_gate.grad.abs().sum() > 0
    if kind == "shazeer":
        assert moe.w_noise.grad.abs().sum() > 0  # the load estimator reaches the noise weights
    before = routed_cv(moe, x)
    optimizer = torch.optim.Adam([moe.w_gate, moe.w_noise], lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        moe.forward_with_loss(x)[2].backward()
        optimizer.step()
    after = routed_cv(moe, x)
    assert before > 1.0 and after < 0.5 * before, (before, after)


def routed_cv(moe, x):
    moe.eval()
    counts = (moe(x)[1] > 0).sum(0).double()
    moe.train()
    return (counts.std(unbiased=False) / counts.mean()).item()


def test_no_balance_loss_is_zero():
    moe = MoE(dim=8, hidden=8, experts=4, top=2, balance_loss="none").train()
    assert moe.forward_with_loss(torch.randn(32, 8))[2].item() == 0.0
