"""Comparisons and probes shared by the NDIF tests."""

import math

import torch

PROMPT = "The capital of France is"


def assert_identical(remote, local, where="lens"):
    """Equal structure, equal values, tensors bit for bit (same dtype and shape; NaN where NaN)."""
    if isinstance(local, torch.Tensor):
        assert isinstance(remote, torch.Tensor), where
        assert remote.dtype == local.dtype and remote.shape == local.shape, where
        assert torch.equal(remote.isnan(), local.isnan()) if local.is_floating_point() else True, where
        if local.is_floating_point():
            same = torch.equal(remote.nan_to_num(0.0), local.nan_to_num(0.0))
        else:
            same = torch.equal(remote, local)
        assert same, f"{where}: largest difference {(remote.double() - local.double()).abs().nan_to_num(0).max()}"
    elif isinstance(local, dict):
        assert isinstance(remote, dict) and remote.keys() == local.keys(), where
        for key in local:
            assert_identical(remote[key], local[key], f"{where}[{key!r}]")
    elif isinstance(local, (list, tuple)):
        assert type(remote) is type(local) and len(remote) == len(local), where
        for i, (r, l) in enumerate(zip(remote, local)):
            assert_identical(r, l, f"{where}[{i}]")
    elif isinstance(local, float) and math.isnan(local):
        assert math.isnan(remote), where
    else:
        assert remote == local, f"{where}: {remote!r} != {local!r}"
