"""Run by tests/test_parallel.py under torchrun: the expert-parallel forward of a checkpoint on the
first N test images, each rank taking every world-th row, gathered on rank 0 and compared with one
process's forward. Writes {"max_abs_diff", "argmax_equal", "gates_equal", "rows"} to the JSON path."""
import json
import sys

import torch
import torch.distributed as dist

from moebench import checkpoint, parallel
from data import load_split

path, data_dir, count, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = parallel.setup("expert", torch.device("cpu"))
images = load_split("test", data_dir, count)[0]
whole, _, _ = checkpoint.load_model(path)
with torch.no_grad():
    expected_logits, expected_gates = whole(images)
model = checkpoint.load_model(path)[0]
parallel.wrap(model, ctx)
with torch.no_grad():
    logits, gates, _ = parallel.expert_parallel_forward(model.eval(), images[ctx.rank::ctx.world], ctx)
gathered = [None] * ctx.world
dist.all_gather_object(gathered, (logits, gates))
if ctx.main:
    got_logits, got_gates = torch.empty_like(expected_logits), torch.empty_like(expected_gates)
    for rank, (rank_logits, rank_gates) in enumerate(gathered):
        got_logits[rank::ctx.world], got_gates[rank::ctx.world] = rank_logits, rank_gates
    with open(out, "w") as f:
        json.dump({"max_abs_diff": (got_logits - expected_logits).abs().max().item(),
                   "argmax_equal": bool((got_logits.argmax(1) == expected_logits.argmax(1)).all()),
                   "gates_equal": bool(torch.equal(got_gates, expected_gates)), "rows": len(images)}, f)
parallel.teardown(ctx)
