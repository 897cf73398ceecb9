"""Nothing unpickled, nothing executed, in every reader (issue 20).

The audit of docs/reliability.md ("Readers") as tests: a crafted CIFAR batch (the one data
root format that is a pickle) runs nothing, and the source tree holds no reader that could
(bare pickle.load, torch.load without weights_only, np.load with allow_pickle, yaml.load,
eval/exec, shell=True). Before issue 20 `data/sources.py` read CIFAR with a bare
`pickle.load`: the crafted batch below created its marker file.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest

from cssr_dist.data.sources import build_source
from cssr_dist.errors import DataError
from tests.conftest import write_cifar
from tests.helpers import ROOT


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_crafted_cifar_batch_runs_nothing(tmp_path):
    folder = write_cifar(tmp_path)
    marker = tmp_path / "MARKER"
    with open(folder / "data_batch_3", "wb") as fh:
        pickle.dump({"data": _Payload(marker), "labels": [0]}, fh)
    with pytest.raises(DataError, match=r"data_batch_3 is not a plain CIFAR batch \(UnpicklingError: names "
                                        r"(posix|os)\.system\)"):
        build_source("cifar10", str(tmp_path), train=True)
    assert not marker.exists()


def test_real_cifar_batches_still_load_at_every_protocol(tmp_path):
    folder = write_cifar(tmp_path)
    for protocol in (2, 4, 5):
        batch = pickle.loads((folder / "data_batch_1").read_bytes())
        (folder / "data_batch_1").write_bytes(pickle.dumps(batch, protocol=protocol))
        source = build_source("cifar10", str(tmp_path), train=True)
        assert len(source.targets) == 100 and source.classes[0] == "c10_0"


def test_a_crafted_weight_file_runs_nothing(tmp_path):
    """model.pretrained_file / tools/convert_weights.py: a .pth whose pickle names os.system."""
    import torch

    from cssr_dist.models.pretrained import read_state_dict

    marker = tmp_path / "MARKER"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Payload(marker)}, tmp_path / "w.pth")
    with pytest.raises(DataError, match=r"cannot read weights from .*w.pth: UnpicklingError"):
        read_state_dict(tmp_path / "w.pth")
    assert not marker.exists()
    (tmp_path / "w.safetensors").write_bytes((tmp_path / "w.pth").read_bytes())  # a pickle in disguise
    with pytest.raises(DataError, match="cannot read weights"):
        read_state_dict(tmp_path / "w.safetensors")
    assert not marker.exists()


# (pattern, what it means, allowed lines as "path: text" substrings)
FORBIDDEN = [
    (r"\bpickle\.loads?\(", "a bare unpickle", []),
    (r"\btorch\.load\((?![^)]*weights_only=True)", "torch.load without weights_only=True", []),
    (r"allow_pickle\s*=\s*True", "np.load with pickles", []),
    (r"\byaml\.(load|unsafe_load|full_load)\(", "yaml that can build objects", []),
    (r"(?<![\w.])(eval|exec)\(", "eval/exec", []),
    (r"shell\s*=\s*True", "a shell", []),
    (r"\bos\.system\(|\bos\.popen\(", "a shell", []),
]


def test_no_reader_in_the_source_tree_can_unpickle_or_execute():
    files = [*ROOT.joinpath("cssr_dist").rglob("*.py"), *ROOT.joinpath("tools").rglob("*.py"),
             *ROOT.joinpath("launchers").rglob("*.py"), ROOT / "train.py"]
    found = []
    for path in files:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if code.strip().startswith(('"', "'")) or not code.strip():
                continue
            for pattern, what, allowed in FORBIDDEN:
                if re.search(pattern, code) and not any(a in f"{path.name}: {code}" for a in allowed):
                    found.append(f"{path.relative_to(ROOT)}:{number}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


def test_the_audit_sees_what_it_looks_for(tmp_path):
    """Control: the patterns match the calls they forbid (else the audit above could not fail)."""
    lines = ["x = pickle.load(fh)", "torch.load(p)", "np.load(p, allow_pickle=True)", "yaml.load(t)",
             "eval(s)", "subprocess.run(c, shell=True)", "os.system(c)"]
    assert all(any(re.search(p, line) for p, _, _ in FORBIDDEN) for line in lines)
    assert not any(re.search(p, "torch.load(p, map_location='cpu', weights_only=True)") for p, _, _ in FORBIDDEN)
    assert not any(re.search(p, "model.eval()") for p, _, _ in FORBIDDEN)
