"""Pictures of how a trained checkpoint routes the test set: which experts each digit goes to, how
the gate splits its weight, and (given checkpoints trained without it) what the balance loss does."""
import os

import numpy as np
import torch

from moebench import checkpoint
from moebench.cli import ArgumentParser, UserError, run, save_figure
from moebench.measuring.compare import accuracy
from data import add_data_args, load_split


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--checkpoint", default=checkpoint.DEFAULT_PATH)
    parser.add_argument("--compare", nargs="*", default=[], metavar="LABEL=CHECKPOINT",
                        help="more checkpoints for the expert-load panel, e.g. 'no balance loss=nobal.pt'")
    parser.add_argument("--output", default="routing.png")
    add_data_args(parser)
    args = parser.parse_args(argv)
    for item in args.compare:
        if "=" not in item:
            parser.error(f"--compare {item!r}: expected LABEL=CHECKPOINT")
    return args


@torch.no_grad()
def routed(path, images):
    """(logits, gates) of the checkpoint at path on `images`, as numpy, and its structure."""
    model, structure, _ = checkpoint.load_model(path)
    logits, gates = zip(*(model(images[i:i + 1000]) for i in range(0, len(images), 1000)))
    return torch.cat(logits).numpy(), torch.cat(gates).numpy(), structure


def class_expert_share(gates, labels, classes=10):
    """share[c, e]: of the test images of class c, the share whose top-k includes expert e."""
    chosen = gates > 0
    return np.stack([chosen[labels == c].mean(0) for c in range(classes)])


def load_share(gates):
    counts = (gates > 0).sum(0)
    return counts / counts.sum()


def plot(main_gates, labels, structure, loads, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_heat, ax_weights, ax_load) = plt.subplots(1, 3, figsize=(18, 5), gridspec_kw={"width_ratios": [1.2, 1, 1.2]})
    share = class_expert_share(main_gates, labels)
    image = ax_heat.imshow(100 * share, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    for (c, e), value in np.ndenumerate(share):
        ax_heat.text(e, c, f"{100 * value:.0f}", ha="center", va="center", fontsize=7,
                     color="white" if value < 0.6 else "black")
    ax_heat.set(title=f"% of each digit's test images routed to each expert (top {structure['TOP']})",
                xlabel="expert", ylabel="digit", xticks=range(share.shape[1]), yticks=range(10))
    fig.colorbar(image, ax=ax_heat, fraction=0.04)
    ranked = -np.sort(-main_gates, axis=1)[:, :structure["TOP"]]
    for k in range(ranked.shape[1]):
        ax_weights.hist(ranked[:, k], bins=50, range=(0, 1), alpha=0.7, label=f"weight of the #{k + 1} expert")
    ax_weights.set(title="gate weights of the chosen experts", xlabel="gate weight", ylabel="test images")
    ax_weights.legend()
    width = 0.8 / len(loads)
    for i, (label, share_e) in enumerate(loads.items()):
        cv = share_e.std() / share_e.mean()
        ax_load.bar(np.arange(len(share_e)) + i * width - 0.4 + width / 2, 100 * share_e, width,
                    label=f"{label} (load CV {cv:.2f})")
    ax_load.axhline(100 / len(share_e), color="grey", linestyle="--", label="balanced")
    ax_load.set(title="expert load: share of routed test images", xlabel="expert", ylabel="%")
    ax_load.legend(fontsize="small")
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    images, labels = load_split("test", args.data_dir)
    logits, gates, structure = routed(args.checkpoint, images)
    loads = {f"{os.path.basename(args.checkpoint)} (balance loss {structure['BALANCE_LOSS']})": load_share(gates)}
    for item in args.compare:
        label, path = item.split("=", 1)
        _, other, _ = routed(path, images)
        if other.shape[1] != gates.shape[1]:
            raise UserError(f"--compare {path}: {other.shape[1]} experts, {args.checkpoint} has {gates.shape[1]}")
        loads[label] = load_share(other)
    plot(gates, labels.numpy(), structure, loads, args.output)
    share = class_expert_share(gates, labels.numpy())
    print(f"{args.checkpoint}: accuracy {accuracy(logits, labels):.2f}% on {len(labels)} test images")
    print(f"wrote {args.output}: each digit's most used expert "
          + ", ".join(f"{c}->{int(share[c].argmax())} ({100 * share[c].max():.0f}%)" for c in range(10)))


if __name__ == "__main__":
    run(main)
