"""The numerical pieces the models share: sparse first layers, KL terms, the multinomial
likelihood with a hand-written backward, PIA's closed-form alignment, and the
corruptions of the noise-contrastive regularizer. Pure functions of tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from piarec.models.contract import SparseBatch


def standard_normal(batch: SparseBatch, like: torch.Tensor) -> torch.Tensor:
    """N(0, I) shaped like ``like`` [B, d]: keyed by user when the batch carries
    :class:`KeyedNoise`, else from torch's generator (``randn_like``)."""
    if batch.noise is None:
        return torch.randn_like(like)
    return batch.noise.normal(like.shape[1]).to(like.dtype)


def sparse_first_layer(
    batch: SparseBatch, weight: torch.Tensor, bias: torch.Tensor, keep_prob: float
) -> torch.Tensor:
    """``dropout(normalize(x)) @ weight + bias`` for binary rows x, without building x.

    L2-normalise each row (1/sqrt(|x_u|) per item), drop items with probability
    1 - keep_prob and scale survivors by 1/keep_prob (``nn.Dropout`` after
    ``F.normalize``, as in Liang et al.). ``weight``: float32 [I, H]. Returns [B, H].
    """
    lengths = batch.lengths.clamp(min=1).to(weight.dtype)
    weights = torch.repeat_interleave(lengths.rsqrt(), batch.lengths)
    if keep_prob < 1.0:
        draws = batch.noise.entry_uniform(batch.row_ids(), batch.indices) if batch.noise is not None else torch.rand(
            weights.shape, device=weights.device)
        keep = draws < keep_prob
        weights = weights * keep / keep_prob
    h = F.embedding_bag(batch.indices, weight, batch.offsets, mode="sum", per_sample_weights=weights)
    return h + bias


def dense_first_layer(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``normalize(x) @ weight + bias`` for dense non-negative rows x, float [B, I] -> [B, H].

    The same L2 normalisation the sparse path applies to binary rows, so a binary x gives
    exactly :func:`sparse_first_layer` with ``keep_prob=1``. The encoder is therefore
    invariant to the scale of x: a softmax p and the expected counts |x_u| * p encode alike.
    """
    return F.normalize(x, dim=1) @ weight + bias


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, I)) per row, float32 [B]."""
    return -0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)


def gaussian_kl_wide(mu: torch.Tensor, logvar: torch.Tensor, scale: float) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(0, scale^2 I)) per row, float32 [B]."""
    log_s2 = 2.0 * math.log(scale)
    return 0.5 * ((logvar.exp() + mu.pow(2)) / scale**2 - 1.0 - logvar + log_s2).sum(dim=1)


def warmup_weight(step: int, final: float, warmup_steps: int) -> float:
    """``final * min(1, step / warmup_steps)``: linear from 0 at step 0 to ``final``
    (``final`` from the start when ``warmup_steps`` is 0)."""
    if warmup_steps <= 0:
        return float(final)
    return float(final) * min(1.0, step / warmup_steps)


def swap_items(batch: SparseBatch, n_items: int, fraction: float) -> SparseBatch:
    """A copy of ``batch`` with each entry replaced, with probability ``fraction``, by an
    item drawn uniformly from all ``n_items`` (row lengths unchanged; a drawn item may
    repeat one the row holds, a negligible count bump when rows are short next to I)."""
    swap = torch.rand(batch.indices.shape, device=batch.indices.device) < fraction
    drawn = torch.randint(n_items, batch.indices.shape, device=batch.indices.device)
    return SparseBatch(torch.where(swap, drawn, batch.indices), batch.offsets, batch.lengths)


def sample_from_decoder(logits: torch.Tensor, lengths: torch.Tensor) -> SparseBatch:
    """Histories drawn from the decoder: row u holds ``lengths[u]`` distinct items sampled
    without replacement from softmax(logits_u). ``logits`` [B, I] (not differentiated)."""
    probs = torch.softmax(logits.detach().float(), dim=1)
    n = int(lengths.max().clamp(min=1))
    draws = torch.multinomial(probs, n, replacement=False)  # [B, n]
    keep = torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]
    offsets = torch.cumsum(lengths, 0) - lengths
    return SparseBatch(draws[keep], offsets, lengths.clone())


# Rows per block of the CPU log-sum-exp: about 1 MB of float32 logits, so the block's
# temporary (logits - max) stays in cache and on the heap.
_LSE_BLOCK_FLOATS = 1 << 18


def _row_logsumexp(logits: torch.Tensor) -> torch.Tensor:
    """``torch.logsumexp(logits, dim=1)``, bit for bit, for float [B, I] logits.

    On the CPU it runs in blocks of rows. ``torch.logsumexp`` materialises ``logits - max``
    as a [B, I] temporary; at 500 x 20,000 that is 40 MB, fresh ``mmap`` pages every update
    (glibc serves blocks over 32 MB that way), written once and read twice. In 1 MB blocks
    an update at that shape is 1.14-1.19x faster (the ``unblocked`` arm of
    benchmarks/train_speed.py; docs/benchmarks.md section 5). Each row is reduced alone
    either way (the reduction splits over rows, never within one, unless a block has a
    single row: so a trailing one-row block joins the one before it), so the result and the
    trainer's weights are unchanged. On a GPU the single call is the fast path.
    """
    n = logits.shape[0]
    step = max(2, _LSE_BLOCK_FLOATS // max(1, logits.shape[1]))
    if logits.device.type != "cpu" or n <= step:
        return torch.logsumexp(logits, dim=1)
    out = logits.new_empty(n)
    starts = list(range(0, n, step))
    if n - starts[-1] == 1:
        starts.pop()
    for start, stop in zip(starts, [*starts[1:], n]):
        torch.logsumexp(logits[start:stop], dim=1, out=out[start:stop])
    return out


class _MultinomialNLL(torch.autograd.Function):
    """-mean_u sum_{i in S_u} log softmax(logits_u)_i with a hand-written backward,
    ``mean_u(|S_u| softmax_u - x_u) / B``: one [B, I] buffer instead of autograd's three
    (logsumexp's gradient, a zero-filled gather gradient, and their sum), or none with
    ``reuse``: the gradient is then written over the saved logits."""

    @staticmethod
    def forward(ctx, logits, rows, cols, lengths, reuse):
        lse = _row_logsumexp(logits)  # [B]
        picked = logits[rows, cols]  # [nnz]
        per_user = torch.zeros_like(lse).index_add_(0, rows, picked) - lengths * lse
        ctx.save_for_backward(logits, lse, rows, cols, lengths)
        ctx.reuse = reuse
        return -per_user.mean()

    @staticmethod
    def backward(ctx, grad_out):
        logits, lse, rows, cols, lengths = ctx.saved_tensors
        scale = grad_out / logits.shape[0]
        shifted = logits.sub_(lse[:, None]) if ctx.reuse else torch.sub(logits, lse[:, None])
        grad = shifted.exp_().mul_((lengths * scale)[:, None])
        grad.index_put_((rows, cols), (-scale).expand(rows.shape[0]), accumulate=True)
        return grad, None, None, None, None


def multinomial_nll(logits: torch.Tensor, batch: SparseBatch, *, reuse_logits: bool = False) -> torch.Tensor:
    """-mean_u sum_{i in S_u} log softmax(logits_u)_i, gathering only at the positives.
    ``logits``: float [B, I]; returns a scalar. Computed in fp32 or wider
    (bf16 logits under ``training.precision: bf16``): the log-sum-exp over thousands of items needs it.

    ``reuse_logits``: backward writes the gradient over ``logits`` instead of into a new
    [B, I] buffer (the same values, bit for bit). For a caller whose logits are the loss's own
    temporary, as in the models' ``loss``: ``logits`` holds the gradient after backward, and a
    second backward through a retained graph raises (torch's check of tensors modified in
    place). At 500 users x 20,000 titles it saves a 40 MB buffer an update (on the CPU 1.02-
    1.05x an update: docs/benchmarks.md section 5). A leaf tensor is never overwritten."""
    if logits.dtype in (torch.bfloat16, torch.float16):
        logits = logits.float()  # a copy: reusing it leaves the caller's bf16 logits alone
    reuse = reuse_logits and logits.grad_fn is not None
    return _MultinomialNLL.apply(logits, batch.row_ids(), batch.indices, batch.lengths.to(logits.dtype), reuse)


def alignment_closed_form(
    mu: torch.Tensor, logvar: torch.Tensor, anchors: torch.Tensor, batch: SparseBatch
) -> torch.Tensor:
    """Eq. 9 in the closed form of Proposition 3.1, per user, float32 [B]:

        (1/|S|) sum_{i in S} E_q ||z - e_i||^2
          = ||mu - e_bar||^2 + tr Sigma + (1/|S|) sum_i ||e_i||^2 - ||e_bar||^2

    The last two terms are constant in the encoder but not in E, so they are kept:
    gradients reach mu, sigma and the anchors exactly as for Eq. 9.
    """
    centroid = F.embedding_bag(batch.indices, anchors, batch.offsets, mode="mean")  # [B, d]
    sq_norms = anchors.pow(2).sum(dim=1, keepdim=True)  # [I, 1]
    mean_sq = F.embedding_bag(batch.indices, sq_norms, batch.offsets, mode="mean").squeeze(1)
    return (
        (mu - centroid).pow(2).sum(dim=1)
        + logvar.exp().sum(dim=1)
        + mean_sq
        - centroid.pow(2).sum(dim=1)
    )
