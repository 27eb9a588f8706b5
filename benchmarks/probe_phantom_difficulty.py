"""How hard is the demo data? A linear probe per task, trained on the internal site.

Why: the downstream experiment (issue 4) needs findings that are neither invisible nor
trivial, and external sites that are measurably harder than the internal test. A logistic
regression on 4x-pooled processed images is a cheap lower bound on what a CNN will reach:
if it is already ~1.0 everywhere, the phantom is too easy; if it is 0.5, either the finding
is focal (a linear model cannot find a lesion that moves) or too faint.

Usage:
    python benchmarks/probe_phantom_difficulty.py [--processed data/processed]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from tasks.artifacts.dataset import open_images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    manifest = pd.read_parquet(args.processed / "manifest.parquet")
    images = open_images(args.processed)
    pooled = torch.nn.functional.avg_pool2d(torch.from_numpy(np.asarray(images, np.float32)), 4)
    x = pooled.reshape(len(manifest), -1).numpy()
    rng = np.random.default_rng(args.seed)
    internal = manifest.loc[manifest.split == "train", "site"].iloc[0]
    sites = [internal] + sorted(set(manifest.site) - {internal})
    train = np.where(manifest.split == "train")[0]
    print("| task | training set | " + " | ".join(sites) + " |")
    print("|---|---|" + "---|" * len(sites))
    for task in ("amyloid", "metastasis"):
        y = manifest[task].to_numpy().astype(int)
        for fraction in (1.0, 0.1):
            idx = train if fraction == 1.0 else rng.choice(train, int(len(train) * fraction),
                                                            replace=False)
            clf = LogisticRegression(C=0.05, max_iter=2000).fit(x[idx], y[idx])
            cells = []
            for site in sites:
                held = np.where((manifest.site == site)
                                & manifest.split.isin(["test", "external"]))[0]
                auc = (roc_auc_score(y[held], clf.predict_proba(x[held])[:, 1])
                       if len(set(y[held])) > 1 else float("nan"))
                cells.append(f"{auc:.2f}")
            print(f"| {task} | {fraction:.0%} of train (n={len(idx)}) | " + " | ".join(cells)
                  + " |")


if __name__ == "__main__":
    main()
