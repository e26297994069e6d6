import os

import pytest
import torch

import config
import train
from moebench import checkpoint
from moebench.cli import UserError
from conftest import train_tiny


def train_small(tmp_path, mnist_dir, *extra, name="ckpt.pt", epochs=1):
    return train_tiny(tmp_path, mnist_dir, *extra, name=name, train_images=2000, test_images=500,
                      epochs=epochs, size=16, hidden=32)


def test_checkpoint_round_trip_and_scripted_model(tmp_path, mnist_dir):
    history = train_small(tmp_path, mnist_dir)
    model, structure, state = checkpoint.load_model(str(tmp_path / "ckpt.pt"))
    assert structure["EXPERTS"] == 4 and state["epoch"] == 1
    images, labels = train.load_split("test", mnist_dir, limit=500)
    accuracy, counts = train.evaluate(model, images, labels)
    assert accuracy == pytest.approx(history[-1]["test_accuracy"])
    assert accuracy > 30  # 2000 images, one epoch, tiny model: well above the 10% of chance
    assert counts.sum().item() == 500 * 2
    scripted = torch.jit.load(str(tmp_path / "model.pt"))
    assert torch.equal(scripted(images)[0], model(images)[0])
    assert os.path.getsize(tmp_path / "training.png") > 10_000


def test_resume_continues_exactly_where_it_stopped(tmp_path, mnist_dir):
    straight = train_small(tmp_path, mnist_dir, name="straight.pt", epochs=2)
    train_small(tmp_path, mnist_dir, name="resumed.pt", epochs=1)
    resumed = train_small(tmp_path, mnist_dir, "--resume", name="resumed.pt", epochs=2)
    assert [h["epoch"] for h in resumed] == [1, 2]
    a = checkpoint.load(str(tmp_path / "straight.pt"))["state_dict"]
    b = checkpoint.load(str(tmp_path / "resumed.pt"))["state_dict"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed[-1]["test_accuracy"] == straight[-1]["test_accuracy"]


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, mnist_dir):
    with pytest.raises(UserError, match="not found; train without --resume"):
        train_small(tmp_path, mnist_dir, "--resume", name="missing.pt")


def test_interrupted_save_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save({"structure": {}, "state_dict": {"w": torch.ones(3)}}, path)

    def dies_halfway(obj, file):
        with open(file, "wb") as f:
            f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"structure": {}, "state_dict": {"w": torch.zeros(3)}}, path)
    monkeypatch.undo()
    assert torch.equal(checkpoint.load(path)["state_dict"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]  # no temporary file left behind


def test_structure_that_contradicts_the_checkpoint_is_refused(tmp_path, mnist_dir):
    train_small(tmp_path, mnist_dir)
    with pytest.raises(UserError, match="trained with EXPERTS=4, but the command line asks for 8"):
        checkpoint.load_model(str(tmp_path / "ckpt.pt"), {"EXPERTS": 8})
    state = checkpoint.load(str(tmp_path / "ckpt.pt"))
    state["structure"]["HIDDEN_SIZE"] = 64  # config no longer matches the weights
    checkpoint.save(state, str(tmp_path / "bad.pt"))
    with pytest.raises(UserError, match="weights do not match its saved structure"):
        checkpoint.load_model(str(tmp_path / "bad.pt"))


@pytest.mark.parametrize("payload", [b"", b"not a checkpoint at all"])
def test_corrupt_or_missing_checkpoint(tmp_path, payload):
    with pytest.raises(UserError, match="run train.py first"):
        checkpoint.load(str(tmp_path / "absent.pt"))
    (tmp_path / "bad.pt").write_bytes(payload)
    with pytest.raises(UserError, match="not a readable checkpoint"):
        checkpoint.load(str(tmp_path / "bad.pt"))


def test_balance_loss_lowers_expert_load_variation(tmp_path, mnist_dir):
    """A real run on MNIST: with the loss a no-op, this fails."""
    common = ("--experts", "8", "--top", "1", "--w-importance", "0.5", "--w-load", "0.5")
    off = train_small(tmp_path, mnist_dir, *common, "--balance-loss", "none", name="off.pt", epochs=4)
    on = train_small(tmp_path, mnist_dir, *common, "--balance-loss", "shazeer", name="on.pt", epochs=4)
    assert on[-1]["load_cv"] < 0.5 * off[-1]["load_cv"], (on[-1]["load_cv"], off[-1]["load_cv"])


def test_bad_flags_exit_non_zero(tmp_path, mnist_dir):
    with pytest.raises(SystemExit) as exit_info:
        train.parse_args(["--batch-size", "0"])
    assert exit_info.value.code != 0
    with pytest.raises(config.StructureError, match="--top 5 is larger than --experts 4"):
        train_small(tmp_path, mnist_dir, "--top", "5")


def test_checkpoint_bookkeeping_draws_nothing_from_the_training_random_stream(tiny_structure):
    """Writing a checkpoint must not change what training draws next (gating noise)."""
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    assert train.parameter_names(tiny_structure)[:2] == ["embed.weight", "embed.bias"]
    assert torch.equal(torch.rand(3), expected)
