"""Iterate checkpoint tensors (safetensors, sharded or not; PyTorch .bin) and dummy init."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator

import torch
from torch import nn


def _safetensors_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        files = [os.path.join(folder, n) for n in names]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"Shards listed in {index} are missing: {missing[:3]}")
        return files
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def iterate_safetensors(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file in _safetensors_files(folder):
        try:
            with safe_open(file, framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                    yield name, f.get_tensor(name)
        except Exception as e:
            if isinstance(e, ValueError) and "checkpoint" in str(e):
                raise
            raise ValueError(f"Cannot read {file}: {e}. Is the file complete?") from e


def iterate_pt(folder: str) -> Iterator[tuple[str, torch.Tensor]]:
    for file in sorted(glob.glob(os.path.join(folder, "*.bin"))):
        state = torch.load(file, map_location="cpu", weights_only=True)
        yield from state.items()


def init_dummy_weights(model: nn.Module, seed: int = 0, scale: float = 1e-3) -> None:
    """Random weights for benchmarks: uniform in [-scale, scale], norms at one."""
    generators: dict[torch.device, torch.Generator] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            module = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            if "norm" in module:
                param.fill_(1.0)
                continue
            gen = generators.get(param.device)
            if gen is None:
                gen = torch.Generator(device=param.device).manual_seed(seed)
                generators[param.device] = gen
            param.uniform_(-scale, scale, generator=gen)
