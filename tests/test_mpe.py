"""MPE as in the authors' code: LSQ+ against the authors' backward, search/choose/retrain
against a plain-torch reference (the search's penalty included), the paper's selection rule,
the budget, retraining from the init, export (FBGEMM re-quantizes each width rounded up),
memory both ways, the whole self-driven procedure (count, group, search, choose, retrain)."""
import copy
import math

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM

from torchrec_compress import MPE, CompressedEmbeddingBagCollection, compress_, fit_
from torchrec_compress.data.synthetic import SyntheticCriteo
from torchrec_compress.quant import export, quantized_memory_report
from torchrec_compress.schemes.mpe import MAP_BYTES, RETRAIN, export_bits, lsq_plus
from torchrec_compress.testing.data import random_bags
from torchrec_compress.testing.reference import fbgemm_stored, physical_weights, reference_forward, reference_leaves
from torchrec_compress.train import evaluate, local_process_group, shard_for_training, train_steps

K = 7  # the paper's widths 0..6


def _tables():
    return [EmbeddingBagConfig(name="t", embedding_dim=32, num_embeddings=600, feature_names=["f", "f2"]),
            EmbeddingBagConfig(name="u", embedding_dim=32, num_embeddings=40, feature_names=["g"])]


def _model(ratio=10.0, groups=8, **kw):
    torch.manual_seed(0)
    m = CompressedEmbeddingBagCollection(copy.deepcopy(_tables()), {"t": MPE(ratio=ratio, groups=groups, **kw)})
    with torch.no_grad():
        m.per_id.embedding_bags["t__full"].weight.mul_(20)  # trained-looking scale, not the tiny init
    fit_(m, [random_bags(_tables(), 64, seed=i).kjt() for i in range(4)])  # steps re-initialized from these rows
    with torch.no_grad():
        m.scheme_states()["t"].beta.copy_(torch.randn(32, generator=torch.Generator().manual_seed(3)) * 0.01)
    return m


@pytest.mark.parametrize("bits", [1, 2, 3, 6])
def test_lsq_plus_gradients_are_the_authors_backward(bits):
    """The authors' ``lsq_plus.backward`` written out: d w = [inside] dy; d alpha = SUM (low [below]
    + high [above] + (round(v) - v) [inside]) dy * s; d beta = SUM_rows [outside] dy * s."""
    g = torch.Generator().manual_seed(bits)
    w = (torch.randn(40, 8, generator=g) * 0.3).requires_grad_()
    alpha = torch.tensor(0.07, requires_grad=True)
    beta = (torch.randn(8, generator=g) * 0.02).requires_grad_()
    s = 1 / math.sqrt(2 ** (bits - 1) * w.numel())
    out = lsq_plus(w, alpha, beta, bits, s)
    dy = torch.randn(40, 8, generator=g)
    (out * dy).sum().backward()
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    v = ((w - beta) / alpha).detach()
    small, big = (v < lo).float(), (v > hi).float()
    mid = 1 - small - big
    torch.testing.assert_close(out, v.round().clamp(lo, hi) * alpha + beta, rtol=0, atol=1e-6)
    torch.testing.assert_close(w.grad, mid * dy)
    torch.testing.assert_close(alpha.grad, ((small * lo + big * hi + mid * (v.round() - v)) * dy * s).sum(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(beta.grad, ((small + big) * dy * s).sum(0), rtol=1e-5, atol=1e-7)


def test_export_widths_round_up_to_what_fbgemm_packs():
    assert [export_bits(b, 16) for b in (1, 2, 3, 4, 5, 6, 8, 16, 32)] == [2, 2, 4, 4, 8, 8, 8, 16, 32]
    assert export_bits(2, 4) == 4  # 4 dims x 2 bits = 1 byte: FBGEMM packs even byte counts only


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
        m.scheme_states()["t"].logits.copy_(torch.randn(8, K, generator=torch.Generator().manual_seed(1)) * 3e-3)
    if stage == "retrain":
        m.scheme("t").choose_()
    bags = random_bags(_tables(), 6, seed=11)
    out = m(bags.kjt()).values()
    w, maps = reference_leaves(m)
    cfg = MPE(ratio=10, groups=8)
    ref = reference_forward(_tables(), {"t": cfg}, w, bags, maps)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(ref)
    (out * g).sum().backward()  # the module adds the search penalty's gradient itself (training mode)
    penalty = 0.0
    if stage == "search":  # paper: loss += gamma * SUM_g SUM_b p_gb b / cnt_g (on while over the budget), by hand
        st = maps["t"]
        probs = torch.softmax(st["logits"] / cfg.temperature, dim=1)
        n = torch.bincount(st["group_of"].long(), minlength=8).float()
        expected = (probs @ torch.arange(K).float() * n).sum() / n.sum()  # packed: b bits per element
        assert float(expected.detach()) > 32 / 10 - 8 * MAP_BYTES / 32  # over the budget: the term is on
        counts = torch.zeros(600, dtype=torch.float64)
        for i in range(4):
            kjt = random_bags(_tables(), 64, seed=i).kjt()
            for f in ("f", "f2"):
                counts.index_add_(0, kjt[f].values(), torch.ones(kjt[f].values().numel(), dtype=torch.float64))
        cnt = torch.zeros(8, dtype=torch.float64).index_add_(0, st["group_of"].long(), counts) + 1
        penalty = cfg.penalty * (probs * torch.arange(K).float() / (cnt / cnt.min()).float().unsqueeze(1)).sum()
        assert m.scheme("t").penalty().item() == pytest.approx(float(penalty.detach()), rel=1e-5)
    ((ref * g).sum() + penalty).backward()
    # looser than the forward: each row's gradient sums straight-through mixture terms over
    # repeated ids, accumulated in another order than the reference's loops
    tol = dict(rtol=1e-3, atol=2e-4)
    torch.testing.assert_close(physical_weights(m)["t__full"].grad, w["t__full"].grad, **tol)
    for name in ("alpha", "beta") + (("logits",) if stage == "search" else ()):  # retraining: the logits are fixed
        torch.testing.assert_close(m.scheme_states()["t"].get_parameter(name).grad, maps["t"][name].grad, **tol)


def test_penalty_pushes_precision_down_and_choice_meets_budget():
    m = _model(ratio=8)
    impl = m.scheme("t")
    before = impl.expected_bits().item()
    opt = torch.optim.SGD([m.scheme_states()["t"].logits], lr=1e-3)
    for _ in range(20):
        opt.zero_grad()
        impl.penalty().backward()
        opt.step()
    assert impl.expected_bits().item() < before
    chosen = impl.choose_()
    assert sum(chosen.values()) == 600
    rep = m.memory_report().tables["t"]
    assert rep.ratio >= 8.0  # packed rows + the 5 B/id map + steps and offsets fit 1/8 of fp32
    assert impl.penalty().item() == 0.0  # retraining: no penalty


def test_penalty_is_off_within_the_budget():
    m = _model(ratio=4)  # 8 bits per element - 1.25 for the map: uniform widths 0..6 average 3, within
    assert m.scheme("t").penalty().item() == 0.0


def test_selection_is_the_largest_width_with_probability_at_least_one_over_2k():
    m = _model(ratio=1.0, fill=False)  # no budget pressure: the paper's rule alone
    tau = m.scheme("t").config.temperature
    p = torch.full((8, K), 0.02, dtype=torch.float64)
    p[1, 5], p[3, 3] = 0.1, 0.0714
    main = [6, 2, 0, 1, 4, 4, 4, 4]  # each group's most likely width takes the rest of its mass
    for g, k in enumerate(main):
        p[g, k] = 0
        p[g, k] = 1 - p[g].sum()
    with torch.no_grad():
        m.scheme_states()["t"].logits.copy_((p.log() * tau).float())
    m.scheme("t").choose_()
    # 1/(2K) = 0.0714...: group 3's width 3 sits just below it (0.0714 < 1/14), group 1's 5 above (0.1)
    assert m.scheme_states()["t"].bits.tolist() == [6, 5, 0, 1, 4, 4, 4, 4]


def test_fill_gives_bytes_left_under_the_budget_to_the_most_accessed_groups():
    m = _model(ratio=8)  # rows get 4 - 1.25 - (steps, offsets) = 2.73 bits per element
    with torch.no_grad():
        m.scheme_states()["t"].logits.copy_(torch.nn.functional.one_hot(torch.full((8,), 1), K).float())  # all 1 bit
    m.scheme("t").choose_()
    order = sorted(range(8), key=lambda g: -float(m.scheme_states()["t"].group_weight[g]))  # least accessed first
    bits = m.scheme_states()["t"].bits.tolist()
    # 8 equal groups (75 ids), 21.8 bits in all: the 5 most accessed take 6 bits... until the budget holds
    assert sum(bits) <= 8 * 2.73 and sum(bits) + 1 > 8 * 2.73 - 1
    assert [bits[g] for g in reversed(order)] == sorted(bits, reverse=True)  # more accessed, more bits
    assert bits.count(1) >= 4  # the rest keep the paper's choice


def test_retrain_restarts_rows_from_the_init_and_keeps_steps():
    tables = copy.deepcopy(_tables())
    m = CompressedEmbeddingBagCollection(tables, {"t": MPE(ratio=8, groups=8, fit_steps=2, search_steps=2, seed=5)})
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    for i in range(4):  # 2 steps counted, 2 searched
        opt.zero_grad()
        m(random_bags(_tables(), 16, seed=i).kjt()).values().pow(2).sum().backward()
        opt.step()
    alpha = m.scheme_states()["t"].alpha.detach().clone()
    m(random_bags(_tables(), 16, seed=4).kjt())  # the choice runs before this step's lookup
    impl = m.scheme("t")
    assert impl.stage == RETRAIN
    lo, hi = tables[0].get_weight_init_min(), tables[0].get_weight_init_max()
    init = torch.rand(600, 32, generator=torch.Generator().manual_seed(5 * 1_000_003 + 17)) * (hi - lo) + lo
    torch.testing.assert_close(physical_weights(m)["t__full"].detach(), init, rtol=0, atol=0)  # redrawn at the choice
    assert torch.equal(m.scheme_states()["t"].alpha.detach(), alpha)  # the search's steps carry over
    warm = CompressedEmbeddingBagCollection(copy.deepcopy(_tables()), {"t": MPE(ratio=8, groups=8, fit_steps=1, search_steps=1,
                                                                                  retrain_from="search")})
    warm(random_bags(_tables(), 16, seed=0).kjt())
    before = physical_weights(warm)["t__full"].detach().clone()
    warm(random_bags(_tables(), 16, seed=1).kjt())
    warm(random_bags(_tables(), 16, seed=2).kjt())  # chosen before this lookup
    assert warm.scheme("t").stage == RETRAIN and torch.equal(physical_weights(warm)["t__full"].detach(), before)


def test_export_is_fbgemm_at_the_rounded_up_width_and_memory_both_ways():
    m = _model(ratio=4, fill=False)  # the paper's choice alone: the widths below
    with torch.no_grad():  # frequent groups prefer many bits, rare ones few (candidates 0..6)
        prefer = torch.tensor([6, 5, 4, 3, 2, 1, 1, 0])
        m.scheme_states()["t"].logits.copy_(torch.nn.functional.one_hot(prefer, K).float())
    chosen = m.scheme("t").choose_()
    assert len([b for b in chosen if b]) >= 4  # really mixed
    kjt = random_bags(_tables(), 16, seed=5).kjt()
    q = export(m, {"u": "fp32"})  # one FBGEMM table per export width
    kinds = {c.name: c.data_type.name for inner in q.inner_collections() for c in inner.embedding_bag_configs()}
    assert {k for k in kinds if k.startswith("t__")} == {"t__b2", "t__b4", "t__b8"}
    assert (kinds["t__b2"], kinds["t__b4"], kinds["t__b8"]) == ("INT2", "INT4", "INT8")
    # reference: every id's LSQ+ row at its width, then stored by FBGEMM at the width rounded up
    impl = m.scheme("t")
    rows = impl.quantized_rows(physical_weights(m)["t__full"].detach())
    bits = impl.chosen_bits()
    stored = torch.stack([fbgemm_stored(rows[x], export_bits(int(bits[x]), 32)) if bits[x] else torch.zeros(32) for x in range(600)])
    got = q(kjt).to_dict()
    for f in ("f", "f2"):
        jt = kjt[f]
        ref = torch.stack([stored[jt.values()[o:o + n]].sum(0) for o, n in zip(jt.offsets()[:-1].tolist(), jt.lengths().tolist())])
        torch.testing.assert_close(got[f], ref, rtol=1e-5, atol=1e-5)
    # memory: the paper's packed codes; + the map; what FBGEMM stores after export (scale/bias, alignment)
    n = {b: int(c) for b, c in chosen.items()}
    packed = sum(c * math.ceil(32 * b / 8) for b, c in n.items())
    assert impl.paper_bytes() == packed
    trained = m.memory_report().tables["t"].compressed_bytes
    assert trained == packed + 600 * MAP_BYTES + 4 * (K + 32)
    fbgemm = sum(c * {2: 16, 4: 32, 8: 48}[export_bits(b, 32)] for b, c in n.items() if b)  # 8/16/32 data bytes + 4, to 16
    exported = quantized_memory_report(q).tables["t"].compressed_bytes
    assert exported >= fbgemm + 600 * MAP_BYTES and exported > trained


def test_mpe_errors():
    with pytest.raises(ValueError, match="at most 256"):
        MPE(ratio=4, groups=300)
    with pytest.raises(ValueError, match="candidates"):
        MPE(ratio=4, candidates=(7,))
    with pytest.raises(ValueError, match=r"id map, steps and offsets take 5.60 bits per element"):
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


def test_ids_by_frequency_needs_no_per_id_map_and_exports_by_id_ranges():
    """Ids numbered by frequency: groups are id ranges (x * G // v), the deployed model keeps
    G (table, offset) entries, so 16x at dim 16 is reachable (with a per-id map it is not)."""
    t = [EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=640, feature_names=["f"])]
    with pytest.raises(ValueError, match="id map, steps and offsets take 2.57"):
        CompressedEmbeddingBagCollection(copy.deepcopy(t), {"t": MPE(ratio=16, groups=8)})
    torch.manual_seed(0)
    m = CompressedEmbeddingBagCollection(copy.deepcopy(t), {"t": MPE(ratio=16, groups=8, ids_by_frequency=True, fill=False)})
    state = m.scheme_states()["t"]
    assert torch.equal(state.group_of.long(), torch.arange(640) * 8 // 640)
    fit_(m, [random_bags(t, 64, seed=i).kjt() for i in range(2)])  # counts weigh the penalty; the groups stay id ranges
    assert torch.equal(state.group_of.long(), torch.arange(640) * 8 // 640)
    with torch.no_grad():
        m.per_id.embedding_bags["t__full"].weight.mul_(20)
        prefer = torch.tensor([6, 4, 3, 2, 1, 1, 0, 0])
        state.logits.copy_(torch.nn.functional.one_hot(prefer, K).float())
    m.scheme("t").choose_()
    rep = m.memory_report().tables["t"]
    assert rep.ratio >= 16 and rep.parts["t (maps)"] == 9 * 8 + 4 * (K + 16)
    q = export(m)
    impl = m.scheme("t")
    rows = impl.quantized_rows(physical_weights(m)["t__full"].detach())
    bits = impl.chosen_bits()
    stored = torch.stack([fbgemm_stored(rows[x], export_bits(int(bits[x]), 16)) if bits[x] else torch.zeros(16) for x in range(640)])
    kjt = random_bags(t, 32, seed=7).kjt()
    jt = kjt["f"]
    ref = torch.stack([stored[jt.values()[o:o + n]].sum(0) for o, n in zip(jt.offsets()[:-1].tolist(), jt.lengths().tolist())])
    torch.testing.assert_close(q(kjt).to_dict()["f"], ref, rtol=1e-5, atol=1e-5)
    assert quantized_memory_report(q).tables["t"].parts["t (maps)"] == 9 * 8  # no per-id bytes deployed


def test_tables_of_one_batch_share_one_flat_parameter_per_name():
    """MPE tables that batch together train one [T, ...] parameter per name (one optimizer
    step, one DDP gradient); the state_dict keeps each table's own keys, which stay its row:
    loading them changes the forward, training shows in them, and .to() / deepcopy relink."""
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=8, num_embeddings=64, feature_names=[f"f{i}"]) for i in range(3)]
    m = CompressedEmbeddingBagCollection(tables, {t.name: MPE(ratio=4, fit_steps=0, search_steps=50, groups=4) for t in tables})
    flat = dict(m.named_parameters())
    trainable = [n for n, p in flat.items() if p.requires_grad and not n.startswith(("pooled", "per_id", "weighted"))]
    assert sorted(trainable) == ["flat_parameters.f0.alpha", "flat_parameters.f0.beta", "flat_parameters.f0.logits"]
    sd = m.state_dict()
    assert "maps.t1.logits" in sd and not any(k.startswith("flat_parameters") for k in sd)
    kjt = random_bags(tables, 4, seed=0).kjt()
    m.train()
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.01)
    (m(kjt).values() * torch.randn(4, 24, generator=torch.Generator().manual_seed(0))).sum().backward()
    opt.step()
    logits = m.flat_parameters.f0.logits
    assert logits.detach().abs().sum() > 0  # the logits moved
    for i in range(3):  # ... and every table's own parameter is its row
        torch.testing.assert_close(m.state_dict()[f"maps.t{i}.logits"], logits.detach()[i], rtol=0, atol=0)
    # loading a table's own key is what the forward reads next (the search's forward: every width)
    with torch.no_grad():
        before = m(kjt).values()
    sd = copy.deepcopy(m.state_dict())
    sd["maps.t2.beta"] = sd["maps.t2.beta"] + 1.0
    m.load_state_dict(sd)
    with torch.no_grad():
        after = m(kjt).values()
    assert not torch.allclose(before[:, 16:], after[:, 16:]) and torch.equal(before[:, :16], after[:, :16])
    torch.testing.assert_close(m.flat_parameters.f0.beta.detach()[2], sd["maps.t2.beta"], rtol=0, atol=0)
    # a deep copy (its own storage) and .to() relink on the next forward
    c = copy.deepcopy(m).to(torch.float64).to(torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(c(kjt).values(), m(kjt).values())
    with torch.no_grad():
        c.flat_parameters.f0.alpha.mul_(2.0)
    assert torch.equal(c.state_dict()["maps.t0.alpha"], c.flat_parameters.f0.alpha.detach()[0])
    assert not torch.equal(c.state_dict()["maps.t0.alpha"], m.state_dict()["maps.t0.alpha"])
