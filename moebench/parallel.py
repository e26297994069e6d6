"""Training in several processes with PyTorch's own engine: torch.distributed, launched by torchrun
(gloo on CPU, NCCL on GPUs).

- data parallel: every rank holds the whole model (DistributedDataParallel) and trains on its
  DistributedSampler shard of each global batch;
- expert parallel: every rank holds EXPERTS/N experts; the embedding, gate and head are replicated
  and kept in sync by averaging their gradients. Each rank's rows travel to the ranks that hold
  their chosen experts and back with all_to_all. The counts are exchanged first, so every row is
  sent exactly: no capacity, nothing dropped.

In both modes the balance loss is computed over the global batch, and one process (world size 1)
takes exactly the same batches, so a run on N processes equals one process on the same global batch."""
import os
import signal
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from .cli import UserError, error_line

MODES = ("none", "data", "expert")


@dataclass
class Context:
    mode: str = "none"
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sent_bytes: list = field(default_factory=list)  # all_to_all payload to other ranks, per step

    @property
    def main(self):
        return self.rank == 0


def setup(mode, device):
    """The process group when torchrun started us; one process otherwise. `device` is the device
    train.py picked ('cuda' becomes this rank's own GPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and mode == "none":
        raise UserError(f"torchrun started {world} processes: choose --parallel data or --parallel expert")
    if world == 1:
        return Context(mode=mode, device=device)
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # no oversubscribed cores
    return Context(mode=mode, rank=dist.get_rank(), world=world, device=device)


@contextmanager
def stop_cleanly(ctx, checkpoint_path):
    """Under torchrun, every way a run can end says so in one line and never hangs: a problem every
    rank finds is said by rank 0 alone; Ctrl-C likewise; SIGTERM (torchrun stopping the others when
    one process failed) and a lost connection to another rank are said by the rank they reach.
    Checkpoints are written atomically, so the last one written is whole."""
    if ctx.world == 1:
        yield
        return

    def stopped(signum, frame):
        raise SystemExit(f"rank {ctx.rank}: stopped by torchrun (another process failed or was interrupted); "
                         f"{checkpoint_path} holds the last finished epoch")
    signal.signal(signal.SIGTERM, stopped)
    try:
        yield
    except (UserError, KeyboardInterrupt):
        if ctx.main:
            raise
        raise SystemExit(1)
    except RuntimeError as error:
        if not lost_contact(error):
            raise
        raise SystemExit(f"rank {ctx.rank}: lost contact with another process of this run "
                         f"({error_line(error)}); {checkpoint_path} holds the last "
                         "finished epoch")


def lost_contact(error):
    """Whether a collective failed because another rank is gone (gloo and NCCL say it in their own words)."""
    text = str(error)
    return isinstance(error, dist.DistError) or any(
        words in text for words in ("Connection closed by peer", "Connection reset by peer", "gloo", "NCCL"))


def teardown(ctx):
    if ctx.world > 1 and dist.is_initialized():
        dist.destroy_process_group()


# ---------------------------------------------------------------- collectives with gradients

class _AllToAll(torch.autograd.Function):
    """Rows to other ranks by split sizes; the gradient travels back the same way reversed."""

    @staticmethod
    def forward(ctx, x, send, receive):
        ctx.send, ctx.receive = send, receive
        out = x.new_empty((sum(receive),) + tuple(x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), receive, send)
        return out

    @staticmethod
    def backward(ctx, grad):
        out = grad.new_empty((sum(ctx.send),) + tuple(grad.shape[1:]))
        dist.all_to_all_single(out, grad.contiguous(), ctx.send, ctx.receive)
        return out, None, None


def global_sum(x):
    """x summed over ranks, as a value; as a gradient, d(sum)/dx = world size. A loss built on the
    sum then gives each rank world x its share of the gradient, which averaging over ranks (DDP, or
    average_gradients) turns into the global batch's gradient. No collective runs in the backward
    pass, where ranks could reach them in different orders and wait on each other forever."""
    total = x.detach().clone()
    dist.all_reduce(total)
    return total + dist.get_world_size() * (x - x.detach())


# ---------------------------------------------------------------- data

def epoch_order(count, seed, epoch, ctx):
    """This rank's sample indices for the epoch, from a DistributedSampler; the union over ranks of
    their k-th batches is the single process's k-th global batch."""
    sampler = DistributedSampler(range(count), num_replicas=ctx.world, rank=ctx.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return torch.tensor(list(sampler))


def local_batch_size(batch_size, ctx):
    if batch_size % ctx.world:
        raise UserError(f"--batch-size {batch_size} is the global batch: it must divide by the "
                        f"{ctx.world} processes")
    return batch_size // ctx.world


def sum_over_ranks(values, ctx):
    """A list of numbers summed over ranks (for epoch statistics)."""
    if ctx.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


# ---------------------------------------------------------------- the model

class WithLoss(nn.Module):
    """forward() = the model's forward_with_loss(), so DistributedDataParallel sees the training call."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images):
        return self.model.forward_with_loss(images)


def local_experts(experts, ctx):
    if experts % ctx.world:
        raise UserError(f"--parallel expert shards {experts} experts over {ctx.world} processes: EXPERTS must "
                        "divide by the number of processes (choose --experts or --nproc_per_node)")
    per_rank = experts // ctx.world
    return range(ctx.rank * per_rank, (ctx.rank + 1) * per_rank)


def is_expert(name):
    return name.startswith("moe.experts.")


def wrap(model, ctx, every_parameter_used=True):
    """The model as this rank trains it: returns step(images) -> (logits, gates, balance loss)."""
    if ctx.world > 1:
        model.moe.sum_across_ranks = global_sum
    if ctx.mode == "data" and ctx.world > 1:
        return nn.parallel.DistributedDataParallel(WithLoss(model), find_unused_parameters=not every_parameter_used)
    if ctx.mode == "expert":
        keep = set(local_experts(model.moe.num_experts, ctx))
        for i in range(model.moe.num_experts):
            if i not in keep:
                model.moe.experts[i] = nn.Module()  # no parameters: this rank never runs expert i
        return lambda images: expert_parallel_forward(model, images, ctx)
    return model.forward_with_loss


def expert_parallel_forward(model, images, ctx):
    x = model.embedding(images)
    gates, loss = model.moe.gate(x)
    return F.linear(dispatch(model.moe, x, gates, ctx), model.head.weight, model.head.bias), gates, loss


def dispatch(moe, x, gates, ctx):
    """sum_e gates[:, e] * expert_e(x), with each (row, chosen expert) pair sent to the expert's rank."""
    per_rank = moe.num_experts // ctx.world
    rows, experts = gates.nonzero(as_tuple=True)
    order = torch.argsort(experts, stable=True)  # by expert, hence by the rank that holds it
    rows, experts = rows[order], experts[order]
    send = torch.bincount(experts // per_rank, minlength=ctx.world)
    receive = torch.empty_like(send)
    dist.all_to_all_single(receive, send)
    send, receive = send.tolist(), receive.tolist()
    their_experts = torch.empty(sum(receive), dtype=experts.dtype, device=x.device)
    dist.all_to_all_single(their_experts, experts, receive, send)
    arrived = _AllToAll.apply(x[rows], send, receive)
    computed = arrived * 0  # not zeros_like: the way back must stay in the graph even if no row came
    for e in local_experts(moe.num_experts, ctx):
        mine = (their_experts == e).nonzero().squeeze(1)
        if len(mine):
            computed = computed.index_add(0, mine, moe.experts[e](arrived.index_select(0, mine)))
    returned = _AllToAll.apply(computed, receive, send)
    ctx.sent_bytes.append(2 * (sum(send) - send[ctx.rank]) * x.shape[1] * x.element_size())
    weighted = returned * gates[rows, experts].unsqueeze(1)
    return torch.zeros_like(x).index_add(0, rows, weighted)


def average_gradients(model, ctx):
    """Expert parallel: the replicated parameters' gradients averaged over ranks; each expert's
    gradient already sums every rank's rows, so it is divided by the number of ranks too. Both
    are then the gradient of the global batch's mean loss. A parameter no row reached gets a zero
    gradient, as the single process's dense routing gives it."""
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    replicated = [p.grad for name, p in model.named_parameters() if not is_expert(name)]
    flat = torch.cat([g.reshape(-1) for g in replicated])
    dist.all_reduce(flat)
    offset = 0
    for grad in replicated:
        grad.copy_(flat[offset:offset + grad.numel()].view_as(grad))
        offset += grad.numel()
    for p in model.parameters():
        p.grad.div_(ctx.world)


# ---------------------------------------------------------------- checkpoints

def optimizer_state_by_name(model, optimizer):
    """{parameter name: its Adam state}, as this rank holds them."""
    names = {id(p): name for name, p in model.named_parameters()}
    return {names[id(p)]: {k: v.cpu() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
            for group in optimizer.param_groups for p in group["params"] if p in optimizer.state}


def full_state(model, optimizer, ctx):
    """(state_dict, optimizer state_dict) of the whole model as one process would hold them, on rank 0
    (None elsewhere): in expert parallel, every rank's experts gathered."""
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    moments = optimizer_state_by_name(model, optimizer)
    if ctx.mode == "expert" and ctx.world > 1:
        gathered = [None] * ctx.world
        dist.all_gather_object(gathered, ({k: v for k, v in weights.items() if is_expert(k)},
                                          {k: v for k, v in moments.items() if is_expert(k)}))
        for their_weights, their_moments in gathered:
            weights.update(their_weights)
            moments.update(their_moments)
    if not ctx.main:
        return None, None
    return weights, moments


def optimizer_state_dict(model_names, moments, optimizer):
    """An ordinary Adam state_dict for a single-process model whose parameters are `model_names`."""
    group = {k: v for k, v in optimizer.param_groups[0].items() if k != "params"}
    return {"state": {i: moments[name] for i, name in enumerate(model_names) if name in moments},
            "param_groups": [{**group, "params": list(range(len(model_names)))}]}


def load_optimizer_state(model, optimizer, saved, saved_names):
    """Adam state from an ordinary checkpoint, for the parameters this rank holds (by name)."""
    by_name = {saved_names[int(i)]: state for i, state in saved["state"].items()}
    for name, p in model.named_parameters():
        if name in by_name:
            optimizer.state[p] = {k: v.to(p.device) if torch.is_tensor(v) else v for k, v in by_name[name].items()}
