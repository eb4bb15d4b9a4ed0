"""Batched token sampling: each row of a [B, V] logits tensor under its own SamplingParams.

Order of processing (vLLM's; top-k, top-p, min-p in the order of vLLM v0 and HF
transformers):

    raw logits ──log_softmax──> returned logprobs (the model's own distribution)
        │
    penalties    repetition over prompt+output tokens, frequency/presence over output tokens
    min_tokens   stop ids and eos ids masked while the output is shorter than min_tokens
        ├── greedy rows: argmax
        └── random rows: / temperature → top-k → top-p → min-p → softmax
                         → exponential race drawn from the row's own generator

Batch invariance: a row's token must not depend on which other rows share the batch or on
their order. Every operation here is either elementwise or a reduction along the vocabulary
of one row (softmax, topk, sort, cumsum, argmax), so batching only changes how many rows run
at once, never what one row computes. The random numbers are the one thing that could mix
rows: each row draws its V exponentials from its own generator (seeded requests own one;
unseeded requests share the sampler's), so a seeded request's draws are the same whatever
the batch. Greedy rows draw nothing, so switching a request to greedy never shifts another's.

Two implementations of the random rows, equal token for token given the same draws
(kernels/sampling.py states the fp32-rounding caveat):

- CUDA logits (default there): one Triton kernel (kernels/sampling.sample_tokens) finds each
  row's top-k, top-p and min-p thresholds by a search over the values instead of a sort and
  runs the race, reading the noise drawn here;
- the torch path below (CPU logits, or Sampler(use_kernel=False)): the reference, with
  separate mask functions.

The kernel covers every SamplingParams combination; `use_kernel` is the one switch between
the two, so nothing falls back silently.

Costs per step (B rows, V vocabulary): one [B, V] copy of the logits; penalties build [N, V]
count and mask tensors from the token histories (O(history + N·V), rows with penalties only);
the exponential draw is one kernel per random row, because batching it would let one row's
draws depend on the others'. Torch path: top-k is a torch.topk of the largest k asked for,
not a sort; top-p sorts the whole row (O(V log V), top-p rows only). Kernel path: about 8
passes over the row per truncation asked for, 2 without any.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tandem.kernels.sampling import sample_tokens
from tandem.workers.engine.sampling_params import SamplingParams

# (prompt_token_ids, output_token_ids) of one request.
TokenHistory = tuple[Sequence[int], Sequence[int]]


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs for one sampled token, under the raw model distribution (before penalties,
    temperature and truncation; what vLLM v1 returns by default)."""

    logprob: float
    # Logprob of the token that was sampled (always present, even when it is not in `top`).
    top: tuple[tuple[int, float], ...]
    # The n most likely (token id, logprob), most likely first; n = SamplingParams.logprobs.


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor
    # [B] int64, on the device of the logits.
    logprobs: list[TokenLogprobs | None]
    # Per row; None where the request asked for no logprobs.


def seeded_generator(seed: int, device: torch.device | str) -> torch.Generator:
    """The per-request generator the engine keeps for a request with a seed."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


class Sampler:
    """Picks one token per row. Holds the generator shared by requests without a seed
    (None: torch's default generator of the device) and the choice of implementation for
    the random rows: use_kernel None picks the Triton kernel for CUDA logits and the torch
    path otherwise; True forces the kernel (CPU logits then need TRITON_INTERPRET=1), False
    the torch path."""

    def __init__(
        self, generator: torch.Generator | None = None, use_kernel: bool | None = None
    ) -> None:
        self.generator = generator
        self.use_kernel = use_kernel

    def uses_kernel(self, device: torch.device) -> bool:
        """Whether random rows of logits on `device` go through the Triton kernel."""
        return self.use_kernel if self.use_kernel is not None else device.type == "cuda"

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
        histories: Sequence[TokenHistory],
        eos_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> SamplerOutput:
        """logits [B, V] fp32 (left unmodified); per row: its params, its own generator (None:
        the shared one; must live on the logits' device), its (prompt, output) token ids, and
        the eos ids that min_tokens masks besides params.stop_token_ids."""
        _check_batch(logits, params, generators, histories, eos_token_ids)
        batch = logits.shape[0]
        device = logits.device
        work = logits.clone()  # [B, V]

        penalised = [i for i, p in enumerate(params) if p.uses_penalties]
        if penalised:
            rows = torch.tensor(penalised, device=device)
            work[rows] = apply_penalties(
                work[rows],
                [histories[i] for i in penalised],
                [params[i].repetition_penalty for i in penalised],
                [params[i].frequency_penalty for i in penalised],
                [params[i].presence_penalty for i in penalised],
            )
        apply_min_tokens(work, params, histories, eos_token_ids)

        token_ids = torch.empty(batch, dtype=torch.int64, device=device)  # [B]
        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        if greedy:
            rows = torch.tensor(greedy, device=device)
            token_ids[rows] = work[rows].argmax(dim=-1)
        randomised = [i for i, p in enumerate(params) if not p.is_greedy]
        if randomised:
            rows = torch.tensor(randomised, device=device)
            row_params = [params[i] for i in randomised]
            row_generators = [_own_or(generators[i], self.generator) for i in randomised]
            noise = exponential_noise(row_generators, logits.shape[1], device)  # [R, V]
            if self.uses_kernel(device):
                token_ids[rows] = kernel_sample(work[rows], noise, row_params)
            else:
                probs = sampling_probs(work[rows], row_params)  # [R, V]
                token_ids[rows] = race_winners(probs, noise)

        return SamplerOutput(token_ids, gather_logprobs(logits, token_ids, params))


def apply_penalties(
    logits: torch.Tensor,
    histories: Sequence[TokenHistory],
    repetition: Sequence[float],
    frequency: Sequence[float],
    presence: Sequence[float],
) -> torch.Tensor:
    """logits [N, V] -> penalised [N, V]:
    seen in prompt or output:  l > 0 ? l / repetition : l * repetition
    then:                      l - frequency * count_in_output - presence * (count > 0)."""
    n, vocab = logits.shape
    device = logits.device
    # Padding with the id `vocab` scatters into a spare column that is cut off afterwards.
    prompt = _pad_ids([h[0] for h in histories], vocab, device)  # [N, Lp]
    output = _pad_ids([h[1] for h in histories], vocab, device)  # [N, Lo]
    counts = torch.zeros(n, vocab + 1, dtype=logits.dtype, device=device)
    counts.scatter_add_(1, output, torch.ones_like(output, dtype=logits.dtype))
    counts = counts[:, :vocab]  # [N, V], exact for counts below 2**24
    in_prompt = torch.zeros(n, vocab + 1, dtype=torch.bool, device=device)
    in_prompt.scatter_(1, prompt, True)
    in_output = counts > 0  # [N, V]
    seen = in_prompt[:, :vocab] | in_output

    rep = _column(repetition, logits)  # [N, 1]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    return logits - _column(frequency, logits) * counts - _column(presence, logits) * in_output


def apply_min_tokens(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory],
    eos_token_ids: Sequence[Sequence[int]] | None,
) -> None:
    """In place on logits [B, V]: -inf on every stop id (and eos id) of the rows whose output
    is still shorter than min_tokens. eos is masked even with ignore_eos: it must not end the
    output early, and with ignore_eos it does not end it at all, so masking changes nothing."""
    rows: list[int] = []
    cols: list[int] = []
    for i, p in enumerate(params):
        if len(histories[i][1]) >= p.min_tokens:
            continue
        blocked = set(p.stop_token_ids)
        if eos_token_ids is not None:
            blocked.update(eos_token_ids[i])
        for token_id in sorted(blocked):
            rows.append(i)
            cols.append(token_id)
    if rows:
        device = logits.device
        logits[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = -torch.inf


def sampling_probs(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """logits [N, V] of non-greedy rows -> probabilities [N, V] after temperature, top-k,
    top-p and min-p (masked tokens get probability 0)."""
    vocab = logits.shape[1]
    scaled = logits / _column([p.temperature for p in params], logits)  # [N, V]
    # top_k >= V keeps everything; skipping it also keeps torch.topk within bounds.
    top_k = [j for j, p in enumerate(params) if p.uses_top_k and p.top_k < vocab]
    if top_k:
        rows = torch.tensor(top_k, device=logits.device)
        scaled[rows] = mask_top_k(scaled[rows], [params[j].top_k for j in top_k])
    top_p = [j for j, p in enumerate(params) if p.top_p < 1.0]
    if top_p:
        rows = torch.tensor(top_p, device=logits.device)
        scaled[rows] = mask_top_p(scaled[rows], [params[j].top_p for j in top_p])
    min_p = [j for j, p in enumerate(params) if p.min_p > 0.0]
    if min_p:
        rows = torch.tensor(min_p, device=logits.device)
        scaled[rows] = mask_min_p(scaled[rows], [params[j].min_p for j in min_p])
    return scaled.softmax(dim=-1)


def mask_top_k(logits: torch.Tensor, top_k: Sequence[int]) -> torch.Tensor:
    """logits [N, V] -> logits with -inf below each row's k-th largest value (ties with the
    k-th value are kept, as in vLLM). 1 <= top_k[i] <= V."""
    k = torch.tensor(top_k, dtype=torch.int64, device=logits.device)  # [N]
    # One topk of the largest k asked for instead of a full sort; values are exact, so the
    # threshold of a row does not depend on the other rows' k.
    largest = logits.topk(max(top_k), dim=-1).values  # [N, max k], descending
    kth = largest.gather(1, (k - 1).unsqueeze(1))  # [N, 1]
    return logits.masked_fill(logits < kth, -torch.inf)


def mask_top_p(logits: torch.Tensor, top_p: Sequence[float]) -> torch.Tensor:
    """logits [N, V] -> logits keeping the nucleus: the most likely tokens, in order, up to and
    including the one whose cumulative probability first reaches top_p (always >= 1 token).
    Tokens tied in probability with the last one kept are kept too."""
    p = _column(top_p, logits)  # [N, 1]
    probs = logits.softmax(dim=-1)  # [N, V]
    ordered = probs.sort(dim=-1, descending=True).values  # [N, V]; the full-row sort
    # Mass strictly before each position; a token is in the nucleus while that is < p.
    mass_before = F.pad(ordered.cumsum(dim=-1)[:, :-1], (1, 0))  # [N, V]
    kept = (mass_before < p).sum(dim=-1, keepdim=True)  # [N, 1], >= 1 since p > 0
    smallest_kept = ordered.gather(1, kept - 1)  # [N, 1]
    return logits.masked_fill(probs < smallest_kept, -torch.inf)


def mask_min_p(logits: torch.Tensor, min_p: Sequence[float]) -> torch.Tensor:
    """logits [N, V] -> logits with -inf where prob < min_p * (largest prob of the row).
    Renormalisation after top-k/top-p does not change that ratio, so this step commutes with
    them."""
    probs = logits.softmax(dim=-1)  # [N, V]
    threshold = _column(min_p, logits) * probs.amax(dim=-1, keepdim=True)  # [N, 1]
    return logits.masked_fill(probs < threshold, -torch.inf)


def exponential_noise(
    generators: Sequence[torch.Generator | None], vocab_size: int, device: torch.device | str
) -> torch.Tensor:
    """The race's draws: [N, V] fp32 Exp(1), row i drawn with generators[i] alone, so a
    seeded row's draws do not depend on the other rows."""
    noise = torch.empty(len(generators), vocab_size, dtype=torch.float32, device=device)
    for row, generator in enumerate(generators):
        noise[row].exponential_(generator=generator)
    return noise


def race_winners(probs: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """probs [N, V], noise [N, V] Exp(1) draws -> token ids [N] int64.

    With E_v ~ Exp(1) i.i.d., E_v / p_v ~ Exp(rate p_v), and the smallest of independent
    exponentials is v with probability p_v / sum(p): so argmax_v p_v / E_v samples v ~ p
    without a cumulative sum or a search."""
    # An exact 0 would turn a masked token's 0 / 0 into NaN, which argmax would pick.
    races = noise.clamp_min(torch.finfo(noise.dtype).tiny)
    return (probs / races).argmax(dim=-1)


def kernel_sample(
    logits: torch.Tensor, noise: torch.Tensor, params: Sequence[SamplingParams]
) -> torch.Tensor:
    """The kernel path of the random rows: logits [N, V] (after penalties and min_tokens),
    noise [N, V] from `exponential_noise` -> token ids [N] int64, equal to
    race_winners(sampling_probs(logits, params), noise). A step no row asks for is left out
    of the launch."""
    device = logits.device
    vocab = logits.shape[1]
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)
    top_k = top_p = min_p = None
    if any(p.uses_top_k and p.top_k < vocab for p in params):
        top_k = torch.tensor(
            [p.top_k if p.uses_top_k else 0 for p in params], dtype=torch.int32, device=device
        )
    if any(p.top_p < 1.0 for p in params):
        top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    if any(p.min_p > 0.0 for p in params):
        min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
    return sample_tokens(logits, noise, temperature, top_k, top_p, min_p)


def advance_generator(generator: torch.Generator, vocab_size: int, device) -> None:
    """Consume the draws `exponential_noise` makes for one row, without sampling.

    A seeded request whose first token was sampled on another worker (disaggregated
    prefill) keeps the same random stream as if it had been sampled here.
    """
    torch.empty(vocab_size, dtype=torch.float32, device=device).exponential_(generator=generator)


def gather_logprobs(
    raw_logits: torch.Tensor, token_ids: torch.Tensor, params: Sequence[SamplingParams]
) -> list[TokenLogprobs | None]:
    """Sampled-token and top-n logprobs of the raw logits [B, V] for the rows that ask."""
    out: list[TokenLogprobs | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not wanted:
        return out
    rows = torch.tensor(wanted, device=raw_logits.device)
    logprobs = raw_logits[rows].log_softmax(dim=-1)  # [N, V]
    sampled = logprobs.gather(1, token_ids[rows].unsqueeze(1)).squeeze(1).tolist()  # [N]
    most = min(max(params[i].logprobs or 0 for i in wanted), raw_logits.shape[1])
    top_values, top_ids = logprobs.topk(most, dim=-1)  # [N, most], most likely first
    top_values_list, top_ids_list = top_values.tolist(), top_ids.tolist()
    for j, i in enumerate(wanted):
        n = params[i].logprobs or 0
        top = tuple(zip(top_ids_list[j][:n], top_values_list[j][:n], strict=True))
        out[i] = TokenLogprobs(sampled[j], top)
    return out


def _own_or(own: torch.Generator | None, shared: torch.Generator | None) -> torch.Generator | None:
    return own if own is not None else shared


def _column(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """Per-row scalars as a [N, 1] tensor that broadcasts over the vocabulary."""
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _pad_ids(ids: Sequence[Sequence[int]], pad: int, device: torch.device) -> torch.Tensor:
    """Ragged token-id lists -> [N, max len] int64 (at least one column), padded with `pad`."""
    width = max(1, max(len(row) for row in ids))
    padded = [list(row) + [pad] * (width - len(row)) for row in ids]
    return torch.tensor(padded, dtype=torch.int64, device=device)


def _check_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    histories: Sequence[TokenHistory],
    eos_token_ids: Sequence[Sequence[int]] | None,
) -> None:
    if logits.dim() != 2 or logits.dtype != torch.float32:
        raise ValueError(
            f"logits must be a [B, V] float32 tensor, got {logits.dtype} {tuple(logits.shape)}"
        )
    batch = logits.shape[0]
    sizes = {"params": len(params), "generators": len(generators), "histories": len(histories)}
    if eos_token_ids is not None:
        sizes["eos_token_ids"] = len(eos_token_ids)
    for name, size in sizes.items():
        if size != batch:
            raise ValueError(f"{name} must have one entry per logits row ({batch}), got {size}")
