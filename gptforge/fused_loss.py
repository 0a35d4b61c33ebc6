"""Output projection + cross-entropy in row chunks, without ever holding the full logits.

For GPT-2 the logits of one micro-batch are (B·T, 50257): at B·T = 1024 that is 206 MB in fp32, and the
plain path keeps several such tensors alive at once (the logits, their fp32 upcast, the log-softmax, its
gradient) and spends much of a CPU step just filling and copying them. Here each chunk of rows is projected,
scored and differentiated immediately, in the forward pass:

    logits_c = h_c @ W.T                        (autocast dtype: bf16 matmul under bf16 autocast)
    logp_c   = log_softmax(float32(logits_c))   (fp32, so the loss is as exact as the plain fp32 path;
                                                 columns of padded ids set to -inf first)
    loss    += -sum(logp_c[target]) over rows whose target is not ignore_index
    g_c      = softmax_c - onehot(target)       (d loss_sum / d logits_c)
    grad_h_c = g_c @ W                          (ignored rows zeroed)
    grad_W  += g_c.T @ h_c                      (fp32 accumulator shaped like the *padded* weight)

The mean's 1/n_valid and the incoming grad_output are applied once, in backward, to the small results
(N×d and V×d) rather than to every N×V logit. grad_W has the padded weight's shape, zero in the padded
rows (their softmax is 0), so there is no slice-backward that zero-fills and copies a padded gradient.

Used for training only (GPT.forward(..., return_logits=False)): evaluation and generation need the logits.
In the spirit of Liger-Kernel's fused linear cross-entropy; written from scratch in plain torch ops so it
runs on CPU and CUDA alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Budget for one chunk's fp32 logits. The chunk buffers are these, an fp32 log-softmax of the same size and,
# under bf16, the bf16 logits/gradient (2.5x in all), plus under bf16 one V×d bf16 partial grad_W: ~320 MB
# (+77 MB) for GPT-2 whatever the batch, against ~10 bytes per logit for the plain path (1 GB at
# B·T = 2048, 4 GB at 8192). Smaller chunks cost speed: each chunk adds one read-modify-write of the fp32
# grad_W accumulator (V×d) and runs smaller matmuls. 128 MB is 667 rows at GPT-2's vocabulary; against 64 MB
# (333 rows) it took the bf16 fused loss on a 2-core CPU from 173 to 139 ms at 512 rows and from 332 to
# 261 ms at 1024, while 256 MB was no faster.
CHUNK_BYTES = 128 * 2**20


def chunk_rows(n_rows: int, vocab_size: int, chunk_bytes: int | None = None) -> int:
    """Rows per chunk: as many as fit `chunk_bytes` of fp32 logits, spread evenly so that the last chunk
    is not a sliver (1024 rows at 333 per chunk -> 4 chunks of 256)."""
    budget = max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * vocab_size))
    n_chunks = -(-n_rows // budget)
    return max(1, -(-n_rows // max(1, n_chunks)))


def _compute_dtype(h: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype F.linear would compute in here: autocast's when autocast is on, else the inputs' own."""
    device_type = h.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(h.dtype, weight.dtype)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """Loss = mean over non-ignored rows of cross_entropy(h @ weight[:vocab_size].T, targets).

    Forward computes the loss and both gradients chunk by chunk (see the module docstring); backward only
    scales the stored gradients by grad_output / n_valid and casts them to the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                ignore_index: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
        # Autocast off inside: every cast is explicit below, so the matmuls run in `dtype` and the
        # softmax in fp32 whatever autocast's op lists say.
        with torch.autocast(h.device.type, enabled=False):
            n, d = h.shape
            rows = min(rows, n)
            valid = targets != ignore_index
            n_valid = valid.sum()
            safe_targets = torch.where(valid, targets, 0)[:, None]  # any in-range index; row masked anyway
            minus_one = torch.full((rows, 1), -1.0, device=h.device)
            mask = valid.to(dtype)[:, None]
            hc = h.to(dtype)
            # The whole padded weight: its row count is a multiple of 64, which fp32 matmuls here run up to
            # 1.3x faster than the real vocabulary's odd 50257. Padded columns get logit -inf, hence
            # softmax 0, hence exactly zero gradient in the padded rows of grad_W.
            w = weight.to(dtype)
            grad_h = torch.empty((n, d), dtype=torch.float32, device=h.device)
            grad_w = torch.empty(weight.shape, dtype=torch.float32, device=weight.device)
            loss_sum = torch.zeros((), dtype=torch.float32, device=h.device)
            # Chunk buffers, allocated once and reused by every chunk: on a CPU each fresh allocation this
            # large is new zeroed pages from the kernel, and faulting them in costs as much as the math.
            # `logits` holds the matmul output, then (same dtype, no longer needed) the gradient g.
            logits = torch.empty((rows, w.size(0)), dtype=dtype, device=h.device)
            logits32 = logits if dtype == torch.float32 else torch.empty_like(logits, dtype=torch.float32)
            logp = torch.empty_like(logits32)
            partial = None if dtype == torch.float32 else torch.empty_like(w)  # one chunk's grad_W in `dtype`
            for start in range(0, n, rows):
                k = min(rows, n - start)
                rows_h, t, m = hc[start:start + k], safe_targets[start:start + k], mask[start:start + k]
                torch.mm(rows_h, w.T, out=logits[:k])
                if logits32 is not logits:
                    logits32[:k].copy_(logits[:k])
                logits32[:k, vocab_size:] = float("-inf")
                torch.log_softmax(logits32[:k], dim=-1, out=logp[:k])
                loss_sum -= (logp[:k].gather(1, t) * m).sum()
                p = logp[:k].exp_()  # softmax, in place
                p.scatter_add_(1, t, minus_one[:k])  # minus the one-hot target
                g = logits[:k].copy_(p) if logits32 is not logits else p
                grad_h[start:start + k] = torch.mm(g, w) * m
                if partial is None:  # fp32: accumulate in place
                    if start == 0:
                        torch.mm(g.T, rows_h * m, out=grad_w)
                    else:
                        grad_w.addmm_(g.T, rows_h * m)
                else:
                    torch.mm(g.T, rows_h * m, out=partial)
                    _add_into(grad_w, partial, first=start == 0)
        # On ctx, not save_for_backward (which is for inputs and outputs): backward hands over the only
        # reference to grad_w, so whatever sums it with the tied embedding's gradient (GPT's
        # _SumTiedGradients, or autograd's own accumulation) may add in place. A tensor still saved on ctx
        # counts as shared, and autograd then copies the whole V x d sum.
        ctx.grads = (grad_h, grad_w, n_valid)
        ctx.dtypes = (h.dtype, weight.dtype)
        return loss_sum / n_valid

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        # Scaled in place: a fresh V×d tensor would cost as much again (on a CPU, new pages to fault in).
        # The stored gradients are then spent, so a second backward through the same graph is refused.
        if ctx.grads is None:
            raise RuntimeError("the fused loss does not support a second backward through the same graph "
                               "(retain_graph=True); use GPT.forward(..., return_logits=True) for that")
        (grad_h, grad_w, n_valid), ctx.grads = ctx.grads, None
        h_dtype, w_dtype = ctx.dtypes
        scale = grad_loss.float() / n_valid
        return grad_h.mul_(scale).to(h_dtype), grad_w.mul_(scale).to(w_dtype), None, None, None, None, None


# Rows per block when summing a bf16 partial into the fp32 accumulator on a CPU (4 MB of fp32).
_ADD_BLOCK_BYTES = 4 * 2**20


def _add_into(acc: torch.Tensor, partial: torch.Tensor, first: bool) -> None:
    """acc (fp32) = partial on the first chunk, acc += partial after, summing in fp32 so that many chunks
    do not lose bits. A CPU mixed-dtype add_ first copies its whole operand to a fresh fp32 tensor (V×d per
    chunk, 7x slower than the add itself here), so on a CPU the cast goes through one small reused buffer;
    CUDA casts inside the kernel."""
    if first:
        acc.copy_(partial)
    elif acc.device.type != "cpu":
        acc.add_(partial)
    else:
        block = max(1, _ADD_BLOCK_BYTES // (4 * acc.size(1)))
        buffer = torch.empty((block, acc.size(1)), dtype=acc.dtype)
        for start in range(0, acc.size(0), block):
            rows = min(block, acc.size(0) - start)
            acc[start:start + rows].add_(buffer[:rows].copy_(partial[start:start + rows]))


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, vocab_size: int,
                         ignore_index: int = -100, chunk_bytes: int | None = None) -> torch.Tensor:
    """Mean cross-entropy of `h @ weight[:vocab_size].T` against `targets`, never materialising the logits.

    h: (N, d) final hidden states (after the final norm); weight: (padded_vocab, d), the tied embedding;
    targets: (N,) ids, `ignore_index` rows left out of the mean. Returns an fp32 scalar, equal to
    F.cross_entropy on the full fp32-upcast logits. With gradients enabled the fused autograd function
    computes the gradients in the forward pass; without, the loss is summed chunk by chunk.
    """
    rows = chunk_rows(h.size(0), vocab_size, chunk_bytes)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _FusedLinearCrossEntropy.apply(h, weight, targets, vocab_size, ignore_index, rows,
                                              _compute_dtype(h, weight))
    w = weight[:vocab_size]
    total = torch.zeros((), dtype=torch.float32, device=h.device)
    for start in range(0, h.size(0), rows):
        logits = F.linear(h[start:start + rows], w)  # autocast applies here as in the plain head
        total += F.cross_entropy(logits.float(), targets[start:start + rows], ignore_index=ignore_index,
                                 reduction="sum")
    return total / (targets != ignore_index).sum()
