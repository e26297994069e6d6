"""Each backend as a runner: made from a model file or the checkpoint, predict(pixels) -> (logits,
gates), describe() -> what really ran (engine, provider, precision, threads). registry.py names every
runner the scripts compose. The runner modules themselves import nothing from the repository's top
level, so a Ray worker that is sent only this package can make one."""
