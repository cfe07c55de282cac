"""MemRec at MLPerf DLRMv2 CriteoTB scale: >= 1000x and a DLRM_DCN training step under 8 GiB RSS."""
import json
import math
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_memrec_criteotb_dlrm_dcn_step_fits(tmp_path):
    out = tmp_path / "r.json"
    # own process, so ru_maxrss is this model's peak, not the test runner's
    subprocess.run([sys.executable, os.path.join(ROOT, "examples", "memrec_criteotb.py"), "--steps", "2",
                    "--batch-size", "512", "--out", str(out)], check=True, cwd=ROOT, capture_output=True)
    r = json.loads(out.read_text())
    assert r["uncompressed_bytes"] == 204_184_588 * 128 * 4
    assert r["ratio"] >= 1000
    assert r["peak_rss_gib"] < 8.0
    assert len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
