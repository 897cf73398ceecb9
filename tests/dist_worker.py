"""Worker script for tests/test_distributed.py, run under `accelerate launch` (1 or 2 processes).

    accelerate launch tests/dist_worker.py OUT.safetensors WEIGHTS_DIR [train.py overrides ...]

Fits the score statistics (prototypes, Gram sums, z-normalisation moments) of a trained
model (the `best/` folder of a run) on the run's statistics set (real Fashion-MNIST
training images with test transforms) through the production path: `eval_loader`
strided shards + `fit_statistics` with all-reduce. Saves them from the main process.
101 images (an odd count) give the two ranks shards of different sizes (51 / 50).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from safetensors.torch import save_file
from torch.utils.data import Subset

from cssr_dist.cli import config_from_args, parse
from cssr_dist.data.loaders import build_datasets
from cssr_dist.engine.checkpoint import load_weights
from cssr_dist.engine.distributed import eval_loader
from cssr_dist.eval.evaluator import fit_statistics
from cssr_dist.models.osr_model import build_model
from cssr_dist.scoring.statistics import ScoreStatistics

NUM_SAMPLES = 101


def main(out: str, weights: str, overrides: list[str]) -> None:
    cfg = config_from_args(parse(overrides))
    acc = Accelerator(cpu=True)
    bundle = build_datasets(cfg.data, cfg.run.seed)
    model = build_model(cfg.model, bundle.num_classes, cfg.data.in_chans)
    tensors, _ = load_weights(Path(weights))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    model.to(acc.device).eval()
    data = Subset(bundle.train_eval, range(NUM_SAMPLES))
    loader = eval_loader(data, 16, 0, acc.process_index, acc.num_processes)
    with torch.no_grad():
        channels = model(data[0][0][None].to(acc.device)).features.shape[1]
    stats = ScoreStatistics(bundle.num_classes, channels, use_gram=True).to(acc.device)
    fit_statistics(model, loader, stats, cfg.model.head, acc)
    if acc.is_main_process:
        saved = {k: v.detach().cpu().contiguous() for k, v in stats.state_dict().items()}
        saved["world_size"] = torch.tensor([acc.num_processes])
        save_file(saved, out)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
