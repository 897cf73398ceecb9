"""User programs, each behind a console script (setup.cfg) and a thin `tools/*.py` wrapper.

| module | console script | what it does |
|---|---|---|
| `make_shards/` | `cssr-make-shards` | raw data set -> WebDataset shards + index (offline) |
| `predict.py` | `cssr-predict` | a trained run applied to new images |
| `collect.py` (+ `results.py`) | `cssr-collect` | tables over methods x data sets x splits |
| `sweep.py` | `cssr-sweep` | a grid of runs, locally or as Slurm jobs |
| `reevaluate.py` | `cssr-reevaluate` | a finished run's saved scores under the other protocol |
| `convert_weights.py` | `cssr-convert-weights` | reference checkpoints -> safetensors backbones |

Training itself is `cssr-train` (cssr_dist/cli.py). Apps sit on top: they import the
package's layers, and no layer imports them.
"""
