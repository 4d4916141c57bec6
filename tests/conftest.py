import os

import pytest
import torch

from wanvideo.tiny import make_tiny_checkpoint

torch.set_num_threads(min(2, os.cpu_count() or 1))


def relative_error(actual, expected):
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{model_type: (path, config, state_dict)} for t2v, i2v and flf2v tiny models (official keys)."""
    folder = tmp_path_factory.mktemp("tiny")
    return {mt: make_tiny_checkpoint(folder / f"wan_tiny_{mt}.safetensors", mt, seed=i)
            for i, mt in enumerate(("t2v", "i2v", "flf2v"))}
