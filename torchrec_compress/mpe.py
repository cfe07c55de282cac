"""MPE driver: group ids by frequency, search precisions, choose, retrain (QAT), finalize.

    fit_mpe_groups_(model, train_batches)           # ids -> G frequency groups
    train_steps(dmp, opt, search_batches, extra_loss=lambda: mpe_penalty(dmp))
    mpe_choose_(model)                               # precision per group, within budget; QAT from here
    train_steps(dmp, opt, retrain_batches)
    inference = quant.export(mpe_finalize(unsharded_model))   # one FBGEMM table per precision

``run_mpe`` does the two training phases in one call.
"""
from __future__ import annotations

import copy
from typing import Dict, Iterable, List, Union

import torch
from torch import nn

from .fit import _count_vector, _stats_from
from .modules.compressed_ebc import CompressedEmbeddingBagCollection
from .schemes.mixed_precision import MixedPrecision, MixedPrecisionScheme
from .schemes.mpe import RETRAIN, MPEScheme
from .stats import FrequencyStats


def _mpe_tables(model: nn.Module):
    for m in model.modules():
        if isinstance(m, CompressedEmbeddingBagCollection):
            for t in m.embedding_bag_configs():
                if isinstance(m.scheme(t.name), MPEScheme):
                    yield m, t, m.scheme(t.name)


@torch.no_grad()
def fit_mpe_groups_(model: nn.Module, data: Union[FrequencyStats, Iterable[object]]) -> Dict[str, List[int]]:
    """Group every MPE table's ids by frequency rank: G equal-size groups, group 0 the most
    frequent (unseen ids rank last). Returns table -> group sizes."""
    tables = list(_mpe_tables(model))
    if not tables:
        raise ValueError("fit_mpe_groups_: the model has no MPE table")
    stats = data if isinstance(data, FrequencyStats) else _stats_from(model, data, MPEScheme)
    out = {}
    for _, t, impl in tables:
        counts = _count_vector(stats, t.feature_names, t.num_embeddings)
        order = torch.sort(counts, descending=True, stable=True).indices
        group = torch.empty(t.num_embeddings, dtype=torch.uint8)
        group[order] = (torch.arange(t.num_embeddings) * impl.G // t.num_embeddings).to(torch.uint8)
        impl.buffers.group_of.copy_(group.to(impl.buffers.group_of.device))
        out[t.name] = impl.group_sizes().tolist()
    return out


def mpe_penalty(model: nn.Module) -> torch.Tensor:
    """Sum over MPE tables still searching of penalty * max(0, E[bits/element] - target)."""
    terms = [impl.penalty() for _, _, impl in _mpe_tables(model) if int(impl.buffers.stage) != RETRAIN]
    return torch.stack(terms).sum() if terms else torch.zeros(())


@torch.no_grad()
def mpe_choose_(model: nn.Module) -> Dict[str, Dict[int, int]]:
    """Fix each group's precision to the candidate nearest its learned expected precision
    (SUM_p p_gp bits_p), then, while over the bit budget, lower the group with the lowest
    expected precision (ties: the less frequent) one candidate; the most frequent group is
    never dropped. Switches to quantization-aware retraining. Returns table -> {bits: ids}."""
    chosen = {}
    for _, t, impl in _mpe_tables(model):
        cands = impl.candidates
        probs = torch.softmax(impl.buffers.logits.detach().cpu().double() / impl.config.temperature, dim=1)
        expected = probs @ torch.tensor(cands, dtype=torch.float64)  # [G] learned precision of each group
        # the candidate nearest each group's expected precision (argmax ignores how the mass is spread)
        pick = (expected.unsqueeze(1) - torch.tensor(cands, dtype=torch.float64)).abs().argmin(dim=1).tolist()
        n = impl.group_sizes().double()
        eff = torch.tensor([impl.eff_bits(c) for c in cands], dtype=torch.float64)

        def avg() -> float:
            return float((eff[torch.tensor(pick)] * n).sum() / n.sum())

        floor = [0] * impl.G
        floor[0] = next((k for k, c in enumerate(cands) if c > 0), 0)  # never drop the most frequent group
        pick[0] = max(pick[0], floor[0])
        # over budget: lower the group the search valued least (ties: the less frequent) one step at a time
        order = sorted(range(impl.G), key=lambda g: (expected[g].item(), -g))
        while avg() > impl.row_target + 1e-9:
            lowerable = [g for g in order if pick[g] > floor[g]]
            if not lowerable:
                raise ValueError(
                    f"mpe_choose_: table {t.name!r}: even with every other group dropped the rows take "
                    f"{avg():.2f} bits per element, over the {impl.row_target:.2f} left after the id map; use a lower ratio"
                )
            pick[lowerable[0]] -= 1
        bits = torch.tensor([cands[k] for k in pick], dtype=torch.int8)
        impl.buffers.bits.copy_(bits.to(impl.buffers.bits.device))
        impl.buffers.stage.fill_(RETRAIN)
        chosen[t.name] = {b: int(n[bits == b].sum()) for b in cands if int(n[bits == b].sum())}
    if not chosen:
        raise ValueError("mpe_choose_: the model has no MPE table")
    return chosen


def run_mpe(
    dmp: nn.Module,
    dense_opt: torch.optim.Optimizer,
    search_batches: Iterable[object],
    retrain_batches: Iterable[object],
    progress: bool = True,
) -> Dict[str, object]:
    """Search (with the expected-bits penalty), choose, retrain. Groups must be fitted first."""
    from .train.loop import train_steps

    search_losses, _, _ = train_steps(dmp, dense_opt, search_batches, desc="search", progress=progress,
                                      extra_loss=lambda: mpe_penalty(dmp))
    chosen = mpe_choose_(dmp)
    retrain_losses, _, _ = train_steps(dmp, dense_opt, retrain_batches, desc="retrain", progress=progress)
    return {"chosen": chosen, "search_losses": search_losses, "retrain_losses": retrain_losses}


@torch.no_grad()
def mpe_finalize(model: nn.Module) -> nn.Module:
    """Copy of an (unsharded) model whose MPE tables become ``MixedPrecision`` tables: the
    clipped rows of each kept precision in their own physical table, dropped ids removed.
    Feed the result to ``quant.export``, which stores each table at its precision."""
    if isinstance(model, CompressedEmbeddingBagCollection):
        return _finalize(model)
    out = copy.deepcopy(model)
    for parent in list(out.modules()):
        for name, m in list(parent.named_children()):
            if isinstance(m, CompressedEmbeddingBagCollection):
                setattr(parent, name, _finalize(m))
    return out


def _finalize(m: CompressedEmbeddingBagCollection) -> CompressedEmbeddingBagCollection:
    mpe = {t.name: m.scheme(t.name) for t in m.embedding_bag_configs() if isinstance(m.scheme(t.name), MPEScheme)}
    for impl in mpe.values():
        if int(impl.buffers.stage) != RETRAIN:
            raise ValueError(f"mpe_finalize: table {impl.table.name!r} has no chosen precisions; call mpe_choose_ first")
    schemes, fills = {}, {}
    for t in m.embedding_bag_configs():
        impl = m.scheme(t.name)
        if t.name not in mpe:
            if impl.config is not None:
                schemes[t.name] = impl.config
            continue
        group = impl.buffers.group_of.long().cpu()
        bits = impl.buffers.bits.long().cpu()[group]  # [v]
        kept = sorted({int(b) for b in bits.unique()} - {0})
        schemes[t.name] = MixedPrecision(rows_per_bits=tuple((b, int((bits == b).sum())) for b in kept))
        full = m.per_id.embedding_bags[f"{t.name}__full"].weight.detach().cpu()
        c = impl.buffers.clip.detach().abs().cpu()[group].unsqueeze(1)
        fills[t.name] = (bits, kept, torch.maximum(torch.minimum(full, c), -c))
    new = CompressedEmbeddingBagCollection(
        copy.deepcopy(m.embedding_bag_configs()), schemes, is_weighted=m.is_weighted(), device=m.device
    )
    mine = new.state_dict()
    new.load_state_dict({k: v for k, v in m.state_dict().items() if k in mine}, strict=False)  # other tables, maps
    for tname, (bits, kept, rows) in fills.items():
        impl = new.scheme(tname)
        assert isinstance(impl, MixedPrecisionScheme)
        for k, b in enumerate(kept):
            ids = (bits == b).nonzero().squeeze(1)
            impl.buffers.table_of[ids] = k
            impl.buffers.row_of[ids] = torch.arange(ids.numel(), dtype=torch.int32)
            new.pooled.embedding_bags[f"{tname}__b{b}"].weight.copy_(rows[ids])
    return new
