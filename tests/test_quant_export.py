"""Quantized export: parity with the dequantized reference per dtype, mixed dtypes, memory, errors."""
import copy

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM
from torchrec.quant.embedding_modules import EmbeddingBagCollection as QuantEBC

from torchrec_compress import CompressedEmbeddingBagCollection, Hashing, compress_, fit_
from torchrec_compress.quant import dequantized_tables, export, quantized_memory_report
from torchrec_compress.testing.data import random_bags
from torchrec_compress.testing.parity import parity_schemes, parity_tables

# per-element error bound of row-wise quantization: half a step of (max - min) / (2^bits - 1)
STEP = {"int8": 255, "int4": 15, "int2": 3}
NARROW = {"t_memcom__w": "int8", "t_memcom_mean__w": "int8", "t_memrec__alpha": "int8"}  # dim-4 tables: int2 needs 8 | dim


def _model():
    torch.manual_seed(0)
    m = CompressedEmbeddingBagCollection(parity_tables(), parity_schemes())
    warm = torch.randn(300, 8, generator=torch.Generator().manual_seed(5))  # stands in for warmed-up embeddings
    fit_(m, [random_bags(parity_tables(), 64, seed=4242).kjt()], embeddings={"t_saec": warm})
    m.scheme("t_mpe").choose_()
    m.scheme("t_mpe_ranked").choose_()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    # in its deployed layout (Saec without its warm-up table, MPE as one table per precision), so that
    # every physical table here is one of the exported model's
    return m.for_inference().eval()  # inference: FIITED admits no ids (its free pool rows are random here, not zero as in training)


def _dequantized_float_copy(m, q):
    ref = copy.deepcopy(m)
    for inner_q, inner_f in zip(q.inner_collections(), ref.inner_collections()):
        for n, w in dequantized_tables(inner_q).items():
            inner_f.embedding_bags[n].weight.data.copy_(w)
    return ref


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "int8", "int4", "int2"])
def test_export_matches_dequantized_reference(dtype):
    m = _model()
    q = export(m, NARROW if dtype == "int2" else {}, default=dtype)
    assert all(isinstance(inner, QuantEBC) for inner in (q.pooled, q.per_id, q.weighted))
    assert isinstance(m.pooled, EmbeddingBagCollection)  # the float model is untouched
    kjt = random_bags(parity_tables(), 16, seed=3).kjt()
    out = q(kjt).values()
    # same transforms and combines over the stored (dequantized) rows: equal up to fp32 rounding
    torch.testing.assert_close(out, _dequantized_float_copy(m, q)(kjt).values(), rtol=1e-5, atol=1e-5)
    if dtype in STEP:  # and each stored row is within half a quantization step of the float row
        for inner_q, inner_f in zip(q.inner_collections(), m.inner_collections()):
            deq = dequantized_tables(inner_q)
            for cfg in inner_q.embedding_bag_configs():
                w = inner_f.embedding_bags[cfg.name].weight
                bits = {"INT8": "int8", "INT4": "int4", "INT2": "int2"}.get(cfg.data_type.name)
                if bits is None:
                    continue
                half_step = (w.max(1).values - w.min(1).values) / STEP[bits] / 2
                # + fp16 rounding of scale and bias
                assert ((deq[cfg.name] - w).abs().max(1).values <= half_step * 1.01 + 2e-3 * w.abs().max(1).values + 1e-6).all(), cfg.name
    elif dtype == "fp32":  # bit-identical, but MPE's groups keep the precisions they chose (not fp32)
        got, want = q(kjt).to_dict(), m(kjt).to_dict()
        for f in want:
            if f == "md":  # a matmul after the lookup: the same up to its summation order
                torch.testing.assert_close(got[f], want[f], rtol=1e-6, atol=1e-7)
            elif f not in ("mpe", "mpe_ranked"):
                assert torch.equal(got[f], want[f]), f


def test_mixed_dtypes_in_one_model_and_memory_report():
    m = _model()
    dtypes = {"t_plain": "fp32", "t_hash": "int4", "t_qr": "int8", "t_memcom": "fp16", "t_memcom__w": "fp32", "t_memrec": "int2", "t_memrec__alpha": "int8"}
    q = export(m, dtypes, default="int8")
    kinds = {c.name: c.data_type.name for inner in q.inner_collections() for c in inner.embedding_bag_configs()}
    assert kinds["t_plain"] == "FP32" and kinds["t_hash__hash"] == "INT4" and kinds["t_qr__q"] == "INT8"
    assert kinds["t_memcom__shared"] == "FP16" and kinds["t_memcom__w"] == "FP32" and kinds["t_memrec__tok"] == "INT2"
    kjt = random_bags(parity_tables(), 16, seed=4).kjt()
    torch.testing.assert_close(q(kjt).values(), _dequantized_float_copy(m, q)(kjt).values(), rtol=1e-5, atol=1e-5)
    rep = quantized_memory_report(q)
    assert rep.tables["t_hash"].scheme == "Hashing/int4"
    # stored rows = actual uint8 buffers (FBGEMM aligns rows to 16 bytes); maps still counted
    assert rep.tables["t_freq"].parts["t_freq (maps)"] == 20 * 4
    assert rep.total.compressed_bytes < m.memory_report().total.compressed_bytes


def test_export_dlrm_with_plain_and_compressed_ebcs():
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=1000, feature_names=[f"f{i}"]) for i in range(3)]
    torch.manual_seed(0)
    dlrm = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables), dense_in_features=4,
                dense_arch_layer_sizes=[8, 16], over_arch_layer_sizes=[8, 1])
    compress_(dlrm, {"t0": Hashing(ratio=4)})
    q = export(dlrm, {"t1": "int4"}, default="int8")
    dense, kjt = torch.randn(5, 4), random_bags(tables, 5, seed=0).kjt()
    a, b = q(dense, kjt), dlrm(dense, kjt)
    assert a.shape == b.shape and (a - b).abs().max() < 0.05


def test_export_errors():
    m = _model()
    with pytest.raises(ValueError, match="dtype 'int3' is not supported"):
        export(m, default="int3")
    with pytest.raises(ValueError, match=r"unknown tables \['nope'\]"):
        export(m, {"nope": "int8"})
    with pytest.raises(ValueError, match=r"table 't_memcom__w': dim 4 at int2 packs into 1 bytes"):
        export(m, default="int2")
    with pytest.raises(ValueError, match="holds no torchrec EmbeddingBagCollection"):
        export(torch.nn.Linear(2, 2))


def test_torch_export_program_round_trip(tmp_path):
    from torchrec_compress.quant import load_program, to_program

    q = export(_model(), default="int8")
    kjt = random_bags(parity_tables(), 8, seed=5).kjt()
    prog = to_program(q, kjt)
    torch.export.save(prog, str(tmp_path / "m.pt2"))
    loaded = load_program(str(tmp_path / "m.pt2"))
    assert torch.equal(loaded.module()(kjt), q(kjt).values())
    assert q._validate  # the served copy has checks compiled out, the module keeps them


def test_torchrec_inference_sharder_takes_the_exported_model():
    """TorchRec's inference sharding swaps the inner quantized EBCs for sharded ones. On CPU
    it can only be built on meta: FBGEMM's IntNBit TBE asserts CUDA when TorchRec builds it
    for a 'cpu' sharding device (see the issue note); on GPUs shard with compute_device='cuda'."""
    from torchrec.distributed.quant_embeddingbag import ShardedQuantEmbeddingBagCollection
    from torchrec.inference.modules import shard_quant_model

    from torchrec_compress.quant.export import _ValuesOf

    q = export(_model(), default="int8")
    sq, plan = shard_quant_model(_ValuesOf(q), world_size=1, compute_device="cpu", sharding_device="meta")
    assert isinstance(sq.model.pooled, ShardedQuantEmbeddingBagCollection)
    assert isinstance(sq.model.per_id, ShardedQuantEmbeddingBagCollection)
    assert isinstance(sq.model.weighted, ShardedQuantEmbeddingBagCollection)
    assert set(plan.plan) == {"model.pooled", "model.per_id", "model.weighted"}
