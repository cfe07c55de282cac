"""Same module on CUDA (skipped without a GPU): outputs equal the CPU module's."""
import copy

import pytest
import torch

from torchrec_compress import CompressedEmbeddingBagCollection
from torchrec_compress.testing.data import random_bags
from torchrec_compress.testing.parity import parity_schemes, parity_tables

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_cuda_forward_backward_matches_cpu():
    torch.manual_seed(0)
    cpu = CompressedEmbeddingBagCollection(copy.deepcopy(parity_tables()), parity_schemes())
    gpu = copy.deepcopy(cpu).to("cuda")
    bags = random_bags(parity_tables(), 16, seed=0)
    a, b = cpu(bags.kjt()).values(), gpu(bags.kjt(torch.device("cuda"))).values()
    torch.testing.assert_close(b.cpu(), a, rtol=1e-5, atol=1e-5)
    a.sum().backward()
    b.sum().backward()
    for (n, p), (_, q) in zip(cpu.named_parameters(), gpu.named_parameters()):
        torch.testing.assert_close(q.grad.cpu(), p.grad, rtol=1e-5, atol=1e-5, msg=n)
