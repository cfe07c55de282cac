"""Sharded twin of CompressedEmbeddingBagCollection, so TrainPipelineSparseDist can pipeline it.

Without it DMP shards the inner EBCs in place and the transform runs in the wrapper's
forward, which the training pipeline cannot move ahead. Here (the pattern of TorchRec's
feature-processed and managed-collision EBCs) the module itself is a ``ShardedModule``:

* ``input_dist``: validate + transform the logical KJT (``split``), then start both
  inner ShardedEBCs' input distributions and hand back ONE ``KJTListSplitsAwaitable``
  over all their awaitables, so the pipeline fuses its splits all-to-all with the rest;
* ``compute_and_output_dist``: split the distributed KJTList back per inner EBC, run
  their lookups and output distributions, then ``combine`` (per-id products, pooling)
  when the result is awaited. With id-weighted schemes (MEmCom, Mem-Rec) the per-id
  lookups come first: they give every ``weighted`` id's weight, which each rank that
  received the id fetches by its position code (``positions.pull``, differentiable)
  before the weighted lookups.

The inner EBCs are sharded by TorchRec's own EBC sharder (FBGEMM kernels, fused
optimizers); schemes' maps and small parameters stay replicated (data parallel).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Optional, Type

import torch
from torch import nn
from torchrec.distributed.embedding_sharding import KJTListSplitsAwaitable
from torchrec.distributed.embedding_types import BaseEmbeddingSharder, KJTList, ShardedEmbeddingModule
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionContext, EmbeddingBagCollectionSharder
from torchrec.distributed.types import (
    Awaitable,
    LazyAwaitable,
    ParameterSharding,
    QuantizedCommCodecs,
    ShardingEnv,
)
from torchrec.distributed.utils import append_prefix
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from ..modules.compressed_ebc import INNER, CompressedEmbeddingBagCollection, SplitState
from .positions import pulled_weights
from .ebc_sharder import CpuRowWiseEmbeddingBagCollectionSharder


@dataclass
class CompressedEBCContext(EmbeddingBagCollectionContext):
    """Both inner contexts, and what ``combine`` needs from the local batch."""

    inner: List[EmbeddingBagCollectionContext] = field(default_factory=list)
    counts: List[int] = field(default_factory=list)  # inner KJTs per inner EBC
    state: Optional[SplitState] = None

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        if self.state is not None:
            self.state.record_stream(stream)


class _Combined(LazyAwaitable[KeyedTensor]):
    def __init__(self, module: "ShardedCompressedEmbeddingBagCollection", ctx: CompressedEBCContext,
                 outputs: List[Optional[LazyAwaitable[KeyedTensor]]]) -> None:
        super().__init__()
        self._module, self._ctx, self._outputs = module, ctx, outputs

    def _wait_impl(self) -> KeyedTensor:
        pooled, per_id, weighted = [o.wait() if isinstance(o, Awaitable) else o for o in self._outputs]
        return self._module._logic[0].combine(self._ctx.state, pooled, per_id, weighted)


class ShardedCompressedEmbeddingBagCollection(
    ShardedEmbeddingModule[KJTList, List[torch.Tensor], KeyedTensor, CompressedEBCContext]
):
    def __init__(
        self,
        module: CompressedEmbeddingBagCollection,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        ebc_sharder: EmbeddingBagCollectionSharder,
        env: ShardingEnv,
        device: torch.device,
        module_fqn: Optional[str] = None,
    ) -> None:
        super().__init__()
        for name in INNER:
            inner = getattr(module, name)
            if inner is None:
                setattr(self, name, None)
                continue
            params = {t.name: table_name_to_parameter_sharding[t.name] for t in inner.embedding_bag_configs()}
            sharded = ebc_sharder.shard(inner, params, env, device, module_fqn=f"{module_fqn}.{name}" if module_fqn else name)
            setattr(self, name, sharded)
            setattr(module, name, sharded)  # the logic's stride sync and combine see the sharded inner modules
        self.maps = module.maps
        self.flat_parameters = module.flat_parameters
        self._logic = [module]  # transform / combine code; a list so it is not a submodule
        self._inner = module.inner_collections()
        self._lookups = [lk for m in self._inner for lk in m._lookups]
        for name, buf in module.named_buffers(recurse=False):  # e.g. the device probe
            if buf.device.type == "meta":
                module._buffers[name] = torch.zeros_like(buf, device=device)

    # --------------------------------------------------------------------- ShardedModule API
    def create_context(self) -> CompressedEBCContext:
        return CompressedEBCContext()

    def input_dist(self, ctx: CompressedEBCContext, features: KeyedJaggedTensor) -> Awaitable[Awaitable[KJTList]]:
        self._logic[0].train(self.training)  # the logic is not a submodule: train()/eval() do not reach it
        with torch.no_grad():
            ctx.state, pooled_kjt, per_id_kjt, weighted_kjt = self._logic[0].split(features)
        kjt_of = {"pooled": pooled_kjt, "weighted": weighted_kjt, "per_id": per_id_kjt}
        awaitables: List[Any] = []
        for name in INNER:
            inner, kjt = getattr(self, name), kjt_of[name]
            if inner is None:
                continue
            inner_ctx = inner.create_context()
            request = inner.input_dist(inner_ctx, kjt)
            assert isinstance(request, KJTListSplitsAwaitable), type(request)
            ctx.inner.append(inner_ctx)
            ctx.counts.append(len(request.awaitables))
            awaitables += request.awaitables
        ctx.sharding_contexts = [sc for c in ctx.inner for sc in c.sharding_contexts]  # same objects: updated in place
        return KJTListSplitsAwaitable(awaitables, ctx)

    def compute(self, ctx: CompressedEBCContext, dist_input: KJTList) -> List[torch.Tensor]:
        raise NotImplementedError("ShardedCompressedEmbeddingBagCollection runs compute_and_output_dist")

    def output_dist(self, ctx: CompressedEBCContext, output: List[torch.Tensor]) -> LazyAwaitable[KeyedTensor]:
        raise NotImplementedError("ShardedCompressedEmbeddingBagCollection runs compute_and_output_dist")

    def compute_and_output_dist(self, ctx: CompressedEBCContext, input: KJTList) -> LazyAwaitable[KeyedTensor]:
        kjts = list(input)
        parts: Dict[str, tuple] = {}  # inner EBC -> (it, its context, its distributed KJTs)
        start = 0
        inner_iter = iter(zip(self._inner, ctx.inner, ctx.counts))
        for name in INNER:
            if getattr(self, name) is not None:
                inner, inner_ctx, n = next(inner_iter)
                parts[name] = (inner, inner_ctx, kjts[start:start + n])
                start += n
        out: Dict[str, Any] = {
            name: inner.compute_and_output_dist(inner_ctx, KJTList(ks)) for name, (inner, inner_ctx, ks) in parts.items()
            if name != "weighted"
        }
        if "weighted" in parts:  # the per-id lookups first: they give the weighted ids' weights
            inner, inner_ctx, ks = parts["weighted"]
            out["per_id"] = out["per_id"].wait()
            ks = pulled_weights(ks, self._logic[0].id_weights(ctx.state, out["per_id"]), self._logic[0]._sync_group())
            out["weighted"] = inner.compute_and_output_dist(inner_ctx, KJTList(ks))
        return _Combined(self, ctx, [out.get(name) for name in ("pooled", "per_id", "weighted")])

    # --------------------------------------------------------------------- bookkeeping
    @property
    def fused_optimizer(self):  # noqa: ANN201 - torchrec's KeyedOptimizer
        from torchrec.optim.keyed import CombinedOptimizer

        return CombinedOptimizer([(n, getattr(self, n).fused_optimizer) for n in INNER if getattr(self, n) is not None])

    def sharded_parameter_names(self, prefix: str = "") -> Iterator[str]:
        """Everything inside the inner sharded EBCs (rank-local parameters and buffers), so
        DDP neither all-reduces nor broadcasts it; ``maps`` stays data parallel."""
        for name in INNER:
            inner = getattr(self, name)
            if inner is not None:
                yield from inner.sharded_parameter_names(prefix=append_prefix(prefix, name))

    @property
    def unsharded_module_type(self) -> Type[CompressedEmbeddingBagCollection]:
        return CompressedEmbeddingBagCollection


class CompressedEmbeddingBagCollectionSharder(BaseEmbeddingSharder[CompressedEmbeddingBagCollection]):
    """Shards a CompressedEmbeddingBagCollection as one pipelineable module; its inner
    tables go through (a CPU row-wise capable) ``EmbeddingBagCollectionSharder``."""

    def __init__(self, ebc_sharder: Optional[EmbeddingBagCollectionSharder] = None,
                 fused_params: Optional[Dict[str, Any]] = None,
                 qcomm_codecs_registry: Optional[Dict[str, QuantizedCommCodecs]] = None) -> None:
        super().__init__(fused_params=fused_params, qcomm_codecs_registry=qcomm_codecs_registry)
        self._ebc_sharder = ebc_sharder or CpuRowWiseEmbeddingBagCollectionSharder(fused_params, qcomm_codecs_registry)

    def shard(self, module: CompressedEmbeddingBagCollection, params: Dict[str, ParameterSharding], env: ShardingEnv,
              device: Optional[torch.device] = None, module_fqn: Optional[str] = None) -> ShardedCompressedEmbeddingBagCollection:
        return ShardedCompressedEmbeddingBagCollection(module, params, self._ebc_sharder, env, device or torch.device("cpu"), module_fqn)

    def shardable_parameters(self, module: CompressedEmbeddingBagCollection) -> Dict[str, nn.Parameter]:
        out: Dict[str, nn.Parameter] = {}
        for inner in module.inner_collections():
            out.update(self._ebc_sharder.shardable_parameters(inner))
        return out

    @property
    def module_type(self) -> Type[CompressedEmbeddingBagCollection]:
        return CompressedEmbeddingBagCollection

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return self._ebc_sharder.sharding_types(compute_device_type)

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        return self._ebc_sharder.compute_kernels(sharding_type, compute_device_type)

    @property
    def fused_params(self) -> Optional[Dict[str, Any]]:
        return self._ebc_sharder.fused_params


