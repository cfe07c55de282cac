"""MPE: FBGEMM-exact fake quantization, search/choose/retrain against a plain-torch reference
(the search's penalty included), budget, export parity (exported == QAT model), the whole
self-driven procedure (count, group, search, choose, retrain) in a plain training loop."""
import copy

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM

from torchrec_compress import MPE, CompressedEmbeddingBagCollection, compress_, fit_
from torchrec_compress.schemes.mpe import RETRAIN
from torchrec_compress.data.synthetic import SyntheticCriteo
from torchrec_compress.quant import export, quantized_memory_report
from torchrec_compress.schemes.mpe import fake_quant
from torchrec_compress.testing.data import random_bags
from torchrec_compress.testing.reference import fbgemm_stored, physical_weights, reference_forward, reference_leaves
from torchrec_compress.train import evaluate, local_process_group, shard_for_training, train_steps


def _tables():
    return [EmbeddingBagConfig(name="t", embedding_dim=32, num_embeddings=600, feature_names=["f", "f2"]),
            EmbeddingBagConfig(name="u", embedding_dim=32, num_embeddings=40, feature_names=["g"])]


def _model(ratio=6.0, groups=8):
    torch.manual_seed(0)
    m = CompressedEmbeddingBagCollection(copy.deepcopy(_tables()), {"t": MPE(ratio=ratio, groups=groups)})
    with torch.no_grad():
        m.per_id.embedding_bags["t__full"].weight.mul_(20)  # trained-looking scale, not the tiny init
        m.scheme_states()["t"].clip.fill_(0.5)  # some rows get clipped
    fit_(m, [random_bags(_tables(), 64, seed=i).kjt() for i in range(4)])
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
    group = m.scheme_states()["t"].group_of.long()
    assert torch.bincount(group, minlength=8).tolist() == [75] * 8
    means = [counts[group == g].mean().item() for g in range(8)]
    assert means == sorted(means, reverse=True)  # group 0 = most frequent


@pytest.mark.parametrize("stage", ["search", "retrain"])
def test_forward_backward_match_reference(stage):
    m = _model()
    with torch.no_grad():
        m.scheme_states()["t"].logits.copy_(torch.randn(8, 6, generator=torch.Generator().manual_seed(1)))
    if stage == "retrain":
        m.scheme("t").choose_()
    bags = random_bags(_tables(), 6, seed=11)
    out = m(bags.kjt()).values()
    w, maps = reference_leaves(m)
    ref = reference_forward(_tables(), {"t": MPE(ratio=6, groups=8)}, w, bags, maps)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    (out * g).sum().backward()  # the module adds the search penalty's gradient itself (training mode)
    penalty = 0.0
    if stage == "search":  # paper: loss += penalty * max(0, E[bits/element] - target), by hand
        impl, cfg = m.scheme("t"), MPE(ratio=6, groups=8)
        probs = torch.softmax(maps["t"]["logits"] / cfg.temperature, dim=1)
        eff = torch.tensor([8 * (-(-(32 * b // 8 + (4 if b <= 8 else 0)) // 16) * 16) / 32 if b else 0.0 for b in sorted(cfg.candidates)])
        n = torch.bincount(maps["t"]["group_of"].long(), minlength=8).float()
        expected = (probs @ eff * n).sum() / n.sum()
        penalty = cfg.penalty * torch.relu(expected - (32 / 6 - 8 * 5 / 32))
        assert float(penalty.detach()) > 0 and impl.penalty().item() == pytest.approx(float(penalty.detach()), rel=1e-5)
    ((ref * g).sum() + penalty).backward()
    # looser than the forward: each row's gradient sums six straight-through mixture terms over
    # repeated ids, accumulated in another order than the reference's loops (seen: 1.5e-4 rel)
    torch.testing.assert_close(physical_weights(m)["t__full"].grad, w["t__full"].grad, rtol=1e-3, atol=2e-4)
    torch.testing.assert_close(m.scheme_states()["t"].clip.grad, maps["t"]["clip"].grad, rtol=1e-3, atol=2e-4)  # same sums
    if stage == "search":
        torch.testing.assert_close(m.scheme_states()["t"].logits.grad, maps["t"]["logits"].grad, rtol=1e-3, atol=2e-4)


def test_penalty_pushes_precision_down_and_choice_meets_budget():
    m = _model(ratio=8)
    impl = m.scheme("t")
    before = impl.expected_bits().item()
    opt = torch.optim.SGD([m.scheme_states()["t"].logits], lr=1.0)
    for _ in range(20):
        opt.zero_grad()
        impl.penalty().backward()
        opt.step()
    assert impl.expected_bits().item() < before
    chosen = impl.choose_()
    assert sum(chosen.values()) == 600
    rep = m.memory_report().tables["t"]
    assert rep.ratio >= 8.0  # rows at their FBGEMM row sizes + the 5 B/id map fit 1/8 of fp32
    assert impl.penalty().item() == 0.0  # retraining: no penalty


def test_finalize_export_equals_qat_model_and_memory_report():
    m = _model(ratio=4)
    with torch.no_grad():  # frequent groups prefer high precision, rare ones low (candidates 0,2,4,8,16,32)
        prefer = torch.tensor([5, 4, 3, 3, 2, 2, 1, 1])
        m.scheme_states()["t"].logits.copy_(torch.nn.functional.one_hot(prefer, 6).float() * 3)
    chosen = m.scheme("t").choose_()
    assert len([b for b in chosen if b]) >= 2  # really mixed
    kjt = random_bags(_tables(), 16, seed=5).kjt()
    qat = m(kjt).values()
    q = export(m, {"u": "fp32"})  # MPE deploys one table per chosen precision
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
    with pytest.warns(UserWarning, match=r"table 't': MPE has not finished its procedure"):
        q = export(_model())  # deployed as it is: its fp32 table
    assert [c.name for c in q.per_id.embedding_bag_configs()] == ["t__full"]


@pytest.mark.slow
def test_mpe_procedure_runs_itself_on_synthetic_dlrm():
    """An ordinary training loop, no MPE calls: 20 steps counted, 20 searched, 40 retrained."""
    cards = [3000, 2000, 50, 20]
    tables = [EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=16, num_embeddings=v, feature_names=[f"cat_{i}"]) for i, v in enumerate(cards)]
    data = list(SyntheticCriteo(cards, 512, 80, seed=0, split="train"))
    held = list(SyntheticCriteo(cards, 512, 8, seed=0, split="eval"))
    torch.manual_seed(0)
    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables, device=torch.device("meta")), dense_in_features=13,
                 dense_arch_layer_sizes=[16, 16], over_arch_layer_sizes=[16, 1], dense_device=torch.device("cpu"))
    cfg = MPE(ratio=8, groups=16, penalty=0.5, fit_steps=20, search_steps=20)
    compress_(model, {"t_cat_0": cfg, "t_cat_1": cfg})
    with local_process_group():
        dmp, opt = shard_for_training(model, model.sparse_arch, lr_sparse=0.05, lr_dense=0.05)
        train_steps(dmp, opt, data[:1], progress=False)
        cebc = dmp.module.sparse_arch.embedding_bag_collection
        state = cebc.scheme_states()["t_cat_0"]
        init = cebc.scheme("t_cat_0").initial_buffers()  # DMP zero-filled them; the module restored them
        assert torch.equal(state.group_of, init["group_of"]) and torch.equal(state.bits, init["bits"])
        train_steps(dmp, opt, data[1:], progress=False)
        auc, _ = evaluate(dmp, held)
        rep = cebc.memory_report()
    for t in ("t_cat_0", "t_cat_1"):
        impl = cebc.scheme(t)
        assert impl.stage == RETRAIN and impl.fitted() and int(cebc.scheme_states()[t].steps) == 80
        counts = torch.zeros(cards[int(t[-1])], dtype=torch.int64)
        for b in data[:20]:
            counts.index_add_(0, b.sparse_features[f"cat_{t[-1]}"].values(), torch.ones_like(b.sparse_features[f"cat_{t[-1]}"].values()))
        assert torch.equal(impl.counted(), counts)  # exactly the first 20 steps' ids
        assert rep.tables[t].ratio >= 8
    assert auc > 0.55


def test_memory_before_the_choice_is_the_budget_the_choice_keeps_within():
    m = CompressedEmbeddingBagCollection(copy.deepcopy(_tables()), {"t": MPE(ratio=8, groups=8)}, device=torch.device("meta"))
    assert m.memory_report().tables["t"].ratio == pytest.approx(8.0, rel=1e-3)  # the demo and planner size by it
    fitted = _model(ratio=8)
    before = fitted.memory_report().tables["t"].compressed_bytes
    fitted.scheme("t").choose_()
    assert fitted.memory_report().tables["t"].compressed_bytes <= before
