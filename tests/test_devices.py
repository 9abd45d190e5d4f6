"""`--device`: auto picks what exists; what does not exist is a one-line user error."""

import pytest
import torch

from dist_cache.devices import resolve_device
from dist_cache.errors import UserError


def test_auto_and_cpu():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_refused():
    with pytest.raises(UserError, match="CUDA is not available"):
        resolve_device("cuda:1")


def test_a_bogus_device_is_refused():
    with pytest.raises(UserError, match="not a torch device"):
        resolve_device("gpu0")
