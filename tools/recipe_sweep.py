"""Recipe sweep for the built-in Fashion-MNIST experiment: many (recipe, seed) runs, tensors in memory.

Why it exists: the default experiment's AUROC moves by several points between seeds, so a
recipe is only worth choosing if it wins on average over seeds. One real run takes ~10 min
on the 2-core dev CPU; this sweep keeps the images as tensors on the device, augments them
there (flip, 12.5% reflect-pad crop, cutout, manual contrast: the transforms the real
pipeline also offers) and runs several worker processes side by side, so a lent GPU
covers dozens of runs in a few minutes. It uses the project's own model, loss, optimizer,
schedule, statistics, scores and metrics, so only the data path differs from `train.py`
(which is what the chosen recipe is then confirmed with).

    python tools/recipe_sweep.py --npz fmnist.npz --out runs/sweep --workers 8 --budget-s 200
    python tools/recipe_sweep.py --out runs/sweep --device cpu --workers 1 --only base --seeds 0 --epochs-scale 0.05

Writes sweep.jsonl (one line per run) and sweep.md (mean / min per recipe over seeds).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KNOWN, MEAN, STD = 6, 0.286, 0.353
SCORES = ("integrated", "s0", "s1", "s2", "msp", "mls", "energy")


@dataclass(frozen=True)
class Recipe:
    name: str
    overrides: tuple[str, ...] = ()
    epochs: float = 8
    crop: bool = True
    flip: bool = True
    cutout: bool = False
    contrast: bool = False
    batch: int = 128


RECIPES = [
    Recipe("base"),
    Recipe("contrast", contrast=True),
    Recipe("cutout", cutout=True),
    Recipe("cutout_contrast", cutout=True, contrast=True),
    Recipe("ep6", epochs=6),
    Recipe("ep12", epochs=12),
    Recipe("latent16", ("model.latent_dim=16",)),
    Recipe("gamma0.05", ("model.gamma=0.05",)),
    Recipe("gamma0.2", ("model.gamma=0.2",)),
    Recipe("lr0.05", ("optim.lr=0.05",)),
    Recipe("noaug", crop=False, flip=False),
    Recipe("wd1e-3", ("optim.weight_decay=0.001",)),
    Recipe("cutout_ep12", epochs=12, cutout=True),
    Recipe("bs64", batch=64),
    Recipe("contrast_ep12", epochs=12, contrast=True),
    Recipe("cutout_latent16", ("model.latent_dim=16",), cutout=True),
    Recipe("ep10", epochs=10),
    Recipe("cutout_ep10", epochs=10, cutout=True),
    Recipe("cutout_contrast_ep10", epochs=10, cutout=True, contrast=True),
    Recipe("cutout_contrast_ep12", epochs=12, cutout=True, contrast=True),
    Recipe("cutout_ep16", epochs=16, cutout=True),
    Recipe("cutout_contrast_ep16", epochs=16, cutout=True, contrast=True),
    Recipe("cutout_wd1e-3_ep12", ("optim.weight_decay=0.001",), epochs=12, cutout=True),
    Recipe("cutout_contrast_ep14", epochs=14, cutout=True, contrast=True),
    Recipe("cutout_lr0.2_ep12", ("optim.lr=0.2",), epochs=12, cutout=True),
]


def load_arrays(npz: str | None) -> dict[str, np.ndarray]:
    if npz:
        with np.load(npz) as z:
            return {k: z[k] for k in z.files}
    from cssr_dist.data.builtin_data import load_fashion_mnist

    xtr, ytr = load_fashion_mnist("data", True)
    xte, yte = load_fashion_mnist("data", False)
    return dict(xtr=xtr, ytr=ytr, xte=xte, yte=yte)


def to_tensor(x: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(x)).to(device).float().div(255).sub(MEAN).div(STD).unsqueeze(1)


def augment(x: torch.Tensor, r: Recipe, gen: torch.Generator) -> torch.Tensor:
    """Per-sample flip -> reflect-pad crop -> grey cutout -> (normalised) -> manual contrast."""
    b, _, h, w = x.shape
    dev = x.device
    if r.flip:
        x = torch.where(torch.rand(b, 1, 1, 1, generator=gen, device=dev) < 0.5, x.flip(3), x)
    if r.crop:
        pad = int(h * 0.125)
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=dev)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=dev)
        iy = (torch.arange(h, device=dev)[None] + dy[:, None])[:, :, None]
        ix = (torch.arange(w, device=dev)[None] + dx[:, None])[:, None, :]
        x = xp[torch.arange(b, device=dev)[:, None, None], 0, iy, ix].unsqueeze(1)
    if r.cutout:
        size = h // 2
        cy = torch.randint(0, h, (b,), generator=gen, device=dev)[:, None, None]
        cx = torch.randint(0, w, (b,), generator=gen, device=dev)[:, None, None]
        yy = torch.arange(h, device=dev)[None, :, None]
        xx = torch.arange(w, device=dev)[None, None, :]
        box = ((yy - cy).abs() * 2 < size) & ((xx - cx).abs() * 2 < size)
        grey = (127 / 255 - MEAN) / STD
        x = torch.where(box.unsqueeze(1), torch.full_like(x, grey), x)
    if r.contrast:
        x = x * (0.1 + 1.9 * torch.rand(b, 1, 1, 1, generator=gen, device=dev))
    return x


def run_one(r: Recipe, seed: int, data: dict[str, torch.Tensor], device: torch.device, epochs_scale: float) -> dict:
    from accelerate import Accelerator

    from cssr_dist.config import load_config
    from cssr_dist.engine.optim import build_optimizer
    from cssr_dist.engine.schedule import lr_factor_fn
    from cssr_dist.eval import metrics as M
    from cssr_dist.eval.evaluator import fit_statistics, predict
    from cssr_dist.models.losses import build_loss
    from cssr_dist.models.osr_model import build_model
    from cssr_dist.scoring.statistics import ScoreStatistics

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(str(root / "configs/fashion_mnist/rcssr.yaml"), list(r.overrides))
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    xtr, ytr, xval, yval = data["xtr"], data["ytr"], data["xval"], data["yval"]
    model = build_model(cfg.model, KNOWN, 1).to(device)
    loss_fn = build_loss(cfg.model.head)
    steps = len(xtr) // r.batch
    epochs = max(r.epochs * epochs_scale, 1 / steps)
    total = max(int(round(epochs * steps)), 1)
    cfg.schedule.epochs = epochs
    opt = build_optimizer(model.parameters(), cfg.optim, r.batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor_fn(cfg.schedule, steps))
    t0 = time.perf_counter()
    model.train()
    step = 0
    while step < total:
        perm = torch.randperm(len(xtr), generator=gen, device=device)
        for i in range(steps):
            if step >= total:
                break
            b = perm[i * r.batch:(i + 1) * r.batch]
            out = model(augment(xtr[b], r, gen))
            loss = loss_fn(out.logits, ytr[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
    train_s = time.perf_counter() - t0
    model.eval()
    with torch.no_grad():
        channels = model(xtr[:2]).features.shape[1]
    # statistics and scores through the project's own evaluation path, as train.py computes them
    acc = Accelerator(cpu=device.type == "cpu")
    sub = torch.cat([torch.nonzero(ytr == c).flatten()[:2000] for c in range(KNOWN)])
    stats = ScoreStatistics(KNOWN, channels, use_gram=True).to(device)
    fit_statistics(model, batches(xtr[sub], ytr[sub]), stats, cfg.model.head, acc)
    te = predict(model, batches(data["xte"], data["yte"]), stats, cfg.model.head, acc)
    val = predict(model, batches(xval, yval), stats, cfg.model.head, acc)
    kn = te["labels"] < KNOWN
    row = dict(recipe=r.name, seed=seed, epochs=epochs, train_s=round(train_s, 1), steps=total,
               closed_acc=float((te["pred"][kn] == te["labels"][kn]).mean()),
               val_acc=float((val["pred"] == val["labels"]).mean()))
    for k in SCORES:
        if k in te:
            row[k] = round(M.auroc(te[k][kn], te[k][~kn]), 4)
            row[k + "_per_class"] = [round(M.auroc(te[k][kn], te[k][te["labels"] == c]), 3) for c in range(KNOWN, 10)]
    return row


def batches(x: torch.Tensor, y: torch.Tensor, size: int = 1000) -> list[tuple[torch.Tensor, ...]]:
    """(images, labels, ids) batches, the shape the evaluator's loaders yield."""
    ids = torch.arange(len(x), device=x.device)
    return [(x[i:i + size], y[i:i + size], ids[i:i + size]) for i in range(0, len(x), size)]


def prepare(arrays: dict[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
    """Known training images minus a stratified 10% validation slice (as the real pipeline holds out)."""
    from cssr_dist.data.open_set import train_val_split

    ytr = arrays["ytr"].astype(np.int64)
    known = np.nonzero(ytr < KNOWN)[0]
    tr, va = train_val_split(known, ytr, 0.1, seed=0)
    return dict(xtr=to_tensor(arrays["xtr"][tr], device), ytr=torch.from_numpy(ytr[tr]).to(device),
                xval=to_tensor(arrays["xtr"][va], device), yval=torch.from_numpy(ytr[va]).to(device),
                xte=to_tensor(arrays["xte"], device), yte=torch.from_numpy(arrays["yte"].astype(np.int64)).to(device))


def set_up(args: argparse.Namespace) -> tuple[torch.device, dict[str, torch.Tensor]]:
    """Threads, device and the data on it: once per process, shared by all its runs."""
    torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device)
    return device, prepare(load_arrays(args.npz), device)


def worker(rank: int, args: argparse.Namespace, jobs, results) -> None:
    device, data = set_up(args)
    while True:
        job = jobs.get()
        if job is None:
            return
        r, seed = job
        try:
            results.put(run_one(r, seed, data, device, args.epochs_scale))
        except Exception as err:  # noqa: BLE001 - one failed run must not stop the sweep
            results.put(dict(recipe=r.name, seed=seed, error=f"{type(err).__name__}: {err}"))


def record(args: argparse.Namespace, rows: list[dict], row: dict, sink) -> None:
    rows.append(row)
    sink.write(json.dumps(row) + "\n")
    sink.flush()
    print(json.dumps({k: v for k, v in row.items() if not k.endswith("_per_class")}), flush=True)
    (args.out / "sweep.md").write_text(summarise(rows) + "\n")


def run_inline(args: argparse.Namespace, todo: list[tuple[Recipe, int]]) -> list[dict]:
    """One process (CPU, or a smoke run): no worker start-up, no pickling."""
    device, data = set_up(args)
    rows: list[dict] = []
    start = time.perf_counter()
    with (args.out / "sweep.jsonl").open("a") as sink:
        for r, seed in todo:
            if time.perf_counter() - start >= args.budget_s:
                break
            record(args, rows, run_one(r, seed, data, device, args.epochs_scale), sink)
    return rows


def run_in_workers(args: argparse.Namespace, todo: list[tuple[Recipe, int]]) -> list[dict]:
    """`--workers` processes share the device; runs are handed out until the budget is spent."""
    ctx = mp.get_context("spawn")
    jobs, results = ctx.Queue(), ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, args, jobs, results), daemon=True) for i in range(args.workers)]
    for proc in procs:
        proc.start()
    start = time.perf_counter()
    handed, rows = 0, []
    for _ in range(min(args.workers, len(todo))):
        jobs.put(todo[handed])
        handed += 1
    with (args.out / "sweep.jsonl").open("a") as sink:
        while len(rows) < handed:
            record(args, rows, results.get(), sink)
            if handed < len(todo) and time.perf_counter() - start < args.budget_s:
                jobs.put(todo[handed])
                handed += 1
    for _ in procs:
        jobs.put(None)
    for proc in procs:
        proc.join(timeout=30)
    return rows


def summarise(rows: list[dict]) -> str:
    lines = ["| recipe | runs | acc mean | " + " | ".join(f"{s} mean (min)" for s in SCORES) + " | integrated per class (mean) |",
             "|---" * (len(SCORES) + 4) + "|"]
    by: dict[str, list[dict]] = {}
    for row in rows:
        if "error" not in row:
            by.setdefault(row["recipe"], []).append(row)
    for name, rs in sorted(by.items(), key=lambda kv: -np.mean([r["integrated"] for r in kv[1]])):
        cells = [f"{np.mean([r[s] for r in rs]):.3f} ({min(r[s] for r in rs):.3f})" for s in SCORES]
        per = np.mean([r["integrated_per_class"] for r in rs], axis=0)
        lines.append(f"| {name} | {len(rs)} | {np.mean([r['closed_acc'] for r in rs]):.3f} | " + " | ".join(cells)
                     + " | " + " ".join(f"{p:.2f}" for p in per) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--npz", help="xtr/ytr/xte/yte uint8 arrays (default: the built-in Fashion-MNIST loader)")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/sweep")))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--only", nargs="+", help="recipe names to run (default: all)")
    p.add_argument("--epochs-scale", type=float, default=1.0, help="shrink every recipe's epochs (smoke runs)")
    p.add_argument("--budget-s", type=float, default=1e9, help="stop handing out runs after this many seconds")
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or ()) - {r.name for r in RECIPES})
    if unknown:
        p.error(f"unknown recipe(s) {', '.join(unknown)}; choose from {', '.join(r.name for r in RECIPES)}")
    recipes = [r for r in RECIPES if not args.only or r.name in args.only]
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [(r, s) for s in args.seeds for r in recipes]
    runner = run_inline if args.workers <= 1 else run_in_workers
    rows = runner(args, todo)
    print(summarise(rows))
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
