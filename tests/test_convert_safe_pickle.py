"""torch_pickle: checkpoints load as data without running code from the file, and lazily."""

import argparse
import os
import pickle
import zipfile
from collections import OrderedDict

import ml_dtypes
import numpy as np
import pytest
import torch

from optiml_jax.checkpoints import torch_pickle


class _RunsShellOnLoad:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _RunsEvalOnLoad:
    def __reduce__(self):
        return eval, ("__import__('os').getcwd()",)


class Fake:  # stands for OmegaConf's DictConfig and value nodes: state with "_content" / "_val"
    pass


@pytest.mark.parametrize("payload", ["os.system", "builtins.eval"])
def test_malicious_reduce_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "pwned"
    evil = _RunsShellOnLoad(marker) if payload == "os.system" else _RunsEvalOnLoad()
    path = tmp_path / "evil.pt"
    torch.save({"model": {"w": torch.zeros(2)}, "extra": evil}, path)
    with pytest.raises(torch_pickle.UnsafePickleError, match=r"evil\.pt.*refusing"):
        torch_pickle.load(path)
    assert not marker.exists()
    # The converter's CLI refuses it too, with one line and no output.
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import convert_weights

    assert (
        convert_weights.main(
            ["--input", str(path), "--output", str(tmp_path / "out"), "--config", "125m", "--no-progress"]
        )
        == 2
    )
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unknown_classes_load_as_readable_stubs_and_tensors_stay_lazy(tmp_path):
    node = Fake()
    node.__dict__.update({"_val": 16, "_metadata": None})
    config = Fake()
    config.__dict__.update({"_content": {"decoder_attention_heads": node}, "_parent": None})
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    state = OrderedDict(
        a=torch.randn(3, 4).half(),
        b=torch.nn.Parameter(torch.randn(5)),
        c=base.t(),
        d=torch.randn(2, 3).to(torch.bfloat16),
        e=base[1],
    )
    path = tmp_path / "ok.pt"
    torch.save(
        {
            "model": state,
            "args": argparse.Namespace(decoder_layers=3, arch="opt"),
            "cfg": config,
            "dtype": torch.float16,
            "size": torch.Size([2, 3]),
        },
        path,
    )
    loaded = torch_pickle.load(path)
    assert loaded["args"].decoder_layers == 3  # attribute access on the stub, like a Namespace
    assert torch_pickle.plain(loaded["args"]) == {"decoder_layers": 3, "arch": "opt"}
    assert torch_pickle.plain(loaded["cfg"]) == {"decoder_attention_heads": 16}
    assert loaded["size"] == (2, 3)
    for key, tensor in state.items():
        lazy = loaded["model"][key]
        assert isinstance(lazy, torch_pickle.LazyTensor) and lazy.shape == tuple(tensor.shape)
        expected = tensor.detach()
        if expected.dtype == torch.bfloat16:
            np.testing.assert_array_equal(
                lazy.numpy(), expected.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
            )
        else:
            np.testing.assert_array_equal(lazy.numpy(), expected.numpy())


def test_truncated_and_corrupted_files_name_the_file(tmp_path):
    path = tmp_path / "w.pt"
    torch.save({"model": {"w": torch.randn(1000)}}, path)
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(torch_pickle.TorchFileError, match=r"cut\.pt"):
        torch_pickle.load(tmp_path / "cut.pt")
    (tmp_path / "junk.pt").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(torch_pickle.TorchFileError, match=r"junk\.pt.*not a PyTorch zip"):
        torch_pickle.load(tmp_path / "junk.pt")
    # A damaged pickle inside a valid archive.
    with zipfile.ZipFile(path) as archive:
        entries = {i.filename: archive.read(i.filename) for i in archive.infolist()}
    pkl = next(name for name in entries if name.endswith("data.pkl"))
    entries[pkl] = pickle.dumps({"model": 1})[:-3] + b"\xff\xfe"
    with zipfile.ZipFile(tmp_path / "badpkl.pt", "w", zipfile.ZIP_STORED) as archive:
        for name, content in entries.items():
            archive.writestr(name, content)
    with pytest.raises(torch_pickle.TorchFileError, match=r"badpkl\.pt.*corrupted"):
        torch_pickle.load(tmp_path / "badpkl.pt")
