"""Train the MoE classifier on MNIST's 60k training images; report accuracy on the 10k test images.

One process: python train.py. Several, with torchrun: torchrun --nproc_per_node N train.py
--parallel data|expert (see moebench/parallel.py); --batch-size is then the global batch."""
import math
import os
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import config
from moebench import checkpoint, parallel
from moebench.measuring.machine import cpu_name
from moebench.reports import training as training_report
from moebench.reports.files import write as write_report
from moebench.runners.pytorch import pick_device
from moebench.cli import ArgumentParser, UserError, atomic_path, positive_int, run, save_figure
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
    parser.add_argument("--report-dir", help="also write the run's report there: training.json, training.md and "
                                             "training.png (run_all.sh writes results/)")
    parser.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    parser.add_argument("--train-limit", type=positive_int, help="use only the first N training images")
    parser.add_argument("--test-limit", type=positive_int, help="use only the first N test images")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--parallel", choices=parallel.MODES, default="none",
                        help="under torchrun: data (DistributedDataParallel) or expert (experts sharded over "
                             "the processes, all_to_all); none: one process (default)")
    args = parser.parse_args(argv)
    if args.lr <= 0:
        parser.error(f"--lr must be > 0, got {args.lr}")
    return args


@torch.no_grad()
def evaluate(model, images, labels, batch_size=1000, ctx=None, forward=None):
    """(accuracy in %, routed slots per expert) of a model in eval mode. Under torchrun every rank
    evaluates its share of the images and the counts are summed."""
    ctx = ctx or parallel.Context()
    forward = forward or model
    model.eval()
    total_images = len(images)
    images, labels = images[ctx.rank::ctx.world], labels[ctx.rank::ctx.world]
    correct, counts = 0, torch.zeros(model.moe.num_experts, dtype=torch.long, device=images.device)
    shard = -(-total_images // ctx.world)  # every rank runs as many batches: expert parallel needs all
    for start in range(0, shard, batch_size):
        logits, gates = forward(images[start:start + batch_size])[:2]
        correct += (logits.argmax(1) == labels[start:start + batch_size]).sum().item()
        counts += (gates > 0).sum(0)
    total = parallel.sum_over_ranks([correct, len(images)] + counts.tolist(), ctx)
    return 100.0 * total[0] / total[1], torch.tensor(total[2:]).long()


def load_cv(counts):
    """Coefficient of variation of expert load: 0 is perfectly balanced."""
    counts = counts.double()
    return (counts.std(unbiased=False) / counts.mean()).item()


def cosine_lr(base_lr, epoch, epochs):
    """Per-epoch cosine decay; a pure function of the epoch, so --resume needs no scheduler state."""
    return base_lr * 0.5 * (1 + math.cos(math.pi * (epoch - 1) / epochs))


def train_epoch(model, step, optimizer, images, labels, order, batch_size, ctx, show_progress):
    """One pass over this rank's `order`; returns the global (train loss, balance loss, accuracy)."""
    model.train()
    order = order.to(images.device)
    batches = range(0, len(order), batch_size)
    bar = tqdm(batches, leave=False, disable=None if show_progress and ctx.main else True, unit="batch")
    total_loss = total_balance = correct = seen = 0.0
    for start in bar:
        idx = order[start:start + batch_size]
        logits, _, balance = step(images[idx])
        loss = F.cross_entropy(logits, labels[idx]) + balance
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if ctx.mode == "expert" and ctx.world > 1:
            parallel.average_gradients(model, ctx)
        optimizer.step()
        total_loss += loss.item() * len(idx)
        total_balance += balance.item() * len(idx)
        correct += (logits.argmax(1) == labels[idx]).sum().item()
        seen += len(idx)
        bar.set_postfix(loss=f"{total_loss / seen:.4f}", acc=f"{100 * correct / seen:.2f}%")
    total_loss, total_balance, correct, seen = parallel.sum_over_ranks([total_loss, total_balance, correct, seen], ctx)
    return total_loss / seen, total_balance / seen, 100.0 * correct / seen


def parameter_names(structure):
    """The parameter names of the whole model, in the order a single process's optimizer holds them.
    Built on the meta device: no memory, and no draw from the random stream training uses."""
    with torch.device("meta"):
        return [name for name, _ in build_model(structure).named_parameters()]


def start_state(args, structure, ctx):
    """(model, training step, optimizer, checkpoint dict to continue from or None); the model is
    this rank's part of it under --parallel expert."""
    state = None
    if args.resume:
        if not os.path.isfile(args.checkpoint):
            raise UserError(f"--resume: {args.checkpoint} not found; train without --resume first")
        model, structure, state = checkpoint.load_model(args.checkpoint, config.overrides(args))
    else:
        torch.manual_seed(args.seed)  # the same initial weights on every rank
        model = build_model(structure)
    model = model.to(ctx.device)
    # without gating noise W_noise gets no gradient; with loop routing an expert may get no rows
    step = parallel.wrap(model, ctx, structure["NOISY_GATING"] and structure["ROUTING"] == "dense")
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    if state:
        parallel.load_optimizer_state(model, optimizer, state["optimizer"], parameter_names(structure))
        rng = state.get("rng_states") or [state["rng_state"]]
        torch.set_rng_state(rng[ctx.rank] if len(rng) == ctx.world else rng[0])
    elif ctx.world > 1:
        torch.manual_seed(args.seed + 1 + ctx.rank)  # each rank draws its own gating noise
    return model, step, optimizer, state


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
    save_figure(fig, path)


def save_scripted(model, path):
    scripted = torch.jit.script(model.cpu().eval())
    with atomic_path(path) as tmp:
        torch.jit.save(scripted, tmp)


def save_checkpoint(args, model, optimizer, structure, epoch, history, test_acc, ctx):
    """The ordinary single-process checkpoint (experts gathered), written by rank 0 only, atomically."""
    weights, moments = parallel.full_state(model, optimizer, ctx)
    rng_states = [None] * ctx.world
    if ctx.world > 1:
        torch.distributed.all_gather_object(rng_states, torch.get_rng_state())
    if not ctx.main:
        return None
    checkpoint.save({"structure": structure, "state_dict": weights, "epoch": epoch, "history": history,
                     "optimizer": parallel.optimizer_state_dict(parameter_names(structure), moments, optimizer),
                     "rng_state": torch.get_rng_state(), "test_accuracy": test_acc,
                     **({"rng_states": rng_states, "parallel": {"mode": ctx.mode, "processes": ctx.world}}
                        if ctx.world > 1 else {}),
                     "args": {k: v for k, v in vars(args).items() if k.islower()}}, args.checkpoint)
    return weights


def communication(ctx):
    """Expert parallel: the forward pass's all_to_all payload per step (rows to other ranks and
    back), summed over ranks; the backward pass sends as much again."""
    if ctx.mode != "expert" or ctx.world == 1:
        return ""
    sent = parallel.sum_over_ranks([sum(ctx.sent_bytes)], ctx)[0]
    return f"  all_to_all {sent / len(ctx.sent_bytes) / 1024:.0f} KiB/step forward"


def main(argv=None):
    args = parse_args(argv)
    ctx = parallel.setup(args.parallel, pick_device(args.device))
    try:
        with parallel.stop_cleanly(ctx, args.checkpoint):
            return train(args, ctx)
    finally:
        parallel.teardown(ctx)


def train(args, ctx):
    say = print if ctx.main else (lambda *_, **__: None)
    structure = config.validate({**config.defaults(), **config.overrides(args)})
    batch_size = parallel.local_batch_size(args.batch_size, ctx)
    train_images, train_labels = load_split("train", args.data_dir, args.train_limit)
    test_images, test_labels = load_split("test", args.data_dir, args.test_limit)
    train_images, train_labels = train_images.to(ctx.device), train_labels.to(ctx.device)
    test_images, test_labels = test_images.to(ctx.device), test_labels.to(ctx.device)
    model, step, optimizer, state = start_state(args, structure, ctx)
    structure = state["structure"] if state else structure
    history = state["history"] if state else []
    first_epoch = state["epoch"] + 1 if state else 1
    forward = (lambda images: parallel.expert_parallel_forward(model, images, ctx)) if ctx.mode == "expert" else None
    say(f"training on {ctx.device} ({torch.get_num_threads()} CPU threads"
        + (f", {ctx.world} processes, {ctx.mode} parallel" if ctx.world > 1 else "")
        + f"): {len(train_images)} train, {len(test_images)} test images; EXPERTS={structure['EXPERTS']} "
        f"TOP={structure['TOP']} EMB_SIZE={structure['EMB_SIZE']} HIDDEN_SIZE={structure['HIDDEN_SIZE']} "
        f"BALANCE_LOSS={structure['BALANCE_LOSS']}, global batch {args.batch_size}", flush=True)
    if first_epoch > args.epochs:
        say(f"{args.checkpoint} already holds epoch {first_epoch - 1} of {args.epochs}")
    weights = state["state_dict"] if state else None
    for epoch in range(first_epoch, args.epochs + 1):
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(args.lr, epoch, args.epochs)
        ctx.sent_bytes.clear()
        order = parallel.epoch_order(len(train_images), args.seed, epoch, ctx)
        train_loss, balance_loss, train_acc = train_epoch(
            model, step, optimizer, train_images, train_labels, order, batch_size, ctx, not args.quiet)
        seconds = time.perf_counter() - started
        traffic = communication(ctx)
        test_acc, counts = evaluate(model, test_images, test_labels, ctx=ctx, forward=forward)
        share = (counts.double() / counts.sum()).tolist()
        history.append({"epoch": epoch, "train_loss": train_loss, "balance_loss": balance_loss,
                        "train_accuracy": train_acc, "test_accuracy": test_acc, "processes": ctx.world,
                        "expert_share": share, "load_cv": load_cv(counts), "seconds": seconds})
        say(f"epoch {epoch:2d}/{args.epochs}  loss {train_loss:.4f}  test acc {test_acc:.2f}%  "
            f"load cv {load_cv(counts):.3f}  {seconds:.1f}s{traffic}  expert share % "
            + " ".join(f"{100 * s:.0f}" for s in share), flush=True)
        weights = save_checkpoint(args, model, optimizer, structure, epoch, history, test_acc, ctx)
    if not history:
        raise UserError(f"{args.checkpoint}: nothing trained")
    if ctx.main:
        final = build_model(structure)
        final.load_state_dict(weights)
        save_scripted(final, args.scripted)
        plot_history(history, args.plot)
        if args.report_dir:
            report = training_report.summary(history, structure, f"{cpu_name()}, {os.cpu_count()} cores",
                                             str(ctx.device))
            write_report(report, args.report_dir, "training", training_report.markdown,
                         {"training.png": lambda report, path: plot_history(report["history"], path)})
    total = sum(h["seconds"] for h in history)
    say(f"test accuracy {history[-1]['test_accuracy']:.2f}% after {history[-1]['epoch']} epochs, "
        f"{total:.0f}s of training; wrote {args.checkpoint}, {args.scripted}, {args.plot}")
    return history


if __name__ == "__main__":
    run(main)
