"""FIITED: lookup (eq. 1) and gradients vs the plain-torch reference, utilities by hand,
prune/grow events vs a plain-Python reference, regrowth, the budget, checkpoints, training."""
import copy
import json
import os

import pytest
import torch
from torchrec import EmbeddingBagConfig, JaggedTensor, KeyedJaggedTensor, PoolingType

from torchrec_compress import FIITED, CompressedEmbeddingBagCollection
from torchrec_compress.testing.data import Bags, random_bags
from torchrec_compress.testing.reference import physical_weights, reference_forward, scheme_maps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _module(pool=30, chunks=2, dim=16, rows=40, pooling=PoolingType.SUM, weighted=False, interval=1, decay=0.5, features=("a",), hysteresis=1.0,
            admit=0, reserve=0.0, position_decay=1.0, min_chunks=0, max_chunks=None, fresh_chunks="zero"):
    """A one-table module; admission on first sight is off unless asked for (the event tests
    check the events alone; the admission tests below check it); fresh chunks start at zero
    unless asked for (the default "init" draws is tested on its own below)."""
    t = EmbeddingBagConfig(name="t", embedding_dim=dim, num_embeddings=rows, feature_names=list(features), pooling=pooling)
    cfg = FIITED(pool=pool, chunks=chunks, interval=interval, decay=decay, hysteresis=hysteresis, admit=admit, reserve=reserve,
                 position_decay=position_decay, min_chunks=min_chunks, max_chunks=max_chunks, fresh_chunks=fresh_chunks)
    m = CompressedEmbeddingBagCollection([t], {"t": cfg}, is_weighted=weighted)
    return m, t, m.scheme("t")


def _assign(impl, kept):
    """Set the address structure by hand: ``kept = {id: [slot of chunk 0, slot of chunk 1, ...]}``."""
    b = impl.buffers
    pairs = sorted((x * impl.c + k, s) for x, slots in kept.items() for k, s in enumerate(slots))
    b.keys.fill_(impl.sentinel)  # the table's keys sit at key_base among its family's (0 alone)
    b.slots.fill_(-1)
    b.keys[: len(pairs)] = torch.tensor([p[0] for p in pairs], dtype=b.keys.dtype) + impl.key_base
    b.slots[: len(pairs)] = torch.tensor([p[1] for p in pairs], dtype=torch.int32)
    b.n_kept.fill_(len(pairs))


def _random_assignment(impl, rows, seed):
    g = torch.Generator().manual_seed(seed)
    free = torch.randperm(impl.pool, generator=g).tolist()
    kept = {}
    for x in torch.randperm(rows, generator=g).tolist():
        c = int(torch.randint(0, impl.c + 1, (1,), generator=g))
        if c and len(free) >= c:
            kept[x] = [free.pop() for _ in range(c)]
    return kept


@pytest.mark.parametrize("chunks,pooling,weighted", [(2, PoolingType.SUM, False), (4, PoolingType.MEAN, False), (2, PoolingType.SUM, True)])
def test_forward_backward_match_reference(chunks, pooling, weighted):
    torch.manual_seed(0)
    m, t, impl = _module(pool=200, chunks=chunks, pooling=pooling, weighted=weighted, features=("a", "b"))
    kept = _random_assignment(impl, 40, seed=chunks)
    _assign(impl, kept)
    w = physical_weights(m)["t__pool"]
    with torch.no_grad():
        w.copy_(torch.randn_like(w))
    m.eval()  # no event, no utility hook: the lookup alone
    bags = random_bags([t], batch=7, seed=3, max_len=5, weighted=weighted)
    out = m(bags.kjt()).values()
    ref_w = {"t__pool": w.detach().clone().requires_grad_(True)}
    ref = reference_forward([t], {"t": impl.config}, ref_w, bags, scheme_maps(m))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(w.grad, ref_w["t__pool"].grad, rtol=1e-5, atol=1e-6)
    unused = sorted(set(range(impl.pool)) - {s for slots in kept.values() for s in slots})
    assert unused and w.grad[unused].abs().sum() == 0  # pool rows nobody owns get no gradient


def test_pruned_chunks_are_exactly_zero():
    m, t, impl = _module(pool=6, chunks=4, dim=16)
    _assign(impl, {3: [0, 1, 2, 3], 5: [4], 7: [5]})
    with torch.no_grad():
        physical_weights(m)["t__pool"].copy_(torch.randn(6, 4) + 10)  # no weight is zero
    m.eval()
    out = m(Bags(["a"], {"a": [[5], [5, 7], [3], [9], []]}).kjt()).values()
    assert (out[0, 4:] == 0).all() and (out[1, 4:] == 0).all() and (out[0, :4] != 0).all()
    assert (out[2] != 0).all() and (out[3] == 0).all() and (out[4] == 0).all()  # 9 keeps nothing
    assert impl.kept_chunks()[[3, 5, 7, 9]].tolist() == [4, 1, 1, 0]


def test_utility_is_gradient_magnitude_per_access_by_hand():
    """u(x, k) = SUM over accesses of |w| ||dL/de_k(bag)|| / len (MEAN); pruned chunks included:
    exact for kept chunks (per pool slot), a count-mean-min estimate for pruned ones."""
    m, t, impl = _module(pool=400, chunks=2, dim=8, pooling=PoolingType.MEAN)
    _assign(impl, {3: [7, 8]})  # id 3 keeps both chunks, id 4 none
    jt = JaggedTensor(values=torch.tensor([3, 4, 3]), lengths=torch.tensor([2, 1]))
    grad = torch.tensor([[3.0, 4.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 2.0, 0.0]])
    impl.see(jt.values(), None)
    impl.observe(grad, jt, None)
    impl.see(jt.values(), None)
    impl.observe(grad, jt, None)
    u = impl.utility(torch.tensor([3, 4, 5]))
    # id 3: bag 0 (len 2): chunk norms 5, 1 -> 2.5, 0.5; bag 1 (len 1): 1, 2. Twice. Exact (kept).
    assert u[0].tolist() == [2 * 3.5, 2 * 2.5] and impl.buffers.slot_utility[[7, 8]].tolist() == [7.0, 5.0]
    # id 4 (pruned): bag 0 only -> 2.5, 0.5, twice; sketched: within its cells' noise share
    noise = 2 * (2.5 + 0.5) / (impl.width - 1)
    assert (u[1] - torch.tensor([5.0, 1.0])).abs().max() <= noise + 1e-6 and (u[2] <= noise + 1e-6).all()
    assert impl.seen_ids().tolist() == [3, 4]  # the bitmap of ids seen since the last event


def _reference_event(util, old, pool, hysteresis, position_decay=1.0, min_chunks=0, max_chunks=None):
    """Plain Python: keep the ``pool`` (id, chunk) of highest prefix-min utility (> 0; kept
    chunks count ``hysteresis`` x theirs; chunk k's times ``position_decay ** k``; chunks
    k < ``min_chunks`` before all others; none from ``max_chunks`` on), ties to lower
    (id, chunk); old chunks keep their slots, new ones take the lowest free slots."""
    by_id = {}
    for (x, k), u in util.items():
        by_id.setdefault(x, {})[k] = u * (hysteresis if (x, k) in old else 1.0)
    scored = []
    for x, us in by_id.items():
        best = float("inf")
        for k in sorted(us):
            best = min(best, us[k])
            if best > 0 and (max_chunks is None or k < max_chunks):
                scored.append((k >= min_chunks, -best * position_decay**k, x, k))
    chosen = sorted((x, k) for _, _, x, k in sorted(scored)[:pool])
    new = {p: old[p] for p in chosen if p in old}
    free = sorted(set(range(pool)) - set(new.values()))
    for p in chosen:
        if p not in new:
            new[p] = free.pop(0)
    return new


def _state(impl):
    b = impl.buffers
    n = int(b.n_kept)
    return {((int(k) - impl.key_base) // impl.c, (int(k) - impl.key_base) % impl.c): int(s)
            for k, s in zip(b.keys[:n].tolist(), b.slots[:n].tolist())}


@pytest.mark.parametrize("position_decay, min_chunks, max_chunks", [(1.0, 0, None), (0.5, 0, None), (1.0, 1, 3), (0.5, 2, 2)])
def test_events_match_python_reference_and_respect_the_budget(position_decay, min_chunks, max_chunks):
    torch.manual_seed(0)
    m, t, impl = _module(pool=11, chunks=4, dim=16, rows=30, interval=1, decay=0.7, hysteresis=1.5, position_decay=position_decay,
                         min_chunks=min_chunks, max_chunks=max_chunks)
    w = physical_weights(m)["t__pool"]
    before, weights_before, expected_util = {}, w.detach().clone(), {}
    for step in range(8):
        bags = random_bags([t], batch=6, seed=step, max_len=4)
        ids = torch.unique(bags.kjt().values())
        out = m(bags.kjt()).values()  # an event runs first from step 1 on
        after = _state(impl)
        if step:
            assert after == _reference_event(expected_util, before, impl.pool, impl.config.hysteresis, position_decay, min_chunks, max_chunks)
            granted = sorted(set(after.values()) - {s for p, s in after.items() if before.get(p) == s})
            assert granted == sorted(s for p, s in after.items() if before.get(p) != s)
            assert (w[granted] == 0).all()  # granted chunks start at zero: granting never changes an output
            for p, s in after.items():  # kept chunks keep their weights
                if before.get(p) == s:
                    assert torch.equal(w[s], weights_before[s])
        # budget, uniqueness and the prefix property after every event
        assert len(after) <= impl.pool and len(set(after.values())) == len(after)
        assert all((x, k - 1) in after for x, k in after if k) and all(k < impl.top for _, k in after)
        seen = impl.seen_ids()  # marked in the forward, after the event: every id of the batch
        assert seen.tolist() == ids.tolist()
        (out * torch.randn_like(out)).sum().backward()
        with torch.no_grad():
            w -= 0.1 * w.grad
            w.grad = None
        # the event ranks the kept ids and the pool / C seen ids of highest chunk-0 utility (ties: lower id)
        u0 = impl.utility(seen)[:, 0].tolist()
        top = sorted(range(len(u0)), key=lambda i: (-u0[i], int(seen[i])))[: max(1, impl.pool // impl.c)]
        ranked = torch.tensor(sorted(int(seen[i]) for i in top), dtype=torch.int64)
        assert impl._seen_candidates().sort().values.tolist() == ranked.tolist()
        cand = torch.unique(torch.cat([torch.tensor(sorted({x for x, _ in after}), dtype=torch.int64), ranked]))
        u = impl.utility(cand)  # what the next event sees (before it decays them)
        expected_util = {(int(x), k): float(u[i, k]) for i, x in enumerate(cand) for k in range(impl.c)}
        before, weights_before = after, w.detach().clone()
    assert int(impl.buffers.events) == 7 and len(after) == impl.pool  # enough demand to fill the pool


def test_regrowth_when_utility_returns():
    m, t, impl = _module(pool=2, chunks=2, dim=8, rows=10, interval=1, decay=0.25)

    def step(ids, scale):
        out = m(Bags(["a"], {"a": [[i] for i in ids]}).kjt()).values()
        (out * scale).sum().backward()
        return impl.kept_chunks()

    step([1, 2], torch.tensor([[10.0] * 8, [1.0] * 8]))
    assert step([2], torch.tensor([[1.0] * 8]))[[1, 2]].tolist() == [2, 0]  # 1 was most useful: it gets both chunks
    for _ in range(3):  # 1 is gone; 2 keeps coming
        kept = step([2], torch.tensor([[5.0] * 8]))
    assert kept[[1, 2]].tolist() == [0, 2]  # 1 pruned, 2 grown
    step([1], torch.tensor([[100.0] * 8]))
    assert step([1], torch.tensor([[1.0] * 8]))[[1, 2]].tolist() == [2, 0]  # 1 grows back


def test_min_chunks_never_spends_the_pool_on_useless_first_chunks():
    m, t, impl = _module(pool=2, chunks=2, dim=8, rows=10, interval=1, min_chunks=1)
    _assign(impl, {1: [0], 2: [1]})
    out = m(Bags(["a"], {"a": [[1], [2]]}).kjt()).values()
    (out * torch.tensor([[1.0] * 8, [0.0] * 8])).sum().backward()  # id 2 earns nothing
    u = impl.utility(torch.tensor([1, 2]))
    assert (u[0] > 0).all() and (u[1] == 0).all()
    m(Bags(["a"], {"a": [[1]]}).kjt())  # the event: id 1's two chunks, not id 2's zero-utility first chunk
    assert impl.kept_chunks()[[1, 2]].tolist() == [2, 0]
    util = {(x, k): float(u[i, k]) for i, x in enumerate((1, 2)) for k in range(2)}
    assert _state(impl) == _reference_event(util, {(1, 0): 0, (2, 0): 1}, 2, 1.0, 1.0, 1)


def test_config_errors_and_memory_report():
    t = EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=1000, feature_names=["a"])
    with pytest.raises(ValueError, match=r"chunk dim d / C = 16/8 must be a multiple of 4"):
        CompressedEmbeddingBagCollection([t], {"t": FIITED(ratio=4, chunks=8)})
    with pytest.raises(ValueError, match=r"decay must be in \(0, 1\]"):
        FIITED(ratio=4, decay=0.0)
    with pytest.raises(ValueError, match="give exactly one of ratio= or pool="):
        FIITED(ratio=4, pool=10)
    with pytest.raises(ValueError, match="interval must be a positive int"):
        FIITED(ratio=4, interval=0)
    with pytest.raises(ValueError, match="hysteresis must be >= 1"):
        FIITED(ratio=4, hysteresis=0.5)
    with pytest.raises(ValueError, match=r"admit must be an int in \[0, chunks=4\], got 5"):
        FIITED(ratio=4, admit=5)
    with pytest.raises(ValueError, match=r"reserve must be in \[0, 1\)"):
        FIITED(ratio=4, reserve=1.0)
    with pytest.raises(ValueError, match=r"position_decay must be in \(0, 1\]"):
        FIITED(ratio=4, position_decay=0.0)
    with pytest.raises(ValueError, match=r"min_chunks must be an int in \[0, chunks=4\], got 5"):
        FIITED(ratio=4, min_chunks=5)
    with pytest.raises(ValueError, match=r"max_chunks must be an int in \[max\(1, admit, min_chunks\), chunks=4\], got 1"):
        FIITED(ratio=4, admit=2, max_chunks=1)
    with pytest.raises(ValueError, match=r"sketch \(cells per pool chunk\) must be in \(0, 16\]"):
        FIITED(ratio=4, sketch=0.0)
    with pytest.raises(ValueError, match="cannot be reached: not one chunk"):
        CompressedEmbeddingBagCollection([dataclasses_replace(t, num_embeddings=1)], {"t": FIITED(ratio=100)})
    for ratio, sketch in ((4, 0.5), (10, 0.5), (10, 0.125)):
        m = CompressedEmbeddingBagCollection([t], {"t": FIITED(ratio=ratio, chunks=2, sketch=sketch)})
        rep = m.memory_report().tables["t"]
        assert ratio * 0.97 <= rep.ratio <= ratio * 1.03  # pool + address structure + utility state = budget
        assert m.scheme("t").width == max(64, int(m.scheme("t").pool * sketch))  # never narrower than 64 cells, paid from the budget
        assert set(rep.parts) == {"t__pool", "t (maps)"} and rep.parts["t (maps)"] > 0
    capped = CompressedEmbeddingBagCollection([t], {"t": FIITED(ratio=1.5, chunks=4, max_chunks=1)}).scheme("t")
    assert capped.pool == 1000  # an id never holds more than max_chunks: the pool needs no more than v x max_chunks


def test_memory_as_the_paper_counts_it_beside_ours():
    """The paper counts the kept chunks only; ours adds the free pool rows, the address
    structure and the utility state. By hand: v=40, d=16, C=2 (chunks of 8 fp32 = 32 B), P=30."""
    t = EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=40, feature_names=["a"])
    u = EmbeddingBagConfig(name="u", embedding_dim=16, num_embeddings=10, feature_names=["b"])
    m = CompressedEmbeddingBagCollection([t, u], {"t": FIITED(pool=30, chunks=2)})
    impl = m.scheme("t")
    assert (impl.width, impl.seen_bytes) == (64, 5)  # sketch: max(64, 0.5 * 30) cells per row; seen: 40 bits
    _assign(impl, {1: [0, 1], 5: [2], 7: [3]})  # 4 chunks kept
    rep = m.memory_report()
    pool = 30 * 8 * 4
    # int64 keys + int32 slots + fp32 slot utilities (30 each), 2 x 64 fp32 sketch, a 40-bit seen bitmap,
    # 4 int64 counters (n_kept, key_base, steps, events)
    meta = 30 * 8 + 30 * 4 + 30 * 4 + 2 * 64 * 4 + 5 + 4 * 8
    ft = rep.tables["t"]
    assert ft.parts == {"t__pool": pool, "t (maps)": meta} and ft.compressed_bytes == pool + meta == 1989
    assert ft.paper_bytes == 4 * 8 * 4 == 128  # the paper: 4 kept chunks of 8 floats
    assert ft.ratio == pytest.approx(40 * 16 * 4 / 1989) and ft.paper_ratio == pytest.approx(2560 / 128)  # 1.29x vs 20x
    assert rep.tables["u"].paper_bytes is None and rep.tables["u"].paper_ratio is None  # uncompressed: counted the same
    total = rep.total  # the other tables count in full in the paper's total too
    assert (total.compressed_bytes, total.paper_bytes, total.uncompressed_bytes) == (1989 + 640, 128 + 640, 2560 + 640)
    assert "ratio as its paper counts" in str(rep) and "20.00x" in str(rep)
    assert "paper" not in str(CompressedEmbeddingBagCollection([u]).memory_report())  # no column where no scheme has one


def dataclasses_replace(t, **kw):
    import dataclasses

    return dataclasses.replace(t, **kw)


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(0)
    a, t, _ = _module(pool=12, chunks=2, rows=30, interval=2)
    batches = [random_bags([t], batch=5, seed=s).kjt() for s in range(9)]

    def train(m, bs):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        outs = []
        for i, kjt in enumerate(bs):
            out = m(kjt).values()
            (out * torch.randn(out.shape, generator=torch.Generator().manual_seed(i))).sum().backward()
            opt.step()
            opt.zero_grad()
            outs.append(out.detach())
        return outs

    train(a, batches[:5])  # stops between events (warm-up events after 1, 2, 4 steps, then every 2)
    b, _, _ = _module(pool=12, chunks=2, rows=30, interval=2)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for x, y in zip(train(a, batches[5:]), train(b, batches[5:])):
        assert torch.equal(x, y)
    assert torch.equal(a.scheme("t").buffers.keys, b.scheme("t").buffers.keys) and int(a.scheme("t").buffers.events) == 5
    assert int(a.scheme("t").buffers.n_kept) == 12


def test_train_cli_with_fiited_resumes_exactly(tmp_path):
    from torchrec_compress.cli import main
    from torchrec_compress.testing.runs import assert_same_tensors, final_checkpoint_tensors, results, same_run

    synth = os.path.join(ROOT, "examples", "synthetic.yaml")
    common = ["data.train_batches=8", "data.eval_batches=1", "schemes={t_cat_2: {type: FIITED, ratio: 4, chunks: 2, interval: 3}}",
              "train.tensorboard=false", "train.plots=false"]
    a, b = tmp_path / "a", tmp_path / "b"
    main(["train", "--config", synth, f"out={a}", *common])
    main(["train", "--config", synth, f"out={b}", "train.max_steps=4", *common])  # between the events of steps 3 and 6
    main(["train", "--config", synth, "--resume", f"out={b}", *common])
    ra = results(str(a))
    assert 0.5 < ra["epochs"][0]["eval_auc"] and ra["ratio"] > 1.1
    assert ra["embedding_bytes"] > ra["paper_bytes"] > 0 and ra["paper_ratio"] > ra["ratio"]  # also as the paper counts (kept chunks)
    same_run(ra, results(str(b)))
    ta = final_checkpoint_tensors(str(a))
    assert_same_tensors(ta, final_checkpoint_tensors(str(b)))
    assert ra["epochs"][0]["eval_schemes"]["t_cat_2"]["kept_chunks"] > 0
    assert json.loads((a / "results.json").read_text())["schemes"]["t_cat_2"].startswith("FIITED(")


def test_regranted_slots_restart_weights_and_fused_optimizer_state():
    """A pool row handed to another chunk starts like a new row: zero weights and zero
    row-wise Adagrad sum (it must not inherit its previous owner's step size)."""
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    m, t, impl = _module(pool=2, chunks=2, dim=8, rows=10, interval=1, decay=0.25, hysteresis=1.0)
    w = physical_weights(m)["t__pool"]
    apply_optimizer_in_backward(RowWiseAdagrad, [w], {"lr": 0.1})
    state = w._in_backward_optimizers[0].state[w]["sum"]

    def step(ids, scale):
        out = m(Bags(["a"], {"a": [[i] for i in ids]}).kjt()).values()
        (out * scale).sum().backward()

    step([1], torch.full((1, 8), 10.0))
    step([1], torch.full((1, 8), 10.0))  # id 1 owns both slots and trains them
    assert impl.kept_chunks()[1] == 2 and (state.view(-1) > 0).all() and (w != 0).all()
    for _ in range(3):
        step([2], torch.full((1, 8), 50.0))  # id 2 takes over
    granted_at = _state(impl)
    assert impl.kept_chunks()[[1, 2]].tolist() == [0, 2]
    # since the hand-over event, id 2's rows had 2 updates from zero weights and zero state:
    # row-wise Adagrad moves each element by lr (g / sqrt(g^2)), then lr / sqrt(2); an inherited
    # sum (id 1's) would give ~0.1655 instead of 0.1707
    for k in range(2):
        row = w[granted_at[(2, k)]]
        torch.testing.assert_close(row.abs(), torch.full_like(row, 0.1 * (1 + 2**-0.5)), atol=2e-4, rtol=0)


def test_new_ids_are_admitted_on_first_sight_while_free_slots_last():
    """see(): ids that keep no chunk get their first ``admit`` chunks from the lowest free
    slots, lowest ids first, up to the pool; ids that keep a chunk are left alone."""
    m, t, impl = _module(pool=7, chunks=4, dim=16, rows=30, admit=2)
    impl.see(torch.tensor([9, 3, 9]), None)
    assert _state(impl) == {(3, 0): 0, (3, 1): 1, (9, 0): 2, (9, 1): 3}
    _assign(impl, {3: [0, 1], 9: [5], 12: [3]})  # free: 2, 4, 6
    impl.see(torch.tensor([12, 20, 9, 4, 1]), None)  # new: 1, 4, 20; room for one id of 2 chunks
    assert _state(impl) == {(1, 0): 2, (1, 1): 4, (3, 0): 0, (3, 1): 1, (9, 0): 5, (12, 0): 3}
    b = impl.buffers
    n = int(b.n_kept)
    assert torch.equal(b.keys[:n], torch.sort(b.keys[:n]).values) and (b.keys[n:] == impl.sentinel).all()
    impl.see(torch.tensor([25, 26]), None)  # one free slot, admit=2: nobody fits
    assert int(b.n_kept) == n


def test_admitted_chunks_start_at_zero_and_train_at_once():
    m, t, impl = _module(pool=6, chunks=2, dim=8, rows=10, interval=100, admit=1)
    w = physical_weights(m)["t__pool"]
    kjt = Bags(["a"], {"a": [[4], [7, 4]]}).kjt()
    m.eval()
    assert int(impl.buffers.n_kept) == 0 and (m(kjt).values() == 0).all()  # evaluation admits nobody
    m.train()
    out = m(kjt).values()
    assert _state(impl) == {(4, 0): 0, (7, 0): 1} and (out == 0).all()  # admitted at zero: the output is unchanged
    (out * torch.ones_like(out)).sum().backward()
    assert torch.equal(w.grad[:2], torch.tensor([[2.0] * 4 + [0.0] * 4, [1.0] * 4 + [0.0] * 4])[:, :4])  # learns this step
    assert (w.grad[2:] == 0).all()
    u = impl.buffers.slot_utility
    assert u[:2].tolist() == [2 * 2.0, 2.0]  # ||1_4|| = 2 per access, counted from the first one


def test_events_zero_freed_rows_and_their_optimizer_state():
    """Admission takes free rows as they are, so an event zeroes every row it frees (weights
    and row-wise Adagrad sum) and leaves ``reserve`` of the pool free."""
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    m, t, impl = _module(pool=10, chunks=2, dim=8, rows=30, interval=4, decay=1.0, admit=1, reserve=0.3)
    w = physical_weights(m)["t__pool"]
    apply_optimizer_in_backward(RowWiseAdagrad, [w], {"lr": 0.1})
    state = w._in_backward_optimizers[0].state[w]["sum"]
    for i in range(4):  # events after steps 1, 2 (warm-up) and 4
        ids = list(range(3 * i, 3 * i + 5))
        out = m(Bags(["a"], {"a": [[x] for x in ids]}).kjt()).values()
        (out * torch.arange(1.0, len(ids) + 1).unsqueeze(1)).sum().backward()
    assert int(impl.buffers.events) == 2
    before = _state(impl)
    assert len(before) == impl.pool  # admission filled the pool
    m(Bags(["a"], {"a": [[29]]}).kjt())  # step 4: event, then id 29 is admitted into the reserve
    after = _state(impl)
    assert len(after) <= impl.pool - 3 + 1 and after.get((29, 0)) is not None
    owned = set(after.values())
    free = sorted(set(range(impl.pool)) - owned)
    assert free and (w[free] == 0).all() and (state.view(-1)[free] == 0).all()
    for p, s in after.items():
        if p != (29, 0) and before.get(p) != s:  # granted at the event: zero as well
            assert (w[s] == 0).all()
    assert (w[after[(29, 0)]] == 0).all()


def _family_tables(n=3):
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=12, num_embeddings=300 + 50 * i, feature_names=[f"f{i}", f"g{i}"][: 1 + i % 2],
                                 pooling=PoolingType.MEAN if i == 1 else PoolingType.SUM) for i in range(n)]
    cfgs = {f"t{i}": FIITED(pool=120 + 30 * i, chunks=3, seed=i, admit=2, interval=1000) for i in range(n)}
    return tables, cfgs


def test_admission_merges_into_every_tables_sorted_keys_like_a_sort():
    """One admission pass over a family: each table's new ids (no chunk yet) take its lowest
    free slots, lowest ids first, while its budget lasts; the flat keys stay sorted, every
    table's segment holds exactly its old chunks and the admitted ones, and a full table admits none."""
    tables, cfgs = _family_tables()
    m = CompressedEmbeddingBagCollection(tables, cfgs)
    impls = [m.scheme(t.name) for t in tables]
    fam = impls[0].family
    assert all(i.family is fam for i in impls) and [i.key_base for i in impls] == [0, 2048, 4096]  # 2^11 > 400 x 3 keys
    before = {}
    for i, impl in enumerate(impls):
        kept = _random_assignment(impl, 60, seed=i)
        if i == 2:  # full: nothing to admit
            kept = {x: [s] for x, s in zip(range(impl.pool), torch.randperm(impl.pool).tolist())}
        _assign(impl, kept)
        before[i] = _state(impl)
    m.train()
    m(random_bags(tables, 40, seed=3, max_len=3).kjt())  # step 0: no event, every table sees and admits
    kjt = random_bags(tables, 40, seed=3, max_len=3).kjt()
    for i, (t, impl) in enumerate(zip(tables, impls)):
        ids = sorted({int(x) for f in t.feature_names for x in kjt[f].values()})
        old = before[i]
        new_ids = [x for x in ids if (x, 0) not in old][: (impl.pool - len(old)) // 2]
        free = sorted(set(range(impl.pool)) - set(old.values()))
        expected = dict(old)
        for x in new_ids:
            for k in range(2):
                expected[(x, k)] = free.pop(0)
        assert _state(impl) == expected, t.name
        assert impl.seen_ids().tolist() == ids
        b = impl.buffers
        n = int(b.n_kept)
        assert torch.equal(b.keys[:n], b.keys[:n].sort().values) and (b.keys[n:] == impl.sentinel).all()
    assert _state(impls[2]) == before[2]
    flat = fam.link()["keys"]
    assert torch.equal(flat, flat.sort().values)  # one sorted array: one search finds any table's chunks


def test_batched_family_equals_each_table_alone():
    """Tables of one family (one flat address structure, one see, one route, one observe per
    step) train exactly like the same tables each alone in its own module: outputs, address
    structures, utilities, events (after steps 1, 2 and 4) and seen ids; a checkpoint of the
    family loads into a module whose family is laid out otherwise."""
    tables, cfgs = _family_tables()
    cfgs = {k: dataclasses_replace(c, interval=5) for k, c in cfgs.items()}
    torch.manual_seed(0)
    m = CompressedEmbeddingBagCollection(tables, cfgs)
    alone = [CompressedEmbeddingBagCollection([t], {t.name: cfgs[t.name]}) for t in tables]
    for a, t in zip(alone, tables):
        with torch.no_grad():
            physical_weights(a)[f"{t.name}__pool"].copy_(physical_weights(m)[f"{t.name}__pool"])
    m.train()
    for step in range(6):
        kjt = random_bags(tables, 8, seed=step, max_len=3).kjt()
        out = m(kjt)
        g = torch.randn_like(out.values())
        (out.values() * g).sum().backward()
        col = 0
        for a, t in zip(alone, tables):
            a.train()
            sub = KeyedJaggedTensor.from_jt_dict({f: kjt[f] for f in t.feature_names})
            o = a(sub).values()
            torch.testing.assert_close(o, out.values()[:, col:col + o.shape[1]], msg=f"{t.name} step {step}")
            (o * g[:, col:col + o.shape[1]]).sum().backward()
            col += o.shape[1]
            x, y = m.scheme(t.name), a.scheme(t.name)
            assert _state(x) == _state(y) and torch.equal(x.seen_ids(), y.seen_ids()), f"{t.name} step {step}"
            for name in ("slot_utility", "utility"):
                torch.testing.assert_close(getattr(x.buffers, name), getattr(y.buffers, name), rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # the same plain SGD on both
            for mod in (m, *alone):
                for w in physical_weights(mod).values():
                    w -= 0.1 * w.grad
                    w.grad = None
    assert int(m.scheme("t0").buffers.events) == 4
    # a checkpoint's keys carry their key_base: loaded into another layout (t2 alone), they move
    alone[2].load_state_dict({k.replace("maps.t2.", "maps.t2."): v for k, v in m.state_dict().items() if ".t2" in k or "t2__" in k},
                             strict=False)
    assert _state(alone[2].scheme("t2")) == _state(m.scheme("t2"))
    assert int(alone[2].scheme("t2").buffers.key_base) == 0 and int(m.state_dict()["maps.t2.key_base"]) == m.scheme("t2").key_base


def test_dmp_materialized_map_finds_admitted_ids_from_the_first_step():
    """DMP fills buffers left on ``meta`` with zeros (not FIITED's sorted-key padding): the ids
    admitted in the very first step must still be found, and trained, in that step."""
    from torchrec import EmbeddingBagCollection
    from torchrec.models.dlrm import DLRM

    from torchrec_compress import compress_
    from torchrec_compress.data.synthetic import SyntheticCriteo
    from torchrec_compress.distributed.state import single_rank_full_state_dict
    from torchrec_compress.train import local_process_group, shard_for_training, train_steps

    cards = [2000, 30]
    tables = [EmbeddingBagConfig(name=f"t_cat_{i}", embedding_dim=16, num_embeddings=v, feature_names=[f"cat_{i}"]) for i, v in enumerate(cards)]
    batch = next(iter(SyntheticCriteo(cards, 256, 1, seed=0)))
    torch.manual_seed(0)
    model = DLRM(embedding_bag_collection=EmbeddingBagCollection(tables, device=torch.device("meta")), dense_in_features=13,
                 dense_arch_layer_sizes=[16, 16], over_arch_layer_sizes=[16, 1], dense_device=torch.device("cpu"))
    compress_(model, {"t_cat_0": FIITED(pool=4000, chunks=4)})
    with local_process_group():
        dmp, opt = shard_for_training(model, model.sparse_arch, lr_sparse=0.1, lr_dense=0.01)
        impl = dmp.module.sparse_arch.embedding_bag_collection.scheme("t_cat_0")
        assert int(impl.buffers.n_kept) == 0 and int(impl.buffers.keys.max()) == 0  # as DMP materialized it
        train_steps(dmp, opt, [batch], progress=False)
        ids = batch.sparse_features["cat_0"].values()
        slots = impl.slots_of(ids)[:, 0]
        assert int(impl.buffers.n_kept) == ids.unique().numel() and bool((slots >= 0).all())
        pool = next(v for k, v in single_rank_full_state_dict(dmp).items() if k.endswith("t_cat_0__pool.weight"))
    assert bool((pool[slots].abs().sum(dim=1) > 0).all())  # admitted at zero, trained in the same step


def test_fresh_chunks_start_from_the_tables_init_by_default():
    """The default: granted and freed pool rows restart from a fresh draw of the table's init
    (the same on every rank: seeded by the event count), their optimizer state from zero."""
    m, t, impl = _module(pool=4, chunks=2, dim=8, rows=10, interval=1, decay=0.25, fresh_chunks="init")
    assert FIITED(ratio=4).fresh_chunks == "init"
    w = physical_weights(m)["t__pool"]
    lo, hi = t.get_weight_init_min(), t.get_weight_init_max()
    assert (w != 0).all() and (w >= lo).all() and (w <= hi).all()  # the pool starts like the table
    for _ in range(2):  # gradients give ids 1 and 2 utility; the event of step 2 grants them chunks
        m(Bags(["a"], {"a": [[1], [2]]}).kjt()).values().sum().backward()
    granted = sorted(_state(impl).values())
    assert granted
    want = impl.reset_values("t__pool", torch.tensor(granted), 4)
    assert want is not None and (want >= lo).all() and (want <= hi).all()
    torch.testing.assert_close(w[granted].detach(), want)  # exactly the seeded draw
    assert impl.reset_values("t__pool", torch.tensor(granted), 4).equal(want)  # reproducible


def test_one_observe_pass_over_all_tables_equals_each_tables_own():
    """The module hooks its output once: FIITED tables of one chunk shape share one
    ``observe_batch`` (one index_add_), whose utilities equal each table's own ``observe``
    of its output columns (pools, sketch widths, seeds and poolings differ; t3 has another C)."""
    tables = [EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=40 + 10 * i, feature_names=[f"f{i}"],
                                 pooling=PoolingType.MEAN if i == 1 else PoolingType.SUM) for i in range(4)]
    cfgs = {"t0": FIITED(pool=30, chunks=2, seed=0), "t1": FIITED(pool=50, chunks=2, seed=3),
            "t2": FIITED(pool=20, chunks=2, sketch=2.0, seed=1, admit=0), "t3": FIITED(pool=30, chunks=4, seed=2)}
    m = CompressedEmbeddingBagCollection(tables, cfgs)
    ref = copy.deepcopy(m)
    m.train(), ref.train()
    for step in range(4):  # events after steps 1 and 2: the utilities decide them
        kjt = random_bags(tables, 6, seed=step).kjt()
        g = torch.randn(6, 64, generator=torch.Generator().manual_seed(step))
        (m(kjt).values() * g).sum().backward()
        ref(kjt)  # the same forward (see, admissions, events), no backward: observe by hand below
        for i, t in enumerate(tables):
            ref.scheme(t.name).observe(g[:, 16 * i:16 * (i + 1)], kjt[f"f{i}"], None)
        for t in tables:
            a, b = m.scheme(t.name).buffers, ref.scheme(t.name).buffers
            for name in ("slot_utility", "utility", "keys", "slots", "n_kept"):
                torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-6, atol=0, msg=f"{t.name}.{name} step {step}")
        assert ref.scheme("t0").buffers.slot_utility.abs().sum() > 0
