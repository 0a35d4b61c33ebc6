"""Data-parallel training with PyTorch's own engine: torchrun sets the environment, DDP or FSDP2 wraps the model.

Why this module exists: the trainer should not care whether it runs as one process or as rank 3 of 64. It asks
this module for a `DistContext` (rank, world size, device), wraps its model with `wrap_model`, enters
`grad_sync(model, last)` around each micro-batch so gradients are all-reduced once per optimizer step (not
once per micro-batch), averages logged numbers with `all_reduce_mean`, and measures the gradient for
clipping with `grad_norm`, which is correct for FSDP2's sharded DTensor gradients too. Nothing here
re-implements communication: DDP is `torch.nn.parallel.DistributedDataParallel`, FSDP2 is `fully_shard`
(see `fsdp_api`) applied per transformer block and then to the root, and the launcher is `torchrun`.

Backends: NCCL on CUDA (one GPU per local rank), gloo on CPU. A single process (no torchrun, or
WORLD_SIZE=1) never calls `init_process_group`, so the plain `gptforge train` path has no distributed cost.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, NoReturn, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn

from ..errors import UserError

Parallel = Literal["none", "ddp", "fsdp"]
PARALLEL_CHOICES = ("auto", "none", "ddp", "fsdp")
T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job. `world_size == 1` means no process group exists."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # "nccl" | "gloo" | None (single process)

    @property
    def is_main(self) -> bool:
        """Rank 0 alone logs, writes metrics, plots and samples, and renames finished checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise UserError(f"environment variable {name}={value!r} is not an integer; launch with torchrun, "
                        "which sets RANK, LOCAL_RANK and WORLD_SIZE") from None


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistContext:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE, pick this rank's device and join the process group.

    `device` is the trainer's `train.device`: "auto" takes cuda:LOCAL_RANK when CUDA exists, else the CPU;
    "cuda" means cuda:LOCAL_RANK; "cpu" forces gloo even on a GPU machine (useful for debugging). Calling it
    again when the group already exists returns the same context (tests and notebooks call it twice).
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"RANK={rank} / WORLD_SIZE={world_size} from the environment are inconsistent; "
                        "launch with torchrun --nproc_per_node N")
    if world_size == 1:  # one process: any device the trainer supports (cuda:N, mps, ...), no group
        from .precision import resolve_device
        return DistContext(device=resolve_device(device))
    use_cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise UserError(f"train.device={device}: CUDA is not available here; use train.device=cpu")
        if device.startswith("cuda:"):
            raise UserError(f"train.device={device}: with torchrun each rank uses cuda:LOCAL_RANK; "
                            "set train.device=cuda or auto")
        index = local_rank
        if index >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} has no GPU (this node has {torch.cuda.device_count()}); "
                            "lower --nproc_per_node to the number of GPUs")
        torch.cuda.set_device(index)
        dev = torch.device("cuda", index)
    elif device in ("auto", "cpu"):
        dev = torch.device("cpu")
    else:
        raise UserError(f"train.device {device!r}: distributed training runs on cpu or cuda; use auto")
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": datetime.timedelta(minutes=timeout_minutes)}
        if dev.type == "cuda":
            kwargs["device_id"] = dev  # binds NCCL to this GPU up front (torch >= 2.3)
        dist.init_process_group(**kwargs)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=dev, backend=backend)


def resolve_parallel(parallel: str, world_size: int) -> Parallel:
    """"auto" -> "ddp" when several processes run, "none" for one; "none" with several is refused."""
    if parallel not in PARALLEL_CHOICES:
        raise UserError(f"train.parallel={parallel!r}: choose one of {', '.join(PARALLEL_CHOICES)}")
    if parallel == "auto":
        return "ddp" if world_size > 1 else "none"
    if parallel == "none" and world_size > 1:
        raise UserError(f"train.parallel=none with {world_size} processes would train {world_size} unrelated "
                        "models; use train.parallel=ddp or fsdp (or launch without torchrun)")
    return parallel  # type: ignore[return-value]


def teardown() -> None:
    """Leave the process group (so torchrun's workers exit cleanly, without NCCL warnings).

    All ranks meet first: a rank that destroyed its group and exited while another was still writing
    (rank 0 saves plots and checkpoints last) made gloo's background thread on the slower rank abort the
    process now and then. Garbage from the run (wrapped models, pending works) is collected before the group
    goes, so the group's own objects are freed while the interpreter is whole (see `exit_worker`)."""
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def exit_worker(code: int) -> NoReturn:
    """End a torchrun worker whose work is done and saved: leave the group, flush stdout and stderr, and
    `os._exit(code)` without interpreter finalization. End a script of your own launched by torchrun with it.

    Why not a normal exit: gloo objects that outlive `destroy_process_group` (the FSDP / DDP state of a model
    still referenced) are destroyed during interpreter finalization, where gloo sometimes aborts the process
    ("terminate called without an active exception", SIGABRT) after everything was written, and torchrun
    then reports the finished run as failed (seen after `main` returned, about 1 run in 10 on a loaded
    2-core machine). Everything gptforge writes is closed and renamed before this point."""
    teardown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing left to say on it
            pass
    os._exit(code)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


# ---- wrapping ---------------------------------------------------------------------------------------------


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: the unit of FSDP2 sharding and of activation checkpointing."""
    return list(model.transformer.h)  # type: ignore[attr-defined]


def apply_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in backward instead of storing them (memory for ~33% compute).

    Done by replacing each block's bound `forward` rather than wrapping it in another module, so parameter
    names (and therefore checkpoints, optimizer state keys and exports) stay exactly those of the plain GPT.
    Only training forwards with gradients recompute; evaluation and the KV-cache path run normally.
    """
    from torch.utils.checkpoint import checkpoint

    for block in _blocks(model):
        original = block.forward

        @functools.wraps(original)
        def forward(x: torch.Tensor, kv_cache: Any = None, _original: Any = original) -> torch.Tensor:
            if kv_cache is None and torch.is_grad_enabled():
                return checkpoint(_original, x, use_reentrant=False)
            return _original(x, kv_cache)

        block.forward = forward  # type: ignore[method-assign]


def fsdp_api() -> Any:
    """The module holding FSDP2's API: `torch.distributed.fsdp` from torch 2.6, where it became public;
    torch 2.4-2.5 (the floor is 2.5) have the same names only under `torch.distributed._composable.fsdp`.

    Every FSDP2 name this package uses (`fully_shard`, `FSDPModule`, `MixedPrecisionPolicy`,
    `register_fsdp_forward_method`) exists under both paths, so callers take them from here.
    """
    import torch.distributed.fsdp as public
    if hasattr(public, "fully_shard"):
        return public
    import torch.distributed._composable.fsdp as composable  # torch < 2.6
    return composable


def mixed_precision_policy(precision: str) -> Any:
    """FSDP2's policy for the trainer's precision: bf16 compute copies of the weights, fp32 gradient reduction.

    fp32 master weights and AdamW state stay sharded in fp32; reducing gradients in fp32 keeps the sum
    over many ranks from losing bits. "fp32" needs no policy.
    """
    if precision != "bf16":
        return None
    return fsdp_api().MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def wrap_model(model: nn.Module, ctx: DistContext, parallel: Parallel, precision: str = "fp32",
               activation_checkpointing: bool = False) -> nn.Module:
    """Return the module the training forward should call.

    - "none": the model itself.
    - "ddp": `DistributedDataParallel(model)`; every rank keeps the full weights and AdamW state, gradients
      are all-reduced (averaged) in buckets during backward. The plain model stays reachable as `.module`.
    - "fsdp": FSDP2 in place: `fully_shard` on every block, then on the root (embeddings, final norm, tied
      head), so each rank stores 1/world_size of every parameter as a DTensor, gathers one block's weights
      just before using it and frees them after. The returned object *is* `model` (now an FSDPModule).
      Build the optimizer after this call: it must see the sharded parameters.

    Weights must be identical on all ranks before wrapping (same seed); DDP also broadcasts rank 0's.
    """
    if activation_checkpointing:
        apply_activation_checkpointing(model)
    if parallel == "none":
        return model
    if not ctx.distributed:
        raise UserError(f"train.parallel={parallel} needs several processes: launch with "
                        "torchrun --nproc_per_node N -m gptforge train ...")
    if parallel == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if parallel == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        fully_shard = fsdp_api().fully_shard
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        kwargs: dict[str, Any] = {"mesh": mesh}
        policy = mixed_precision_policy(precision)
        if policy is not None:
            kwargs["mp_policy"] = policy
        blocks = _blocks(model)
        for i, block in enumerate(blocks):
            # The last block's weights are needed again at once by backward: keep them gathered.
            fully_shard(block, reshard_after_forward=i < len(blocks) - 1, **kwargs)
        fully_shard(model, **kwargs)
        _register_fsdp_methods(model)
        return model
    raise UserError(f"train.parallel={parallel!r}: choose one of {', '.join(PARALLEL_CHOICES)}")


def build_fsdp_model(build: Callable[[], nn.Module], ctx: DistContext, precision: str = "fp32",
                     activation_checkpointing: bool = False,
                     initial_state: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Build a model straight into FSDP2 shards, never materialising it whole on a GPU.

    The model is created on the meta device (no memory), sharded, and allocated shard by shard on this
    rank's device; rank 0 alone builds the initialised full model in host memory, once, and
    `set_model_state_dict(..., broadcast_from_rank0=True)` sends each rank its shards. So a model that only
    fits sharded can be trained, and the initial weights are exactly those of a single process with the same
    seed (rank 0 draws them from the same CPU generator). Call with the seed already set on every rank.
    `initial_state` (a full state dict, e.g. pretrained weights for `train.init_from`) replaces rank 0's
    initialisation.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    with torch.device("meta"):
        model = build()
    wrap_model(model, ctx, "fsdp", precision, activation_checkpointing)
    model.to_empty(device=ctx.device)
    full = {}
    if ctx.is_main:
        full_model = build()
        if initial_state is not None:
            full_model.load_state_dict(initial_state)
        full = full_model.state_dict()
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def _register_fsdp_methods(model: nn.Module) -> None:
    """Let `hidden_states` and `head` (generation and scoring call them directly) gather the root's sharded
    weights.

    FSDP2 gathers parameters in forward hooks; methods other than `forward` need registering.
    """
    register = fsdp_api().register_fsdp_forward_method
    for name in ("hidden_states", "head"):
        if hasattr(model, name):
            register(model, name)


def unwrap(model: nn.Module) -> nn.Module:
    """The GPT inside a DDP wrapper or torch.compile (FSDP2 wraps in place, so it is its own inner model)."""
    model = getattr(model, "_orig_mod", model)
    return getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model


def is_fsdp(model: nn.Module) -> bool:
    return isinstance(unwrap(model), fsdp_api().FSDPModule)


# ---- the step ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def grad_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Enter around one micro-batch's forward+backward; `sync=False` for all but the last micro-batch.

    DDP: `no_sync()` skips the all-reduce and lets gradients accumulate locally. FSDP2:
    `set_requires_gradient_sync(False)` skips the reduce-scatter and accumulates unsharded gradients.
    Either way one optimizer step costs one gradient communication, whatever the accumulation.
    """
    model = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(model, nn.parallel.DistributedDataParallel):
        if sync:
            yield
        else:
            with model.no_sync():
                yield
        return
    if is_fsdp(model):
        fsdp_model = unwrap(model)
        fsdp_model.set_requires_gradient_sync(sync)  # type: ignore[attr-defined]
        try:
            yield
        finally:
            fsdp_model.set_requires_gradient_sync(True)  # type: ignore[attr-defined]
        return
    yield


def grad_norm(parameters: Iterable[torch.Tensor]) -> torch.Tensor:
    """The global L2 norm of the parameters' gradients, as a plain (local) tensor; gradients are not touched.

    FSDP2's gradients are DTensor shards: the per-shard norms are reduced across ranks, so the norm is that
    of the whole model, the same on every rank, and equal (to rounding) to the single-process norm; it comes
    back as a replicated DTensor, which we make an ordinary tensor. It is the norm
    `torch.nn.utils.clip_grad_norm_` computes before it clips (to rounding: on a CPU the squares are summed
    by BLAS).
    """
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads and all(g.device.type == "cpu" and not hasattr(g, "full_tensor") for g in grads):
        # A CPU's BLAS dot sums the squares 2.5x faster than vector_norm (GPT-2's 154 MB head gradient: 4.3
        # vs 10.7 ms on 2 cores; the whole model's norm was ~30 ms of a ~650 ms bf16 step at B 4, T 128)
        return torch.stack([torch.dot(g.reshape(-1), g.reshape(-1)) for g in grads]).sum().sqrt()
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: foreach norms where the device has them
        norm = torch.nn.utils.get_total_norm(grads, 2.0)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, 2.0) for g in grads]), 2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """The sum of `value` over ranks (a copy; the identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """The mean of `value` over ranks (a copy; the identity in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (a one-element list in a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank (e.g. a UserError message so that all ranks stop together)."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 only and hand its result (or its UserError) to every rank.

    For work with side effects on shared disk (creating the run directory, writing config.json): done once,
    and if it fails for a reason the user can fix, every rank stops with the same message instead of the
    others waiting forever in the next collective.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except UserError as e:
            error = str(e)
    result, error = broadcast_object((result, error))
    if error is not None:
        raise UserError(error)
    return result  # type: ignore[return-value]


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over ranks: decisions that change control flow (stop, skip a step)
    must be taken by all ranks together, or the next collective deadlocks."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(flags)
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]
