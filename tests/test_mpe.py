"""MPE: FBGEMM-exact fake quantization, search/choose/retrain against a plain-torch reference,
budget, export parity (exported == QAT model), 2-phase run on data."""
import copy

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM

from torchrec_compress import MPE, CompressedEmbeddingBagCollection, compress_, fit_mpe_groups_, mpe_choose_, mpe_finalize, mpe_penalty, run_mpe
from torchrec_compress.data.synthetic import SyntheticCriteo
from torchrec_compress.quant import export, quantized_memory_report
from torchrec_compress.schemes.mpe import fake_quant
from torchrec_compress.testing.data import random_bags
from torchrec_compress.testing.reference import fbgemm_stored, physical_weights, reference_forward, scheme_maps
from torchrec_compress.train import evaluate, local_process_group, shard_for_training


def _tables():
    return [EmbeddingBagConfig(name="t", embedding_dim=32, num_embeddings=600, feature_names=["f", "f2"]),
            EmbeddingBagConfig(name="u", embedding_dim=32, num_embeddings=40, feature_names=["g"])]


def _model(ratio=6.0, groups=8):
    torch.manual_seed(0)
    m = CompressedEmbeddingBagCollection(copy.deepcopy(_tables()), {"t": MPE(ratio=ratio, groups=groups)})
    with torch.no_grad():
        m.per_id.embedding_bags["t__full"].weight.mul_(20)  # trained-looking scale, not the tiny init
        m.maps["t"].clip.fill_(0.5)  # some rows get clipped
    fit_mpe_groups_(m, [random_bags(_tables(), 64, seed=i).kjt() for i in range(4)])
    return m


@pytest.mark.parametrize("bits", [2, 4, 8, 16, 32, 0])
def test_fake_quant_is_what_fbgemm_stores(bits):
    w = torch.randn(50, 32) * 3
    got = fake_quant(w, bits)
    ref = torch.stack([fbgemm_stored(r, bits) for r in w])
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5 * 3)  # fp16 scale/bias rounding order


def test_groups_follow_frequency():
    m = _model()
    counts = torch.zeros(600)
    for i in range(4):
        kjt = random_bags(_tables(), 64, seed=i).kjt()
        for f in ("f", "f2"):
            counts.index_add_(0, kjt[f].values(), torch.ones(kjt[f].values().numel()))
    group = m.maps["t"].group_of.long()
    assert torch.bincount(group, minlength=8).tolist() == [75] * 8
    means = [counts[group == g].mean().item() for g in range(8)]
    assert means == sorted(means, reverse=True)  # group 0 = most frequent


@pytest.mark.parametrize("stage", ["search", "retrain"])
def test_forward_backward_match_reference(stage):
    m = _model()
    with torch.no_grad():
        m.maps["t"].logits.copy_(torch.randn(8, 6, generator=torch.Generator().manual_seed(1)))
    if stage == "retrain":
        mpe_choose_(m)
    bags = random_bags(_tables(), 6, seed=11)
    out = m(bags.kjt()).values()
    w = {n: p.detach().clone().requires_grad_(True) for n, p in physical_weights(m).items()}
    maps = {t: {k: (v.detach().clone().requires_grad_(True) if v.is_floating_point() else v) for k, v in d.items()}
            for t, d in scheme_maps(m).items()}
    ref = reference_forward(_tables(), {"t": MPE(ratio=6, groups=8)}, w, bags, maps)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    # looser than the forward: each row's gradient sums six straight-through mixture terms over
    # repeated ids, accumulated in another order than the reference's loops (seen: 1.5e-4 rel)
    torch.testing.assert_close(physical_weights(m)["t__full"].grad, w["t__full"].grad, rtol=1e-3, atol=2e-4)
    torch.testing.assert_close(m.maps["t"].clip.grad, maps["t"]["clip"].grad, rtol=1e-3, atol=2e-4)  # same sums
    if stage == "search":
        torch.testing.assert_close(m.maps["t"].logits.grad, maps["t"]["logits"].grad, rtol=1e-3, atol=2e-4)


def test_penalty_pushes_precision_down_and_choice_meets_budget():
    m = _model(ratio=8)
    impl = m.scheme("t")
    before = impl.expected_bits().item()
    opt = torch.optim.SGD([m.maps["t"].logits], lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        mpe_penalty(m).backward()
        opt.step()
    assert impl.expected_bits().item() < before
    chosen = mpe_choose_(m)["t"]
    assert sum(chosen.values()) == 600
    rep = m.memory_report().tables["t"]
    assert rep.ratio >= 8.0  # rows at their FBGEMM row sizes + the 5 B/id map fit 1/8 of fp32
    assert mpe_penalty(m).item() == 0.0  # retraining: no penalty


def test_finalize_export_equals_qat_model_and_memory_report():
    m = _model(ratio=4)
    with torch.no_grad():  # frequent groups prefer high precision, rare ones low (candidates 0,2,4,8,16,32)
        prefer = torch.tensor([5, 4, 3, 3, 2, 2, 1, 1])
        m.maps["t"].logits.copy_(torch.nn.functional.one_hot(prefer, 6).float() * 3)
    chosen = mpe_choose_(m)["t"]
    assert len([b for b in chosen if b]) >= 2  # really mixed
    kjt = random_bags(_tables(), 16, seed=5).kjt()
    qat = m(kjt).values()
    q = export(mpe_finalize(m), {"u": "fp32"})
    kinds = {c.name: c.data_type.name for c in q.pooled.embedding_bag_configs()}
    assert {kinds[f"t__b{b}"] for b in chosen if b} <= {"INT2", "INT4", "INT8", "FP16", "FP32"}
    # the exported FBGEMM tables return exactly what quantization-aware training saw
    torch.testing.assert_close(q(kjt).values(), qat, rtol=0, atol=1e-5)
    assert quantized_memory_report(q).tables["t"].compressed_bytes == m.memory_report().tables["t"].compressed_bytes


def test_mpe_errors():
    with pytest.raises(ValueError, match="at most 256"):
        MPE(ratio=4, groups=300)
    with pytest.raises(ValueError, match="candidates"):
        MPE(ratio=4, candidates=(3,))
    with pytest.raises(ValueError, match=r"id map takes 5.00 bits per element"):
        CompressedEmbeddingBagCollection(_tables()[:1] and [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=100)], {"t": MPE(ratio=16)})
    with pytest.raises(ValueError, match="call mpe_choose_ first"):
        mpe_finalize(_model())
    with pytest.raises(ValueError, match="no MPE table"):
        mpe_choose_(CompressedEmbeddingBagCollection(_tables()))


@pytest.mark.slow
def test_run_mpe_end_to_end_on_synthetic_dlrm():
    cards = [3000, 2000, 50, 20]
    tables = [EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=16, num_embeddings=v, feature_names=[f"cat_{i}"]) for i, v in enumerate(cards)]
    data = list(SyntheticCriteo(cards, 512, 80, seed=0, split="train"))
    held = list(SyntheticCriteo(cards, 512, 8, seed=0, split="eval"))
    torch.manual_seed(0)
    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables, device=torch.device("meta")), dense_in_features=13,
                 dense_arch_layer_sizes=[16, 16], over_arch_layer_sizes=[16, 1], dense_device=torch.device("cpu"))
    compress_(model, {"t_cat_0": MPE(ratio=8, groups=16, penalty=0.5), "t_cat_1": MPE(ratio=8, groups=16, penalty=0.5)})
    with local_process_group():
        dmp, opt = shard_for_training(model, model.sparse_arch, lr_sparse=0.05, lr_dense=0.05)
        maps = dmp.module.sparse_arch.embedding_bag_collection.maps["t_cat_0"]
        for name, init in maps._impl[0].initial_buffers().items():  # DMP zero-filled them; reset_parameters restores them
            assert torch.equal(getattr(maps, name), init), name
        fit_mpe_groups_(dmp, data)
        res = run_mpe(dmp, opt, data[:40], data[40:], progress=False)
        auc, _ = evaluate(dmp, held)
        cebc = dmp.module.sparse_arch.embedding_bag_collection
        rep = cebc.memory_report()
    assert set(res["chosen"]) == {"t_cat_0", "t_cat_1"}
    assert rep.tables["t_cat_0"].ratio >= 8 and rep.tables["t_cat_1"].ratio >= 8
    assert auc > 0.55
