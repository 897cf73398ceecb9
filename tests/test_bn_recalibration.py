"""BatchNorm recalibration: exact full-data moments, in one process and summed over 2 gloo ranks."""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from cssr_dist.models.bn_recalibration import batchnorm_layers, recalibrate_batchnorm


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.001), nn.ReLU(), nn.Dropout(0.5),
                          nn.Conv2d(4, 5, 1), nn.BatchNorm2d(5, momentum=0.001), nn.Flatten(), nn.LazyLinear(2))
    model(torch.randn(2, 3, 6, 6))  # materialise the lazy layer
    model[1].running_mean.fill_(3.0)  # stale statistics, as after a short run with momentum 0.001
    return model


def _data(n: int = 37) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 6, 6, generator=g) * 2.0 + 0.5


def _batches(x: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x[i:i + size], torch.zeros(len(x[i:i + size]))) for i in range(0, len(x), size)]


def _expected(model: nn.Module, x: torch.Tensor, size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Moments of each BN input over all images, the pass normalising with batch statistics."""
    conv1, conv2 = model[0], model[4]
    first, second = [], []
    with torch.no_grad():
        for xb, _ in _batches(x, size):
            a = conv1(xb).double()
            first.append(a)
            h = torch.relu(nn.functional.batch_norm(a.float(), None, None, model[1].weight, model[1].bias, True))
            second.append(conv2(h).double())
    out = []
    for acts in (first, second):
        flat = torch.cat([a.transpose(0, 1).reshape(a.shape[1], -1) for a in acts], dim=1)
        out.append((flat.mean(1), flat.var(1, unbiased=True)))
    return out


def test_exact_full_data_moments_and_nothing_else_changes():
    model, x = _model(), _data()
    model.train()
    model[3].eval()  # a mixed mode that must come back as it was
    params = {k: v.clone() for k, v in model.state_dict().items()}
    seen = recalibrate_batchnorm(model, _batches(x, 8))  # 8+8+8+8+5: a short last batch
    assert seen == 37
    for bn, (mean, var) in zip(batchnorm_layers(model), _expected(model, x, 8)):
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-5)
        assert bn.momentum == 0.001
    # the first BN sees raw conv outputs: its statistics do not depend on the batching at all
    other = _model()
    recalibrate_batchnorm(other, _batches(x, 5))
    torch.testing.assert_close(other[1].running_mean, model[1].running_mean)
    torch.testing.assert_close(other[1].running_var, model[1].running_var)
    assert model.training and not model[3].training and model[1].training
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, params[k])}
    assert changed == {"1.running_mean", "1.running_var", "5.running_mean", "5.running_var"}
    # max_batches caps the pass
    assert recalibrate_batchnorm(_model(), _batches(x, 8), max_batches=2) == 16


class _Gloo:
    """The Accelerator methods and attributes the function uses, on a real gloo process group."""

    num_processes = 2

    @property
    def process_index(self) -> int:
        return dist.get_rank()

    def unwrap_model(self, model):
        return model

    def reduce(self, tensor, reduction="sum"):
        assert reduction == "sum"
        dist.all_reduce(tensor)
        return tensor


def _worker(rank: int, port: int, result_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model, x = _model(), _data()
    share = x[:20] if rank == 0 else x[20:]  # unequal shares, unequal batch counts
    seen = recalibrate_batchnorm(model, _batches(share, 8), _Gloo())
    torch.save({"seen": seen, "state": {k: v for k, v in model.state_dict().items() if "running" in k}},
               os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process_over_all_images(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert ranks[0]["seen"] == ranks[1]["seen"] == 37
    for key in ranks[0]["state"]:
        torch.testing.assert_close(ranks[0]["state"][key], ranks[1]["state"][key], rtol=0, atol=0)  # identical
    # first BN: exact full-data moments, the same as one process over all 37 images
    single = _model()
    recalibrate_batchnorm(single, _batches(_data(), 8))
    torch.testing.assert_close(ranks[0]["state"]["1.running_mean"], single[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["state"]["1.running_var"], single[1].running_var, rtol=1e-5, atol=1e-6)
    # second BN: exact moments of its input under each rank's own batches (rank 0: 8+8+4, rank 1: 8+8+1)
    model, x = _model(), _data()
    first, second = _expected(model, x[:20], 8), _expected(model, x[20:], 8)
    mean = (first[1][0] * 20 + second[1][0] * 17) / 37  # per-position counts are equal (4x4 maps)
    torch.testing.assert_close(ranks[0]["state"]["5.running_mean"].double(), mean, rtol=1e-5, atol=1e-5)


def _worker_different_stats(rank: int, port: int, result_dir: str) -> None:
    """As after DDP steps: each rank's running statistics are its own."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    torch.set_num_threads(1)
    model, x = _model(), _data()
    for bn in batchnorm_layers(model):
        bn.running_mean.fill_(3.0 if rank == 0 else -40.0)
        bn.running_var.fill_(1.0 if rank == 0 else 9.0)
    share = x[:20] if rank == 0 else x[20:]
    recalibrate_batchnorm(model, _batches(share, 8), _Gloo())
    torch.save({k: v for k, v in model.state_dict().items() if "running" in k}, os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_gloo_ranks_from_different_running_statistics_equal_one_process(tmp_path):
    """Ranks that start from different running statistics (after DDP steps they do) end with
    the exact single-process statistics over the union of their images."""
    mp.spawn(_worker_different_stats, args=(_free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for key in ranks[0]:
        torch.testing.assert_close(ranks[0][key], ranks[1][key], rtol=0, atol=0)  # one result on every rank
    single = _model()
    recalibrate_batchnorm(single, _batches(_data(), 8))  # one process, all 37 images
    torch.testing.assert_close(ranks[0]["1.running_mean"], single[1].running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ranks[0]["1.running_var"], single[1].running_var, rtol=1e-5, atol=1e-6)
    model, x = _model(), _data()
    first, second = _expected(model, x[:20], 8), _expected(model, x[20:], 8)
    mean = (first[1][0] * 20 + second[1][0] * 17) / 37
    torch.testing.assert_close(ranks[0]["5.running_mean"].double(), mean, rtol=1e-5, atol=1e-5)
