"""The inference benchmark runs at toy size and reports consistent sizes (timings are not asserted)."""
from torchrec_compress.benchmarks.inference import bench_inference, format_results


def test_bench_inference_small():
    res = bench_inference(max_rows=3000, dim=16, batch=64, batches=1, reps=1, big_rows=1000)
    assert set(res) == {"stock fp32", "stock fp16", "stock int8/int4", "ours int8/int4", "ours MPE (int8/4/2/drop)"}
    assert res["stock fp32"]["speed_vs_fp32"] == 1.0
    # same tables at the same dtypes: our export stores exactly what TorchRec's quantization stores
    assert res["ours int8/int4"]["bytes"] == res["stock int8/int4"]["bytes"]
    assert res["stock fp16"]["size_vs_fp32"] == 2.0
    # at dim 16 FBGEMM's 16-byte row alignment makes int2/int4 rows as big as fp16-ish ones
    assert res["ours MPE (int8/4/2/drop)"]["size_vs_fp32"] > 1.0
    assert all(r["lookups_per_s"] > 0 for r in res.values())
    assert "stock fp32" in format_results(res)
