"""Model structure and training defaults.

Every name in STRUCTURE can be overridden on the command line (--experts 8, --emb-size 16, ...).
The structure a model was trained with is saved in its checkpoint, and every later script rebuilds
the model from that saved copy, not from this file.
"""
import argparse

INPUT_SIZE = 784  # 28 x 28 pixels, fixed by the input contract
CLASSES = 10
EXPERTS = 8
TOP = 2
EMB_SIZE = 128
HIDDEN_SIZE = 256  # each expert is an MLP EMB_SIZE -> HIDDEN_SIZE -> EMB_SIZE
NOISY_GATING = True  # Gaussian noise on the gate logits, training only (Shazeer et al. 2017)
BALANCE_LOSS = "shazeer"  # "shazeer" (importance + load), "switch" (Fedus et al. 2021) or "none"
W_IMPORTANCE = 0.1
W_LOAD = 0.1
W_SWITCH = 0.01
CHECKPOINT_PATH = "checkpoint.pt"  # where train.py writes, and every script reads, by default
ROUTING = "dense"  # "dense": static shapes, every expert masked by its gate; "loop": per-expert dispatch

# --routing auto (ONNX Runtime CPU): the dense graph below this batch size, the loop graph from it on;
# where the two cross on this project's CPU (sweep.py's batch curves).
AUTO_LOOP_FROM = 128

# Training defaults.
EPOCHS = 15
BATCH_SIZE = 128
LR = 2e-3
SEED = 0

STRUCTURE = ("INPUT_SIZE", "CLASSES", "EXPERTS", "TOP", "EMB_SIZE", "HIDDEN_SIZE", "NOISY_GATING",
             "BALANCE_LOSS", "W_IMPORTANCE", "W_LOAD", "W_SWITCH", "ROUTING")
BALANCE_LOSSES = ("shazeer", "switch", "none")
ROUTINGS = ("dense", "loop")
# Names that change no parameter shape: a saved model may be rebuilt with another value.
FREE_AT_LOAD = ("ROUTING",)


class StructureError(ValueError):
    """A structure that cannot be built (TOP > EXPERTS, ...); the scripts print it as one line."""
    for_the_user = True


def defaults():
    return {name: globals()[name] for name in STRUCTURE}


def _flag(name):
    return "--" + name.lower().replace("_", "-")


def add_structure_args(parser):
    """One flag per structure name except the two the input contract fixes; None means 'keep'."""
    group = parser.add_argument_group("model structure (default: config.py, or the checkpoint's)")
    for name in ("EXPERTS", "TOP", "EMB_SIZE", "HIDDEN_SIZE"):
        group.add_argument(_flag(name), dest=name, type=_positive_int, metavar="N")
    for name in ("W_IMPORTANCE", "W_LOAD", "W_SWITCH"):
        group.add_argument(_flag(name), dest=name, type=_non_negative_float, metavar="W")
    group.add_argument("--balance-loss", dest="BALANCE_LOSS", choices=BALANCE_LOSSES)
    group.add_argument("--noisy-gating", dest="NOISY_GATING", choices=("on", "off"))
    group.add_argument("--routing", dest="ROUTING", choices=ROUTINGS)


def _number(text, convert, allowed, rule):
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{rule}, got {text!r}")
    if not allowed(value):
        raise argparse.ArgumentTypeError(f"{rule}, got {value}")
    return value


def _positive_int(text):
    return _number(text, int, lambda v: v > 0, "must be a positive integer")


def _non_negative_float(text):
    return _number(text, float, lambda v: v >= 0, "must be a number >= 0")


def overrides(args):
    """The structure names the user set on the command line, with their values."""
    chosen = {name: getattr(args, name, None) for name in STRUCTURE}
    chosen = {name: value for name, value in chosen.items() if value is not None}
    if "NOISY_GATING" in chosen:
        chosen["NOISY_GATING"] = chosen["NOISY_GATING"] == "on"
    return chosen


def validate(structure):
    if structure["TOP"] > structure["EXPERTS"]:
        raise StructureError(f"--top {structure['TOP']} is larger than --experts {structure['EXPERTS']}; "
                        "choose TOP <= EXPERTS")
    return structure


def onnx_path(routing=ROUTING, exporter="torchscript"):
    """Where export_onnx.py writes, and the backend scripts look, by default: model.onnx is the
    default routing from the TorchScript exporter; others say what they are (model.loop.onnx)."""
    parts = ["model"] + ([routing] if routing != ROUTING else []) + ([exporter] if exporter != "torchscript" else [])
    return ".".join(parts) + ".onnx"
