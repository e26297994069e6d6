"""Saving and loading trained models; the structure travels with the weights."""
import os
import pickle
import re
import zipfile

import torch

import config
from moe import build_model

from .cli import UserError, atomic_path

DEFAULT_PATH = config.CHECKPOINT_PATH
SCRIPTED_PATH = "model.pt"


def save(state, path):
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def is_torchscript_archive(path):
    """TorchScript archives are zip files that carry their compiled code (code/ ... .py)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name or name.startswith("code/") for name in archive.namelist())


def load(path, flag="--checkpoint"):
    """The checkpoint dict at path, read with weights_only=True: tensors, numbers, strings and
    containers only, so a crafted file cannot run code while it is read. flag: the command-line flag
    that names the checkpoint, for the messages."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found; run train.py first (or pass {flag} PATH)")
    if is_torchscript_archive(path):
        raise UserError(f"{path} is a TorchScript model, not a checkpoint; pass the checkpoint.pt "
                        f"train.py wrote ({flag})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        refused = re.search(r"GLOBAL (\S+)", str(error))
        if refused:
            raise UserError(f"{path} is refused: it asks to call {refused.group(1)} while it is read, which "
                            "a checkpoint never does (nothing was run); pass a checkpoint train.py wrote")
        raise UserError(f"{path} is not a readable checkpoint (not a PyTorch file of tensors and plain data); "
                        "pass the checkpoint.pt train.py wrote")
    except Exception as error:
        raise UserError(f"{path} is not a readable checkpoint ({type(error).__name__}); "
                        "run train.py again to write a new one")
    if not isinstance(state, dict) or "structure" not in state or "state_dict" not in state:
        raise UserError(f"{path} is not a checkpoint written by train.py; run train.py again")
    fixed = {name: state["structure"].get(name, getattr(config, name)) for name in ("INPUT_SIZE", "CLASSES")}
    if fixed != {"INPUT_SIZE": config.INPUT_SIZE, "CLASSES": config.CLASSES}:
        raise UserError(f"{path} breaks the model contract: expected INPUT_SIZE={config.INPUT_SIZE} "
                        f"(28x28 pixels) and CLASSES={config.CLASSES}, found "
                        + ", ".join(f"{k}={v}" for k, v in fixed.items()))
    return state


def merged_structure(saved, overrides, path):
    """The saved structure with the user's overrides; only names that change no weight shape
    (config.FREE_AT_LOAD) may differ from what the model was trained with."""
    structure = {**config.defaults(), **saved}
    for name, value in overrides.items():
        if name not in config.FREE_AT_LOAD and structure[name] != value:
            raise UserError(f"{path} was trained with {name}={structure[name]}, but the command "
                            f"line asks for {value}; drop that flag or train a new model")
        structure[name] = value
    return config.validate(structure)


def load_model(path=DEFAULT_PATH, overrides=None, flag="--checkpoint"):
    """(model in eval mode, its structure, the whole checkpoint dict); flag as for load()."""
    state = load(path, flag)
    structure = merged_structure(state["structure"], overrides or {}, path)
    model = build_model(structure)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as error:
        first = str(error).strip().splitlines()[1:2] or [str(error)]
        raise UserError(f"{path}: its weights do not match its saved structure "
                        f"({first[0].strip()}); run train.py again")
    return model.eval(), structure, state
