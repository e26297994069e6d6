"""train.py's report (--report-dir): what the run reached, how long it took, and how the experts
shared the test images, per epoch."""


def summary(history, structure, machine, device):
    """The report's JSON: the last epoch's figures, the whole history, what trained where."""
    last = history[-1]
    shares = [100 * share for share in last["expert_share"]]
    return {"machine": machine, "device": device, "structure": structure, "epochs": last["epoch"],
            "test_accuracy": last["test_accuracy"], "training_s": sum(h["seconds"] for h in history),
            "expert_share_percent": shares, "history": history}


def markdown(report):
    s = report["structure"]
    shares = report["expert_share_percent"]
    lines = ["# Training", "",
             f"Machine: {report['machine']}, trained on {report['device']}. EXPERTS {s['EXPERTS']}, TOP {s['TOP']}, "
             f"EMB_SIZE {s['EMB_SIZE']}, HIDDEN_SIZE {s['HIDDEN_SIZE']}, balance loss {s['BALANCE_LOSS']}.", "",
             f"Test accuracy {report['test_accuracy']:.2f}% after {report['epochs']} epochs, "
             f"{report['training_s']:.0f} s of training (the epochs' own time, evaluation excluded). The experts' "
             f"shares of the routed test images after the last epoch: {min(shares):.1f}% to {max(shares):.1f}%.",
             "", "| epoch | train loss | balance loss | test accuracy | seconds | expert shares (%) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {h['epoch']} | {h['train_loss']:.4f} | {h['balance_loss']:.4f} | {h['test_accuracy']:.2f}% | "
              f"{h['seconds']:.1f} | " + " ".join(f"{100 * x:.1f}" for x in h["expert_share"]) + " |"
              for h in report["history"]]
    return "\n".join(lines) + "\n"
