"""Train the MoE classifier on MNIST's 60k training images; report accuracy on the 10k test images."""
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import config
from common import checkpoint
from common.cli import ArgumentParser, UserError, atomic_path, positive_int, run
from data import add_data_args, load_split
from moe import build_model

PLOT_PATH = "training.png"


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    add_data_args(parser)
    config.add_structure_args(parser)
    parser.add_argument("--epochs", type=positive_int, default=config.EPOCHS)
    parser.add_argument("--batch-size", type=positive_int, default=config.BATCH_SIZE)
    parser.add_argument("--lr", type=float, default=config.LR)
    parser.add_argument("--seed", type=int, default=config.SEED)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--checkpoint", default=checkpoint.DEFAULT_PATH,
                        help="written after every epoch; read by --resume")
    parser.add_argument("--scripted", default=checkpoint.SCRIPTED_PATH,
                        help="TorchScript model written at the end")
    parser.add_argument("--plot", default=PLOT_PATH)
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--train-limit", type=positive_int, help="use only the first N training images")
    parser.add_argument("--test-limit", type=positive_int, help="use only the first N test images")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    return args


def pick_device(choice):
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: PyTorch sees no CUDA device; install a CUDA build of torch "
                        "(requirements-gpu.txt) on a CUDA machine, or use --device cpu")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


@torch.no_grad()
def evaluate(model, images, labels, batch_size=1000):
    """(accuracy in %, routed slots per expert) of a model in eval mode."""
    model.eval()
    correct, counts = 0, None
    for start in range(0, len(images), batch_size):
        logits, gates = model(images[start:start + batch_size])
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum().item()
        routed = (gates > 0).sum(0)
        counts = routed if counts is None else counts + routed
    return 100.0 * correct / len(images), counts.cpu()


def load_cv(counts):
    """Coefficient of variation of expert load: 0 is perfectly balanced."""
    counts = counts.double()
    return (counts.std(unbiased=False) / counts.mean()).item()


def cosine_lr(base_lr, epoch, epochs):
    """Per-epoch cosine decay; a pure function of the epoch, so --resume needs no scheduler state."""
    return base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def train_epoch(model, optimizer, images, labels, batch_size, generator, show_progress):
    model.train()
    order = torch.randperm(len(images), generator=generator).to(images.device)
    batches = range(0, len(images), batch_size)
    bar = tqdm(batches, leave=False, disable=None if show_progress else True, unit="batch")
    total_loss = total_balance = correct = seen = 0.0
    for start in bar:
        idx = order[start:start + batch_size]
        logits, _, balance = model.forward_with_loss(images[idx])
        loss = F.cross_entropy(logits, labels[idx]) + balance
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total_loss += loss.item() * len(idx)
        total_balance += balance.item() * len(idx)
        correct += (logits.argmax(1) == labels[idx]).sum().item()
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{100 * correct / seen:.2f}%")
    return total_loss / seen, total_balance / seen, 100.0 * correct / seen


def start_state(args, structure, device):
    """(model, optimizer, checkpoint dict to continue from or None)."""
    if not args.resume:
        torch.manual_seed(args.seed)
        model = build_model(structure).to(device)
        return model, torch.optim.Adam(model.parameters(), lr=args.lr), None
    if not os.path.isfile(args.checkpoint):
        raise UserError(f"--resume: {args.checkpoint} not found; train without --resume first")
    model, _, state = checkpoint.load_model(args.checkpoint, config.overrides(args))
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["rng_state"])
    return model, optimizer, state


def plot_history(history, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc, ax_load) = plt.subplots(1, 3, figsize=(15, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], marker="o", label="train loss (with balance)")
    ax_loss.plot(epochs, [h["balance_loss"] for h in history], marker="o", label="balance loss")
    ax_loss.set(title="loss", xlabel="epoch", yscale="log")
    ax_loss.legend()
    ax_acc.plot(epochs, [h["test_accuracy"] for h in history], marker="o", color="tab:green")
    ax_acc.set(title="test accuracy (10k held-out images)", xlabel="epoch", ylabel="%")
    shares = torch.tensor([h["expert_share"] for h in history]) * 100
    for expert in range(shares.shape[1]):
        ax_load.plot(epochs, shares[:, expert], marker=".", label=f"expert {expert}")
    ax_load.axhline(100 / shares.shape[1], color="grey", linestyle="--", label="balanced")
    ax_load.set(title="share of routed test images per expert", xlabel="epoch", ylabel="%")
    ax_load.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100)
    plt.close(fig)


def save_scripted(model, path):
    scripted = torch.jit.script(model.cpu().eval())
    with atomic_path(path) as tmp:
        torch.jit.save(scripted, tmp)


def main(argv=None):
    args = parse_args(argv)
    device = pick_device(args.device)
    structure = config.validate({**config.defaults(), **config.overrides(args)})
    train_images, train_labels = load_split("train", args.data_dir, args.train_limit)
    test_images, test_labels = load_split("test", args.data_dir, args.test_limit)
    train_images, train_labels = train_images.to(device), train_labels.to(device)
    test_images, test_labels = test_images.to(device), test_labels.to(device)
    model, optimizer, state = start_state(args, structure, device)
    structure = state["structure"] if state else structure
    history = state["history"] if state else []
    first_epoch = state["epoch"] + 1 if state else 1
    print(f"training on {device} ({torch.get_num_threads()} CPU threads): {len(train_images)} train, "
          f"{len(test_images)} test images; EXPERTS={structure['EXPERTS']} TOP={structure['TOP']} "
          f"EMB_SIZE={structure['EMB_SIZE']} HIDDEN_SIZE={structure['HIDDEN_SIZE']} "
          f"BALANCE_LOSS={structure['BALANCE_LOSS']}")
    if first_epoch > args.epochs:
        print(f"{args.checkpoint} already holds epoch {first_epoch - 1} of {args.epochs}")
    for epoch in range(first_epoch, args.epochs + 1):
        started = time.perf_counter()
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + epoch)
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(args.lr, epoch, args.epochs)
        train_loss, balance_loss, train_acc = train_epoch(
            model, optimizer, train_images, train_labels, args.batch_size, generator, not args.quiet)
        seconds = time.perf_counter() - started
        test_acc, counts = evaluate(model, test_images, test_labels)
        share = (counts.double() / counts.sum()).tolist()
        history.append({"epoch": epoch, "train_loss": train_loss, "balance_loss": balance_loss,
                        "train_accuracy": train_acc, "test_accuracy": test_acc,
                        "expert_share": share, "load_cv": load_cv(counts), "seconds": seconds})
        print(f"epoch {epoch:2d}/{args.epochs}  loss {train_loss:.4f}  test acc {test_acc:.2f}%  "
              f"load cv {load_cv(counts):.3f}  {seconds:.1f}s  expert share % "
              + " ".join(f"{100 * s:.0f}" for s in share), flush=True)
        checkpoint.save({"structure": structure, "state_dict": model.state_dict(),
                         "optimizer": optimizer.state_dict(), "epoch": epoch, "history": history,
                         "rng_state": torch.get_rng_state(), "test_accuracy": test_acc,
                         "args": {k: v for k, v in vars(args).items() if k.islower()}},
                        args.checkpoint)
    if not history:
        raise UserError(f"{args.checkpoint}: nothing trained")
    save_scripted(model, args.scripted)
    plot_history(history, args.plot)
    total = sum(h["seconds"] for h in history)
    print(f"test accuracy {history[-1]['test_accuracy']:.2f}% after {history[-1]['epoch']} epochs, "
          f"{total:.0f}s of training; wrote {args.checkpoint}, {args.scripted}, {args.plot}")
    return history


if __name__ == "__main__":
    run(main)
