"""Worker script for tests/test_distributed.py, run under `accelerate launch` (1 or 2 processes).

    accelerate launch tests/dist_worker.py OUT.safetensors WEIGHTS_DIR [train.py overrides ...]

Fits the score statistics (prototypes, Gram sums, z-normalisation moments) of a trained
model (the `best/` folder of a run) on the run's statistics set (real Fashion-MNIST
training images with test transforms) through the production path: `eval_loader`
strided shares + `Scorer.fit` with all-reduce. Saves them from the main process.
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
from cssr_dist.data.readers import build_run_data
from cssr_dist.data.readers.native import eval_loader
from cssr_dist.engine.checkpoint import load_weights
from cssr_dist.models.osr_model import build_model
from cssr_dist.scoring.scores import Scorer

NUM_SAMPLES = 101


def main(out: str, weights: str, overrides: list[str]) -> None:
    cfg = config_from_args(parse(overrides))
    acc = Accelerator(cpu=True)
    run_data = build_run_data(cfg.data, cfg.run.seed)  # single-process views; sharded below
    num_classes = run_data.meta.num_classes
    model = build_model(cfg.model, num_classes, cfg.data.in_chans)
    tensors, _ = load_weights(Path(weights))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    model.to(acc.device).eval()
    data = Subset(run_data.train_eval.dataset, range(NUM_SAMPLES))
    loader = eval_loader(data, 16, 0, acc.process_index, acc.num_processes)
    scorer = Scorer(cfg.model.head, num_classes, model.feature_channels(cfg.data.in_chans, cfg.data.image_size),
                    "integrated").to(acc.device)

    def outputs():
        with torch.no_grad():
            for images, _, _ in loader:
                out = model(images.to(acc.device))
                yield out.features, out.logits

    scorer.fit(outputs, lambda t: acc.reduce(t, reduction="sum"))
    stats = scorer.stats
    if acc.is_main_process:
        saved = {k: v.detach().cpu().contiguous() for k, v in stats.state_dict().items()}
        saved["world_size"] = torch.tensor([acc.num_processes])
        save_file(saved, out)
    acc.wait_for_everyone()
    acc.end_training()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
