r"""Quality of the diffusion generator against CPU training minutes (issue 15).

Two sub-commands, so training (long, in the background) and evaluation (short, repeatable with
other samplers) can be run separately:

``train``: trains the project's ``DiffusionModule`` (``tasks.diffusion.train.build_module``,
the same Lightning set-up as the stage: EMA, bf16 where the CPU has it, gradient clipping) on a
processed dataset and saves the EMA weights at given steps as ``snap-<step>.pt`` together with
the wall-clock seconds of training so far, so one run gives several points of the curve (use
``--set diffusion.min_lr_ratio=1.0``: with a constant learning rate a snapshot is also the end of
a shorter run).

``fidelity``: amyloidosis train-on-synthetic / test-on-real of one snapshot (60 Perugini 0,
30 Perugini 2, 30 Perugini 3 images; the audit's TSTR classifier).

``contrast``: does contrastive guidance (the opposite metastasis value, instead of the null
condition, as the guidance's unconditional branch) make the trained model's metastasis-free
scans cleaner? Scores both samplings with the audit's label-consistency classifier.

``eval``: for each snapshot, samples a class-matched synthetic set (conditions drawn from the
real training split's label mix) with the given sampler and scores it with the audit's own
metrics (``tasks.audit``: in-domain encoder, FID, precision / recall / coverage, feature
two-sample AUC, each beside the real held-out reference), plus a montage PNG. The encoder is
trained once per processed dataset and cached, so every snapshot and sampler is judged by the
same features.

Usage::

    python benchmarks/probe_generator.py train --params params.yaml --out runs/a \\
        --snapshots 500,1000,2000 --set diffusion.max_steps=2000 ...
    python benchmarks/probe_generator.py eval --params params.yaml --run runs/a \\
        --images 300 --steps 50 --guidance 1.5
    python benchmarks/probe_generator.py contrast --params params.yaml --images 48
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch

from models.callbacks import WarmupEMA
from models.conditioning import ConditionSpec
from models.data import DiffusionDataModule, read_manifest
from models.diffusion import DiffusionModule
from models.sampling import sample
from tasks.audit.data import open_processed
from tasks.audit.encoder import embed, train_encoder
from tasks.audit.quality import feature_metrics
from tasks.common.precision import auto_precision
from tasks.config import Config, load_config
from tasks.diffusion.train import build_module


class Snapshots(L.Callback):
    """Save the EMA weights and the training seconds at the given global steps."""

    def __init__(self, out: Path, steps: set[int], ema: WarmupEMA,
                 offset: tuple[int, float] = (0, 0.0)) -> None:
        self.out, self.steps, self.ema = out, steps, ema
        self.offset_step, self.offset_seconds = offset
        self.started = 0.0
        self.records: list[dict[str, float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the clock."""
        self.started = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Print progress; save a snapshot at the chosen steps."""
        step = trainer.global_step + self.offset_step
        if step % 50 == 0:
            loss = float(outputs["loss"]) if isinstance(outputs, dict) else float(outputs)
            print(f"step {step} loss {loss:.4f} t {time.perf_counter() - self.started:.0f}s",
                  flush=True)
        if step not in self.steps:
            return
        seconds = time.perf_counter() - self.started + self.offset_seconds
        avg = self.ema._average_model  # noqa: SLF001 - the EMA copy Lightning keeps
        state = {k[7:]: v.detach().cpu().clone() for k, v in avg.state_dict().items()
                 if k.startswith("module.")}
        torch.save({"hparams": dict(pl_module.hparams), "state_dict": state, "step": step,
                    "seconds": seconds, "continued_from_step": self.offset_step or None},
                   self.out / f"snap-{step}.pt")
        self.records.append({"step": step, "seconds": seconds})
        with (self.out / "snapshots.jsonl").open("a") as fh:
            fh.write(json.dumps(self.records[-1]) + "\n")
        print(f"snapshot {step} at {seconds:.0f} s", flush=True)


class OversampledData(DiffusionDataModule):
    """The stage's data module with the metastatic training images repeated ``copies`` times.

    An experiment, not a stage setting (yet): does the generator render focal lesions better
    when they make up half the batches instead of a fifth?
    """

    def __init__(self, *args: Any, copies: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.copies = copies

    def setup(self, stage: str | None = None) -> None:
        """Open the splits, then append the metastatic images' copies to the training set."""
        super().setup(stage)
        assert self.train_set is not None
        rows = read_manifest(self.root)
        rows = rows[rows["split"] == self.train_split].sort_values("index")  # dataset order
        positive = np.flatnonzero(rows["metastasis"].to_numpy(dtype=bool))
        extra = [torch.utils.data.Subset(self.train_set, positive.tolist())] * self.copies
        self.train_set = torch.utils.data.ConcatDataset([self.train_set, *extra])


def train(cfg: Config, out: Path, snapshots: set[int], init: Path | None = None,
          oversample_metastasis: int = 0) -> None:
    """Train as the stage does and save EMA snapshots (see module docstring).

    ``init``: continue from a snapshot's EMA weights (fresh optimiser, re-warmed); its step and
    seconds are added to the new ones, and the snapshot files say so.
    ``oversample_metastasis``: extra copies of each metastatic training image (0: none).
    """
    d = cfg.diffusion
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(cfg.model_dump_json(indent=1))
    L.seed_everything(d.seed, workers=True)
    processed = Path(cfg.ingest.output)
    spec = ConditionSpec.from_manifest(read_manifest(processed), d.conditions)
    if oversample_metastasis:
        data = OversampledData(processed, spec, (d.image_rows, d.image_cols), d.batch_size,
                               d.num_workers, d.augment, copies=oversample_metastasis)
    else:
        data = DiffusionDataModule(processed, spec, (d.image_rows, d.image_cols), d.batch_size,
                                   d.num_workers, d.augment)
    module = build_module(d, spec)
    offset = (0, 0.0)
    if init is not None:
        start = torch.load(init, weights_only=False)
        module.load_state_dict(start["state_dict"])
        offset = (int(start["step"]), float(start["seconds"]))
    ema = WarmupEMA(decay=d.ema_decay)
    trainer = L.Trainer(accelerator="cpu", devices=1, precision=auto_precision(d.precision, "cpu"),
                        max_steps=d.max_steps - offset[0],
                        gradient_clip_val=d.gradient_clip_val or None,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[ema, Snapshots(out, snapshots, ema, offset)],
                        enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=data)


def sample_batches(module: DiffusionModule, cond: torch.Tensor, steps: int, guidance: float,
                   size: tuple[int, int], *, eta: float = 0.0, bf16: bool = False,
                   null_cond: list[int] | None = None, batch: int = 12) -> torch.Tensor:
    """DDIM samples of ``module``, one per row of ``cond``, seeds 0, 1, ... in batches.

    Why one helper: every probe must sample as the synthesize stage does (same seeds per
    image, guidance, intensity transform and noise schedule), so that two probes of one
    snapshot compare settings, not sampling code. ``null_cond``: the guidance's
    unconditional branch (default: the null condition of every factor).
    """
    null = module.spec.null_indices if null_cond is None else null_cond
    parts = [sample(module.unet, "ddim", steps, cond[i:i + batch], guidance,
                    list(range(i, min(i + batch, len(cond)))), (2, *size), "cpu",
                    null_cond=null, eta=eta,
                    autocast_dtype=torch.bfloat16 if bf16 else None,
                    intensity=module.intensity, **module.noise_schedule)
             for i in range(0, len(cond), batch)]
    return torch.cat(parts).float()


def _encoder_features(cfg: Config, size: tuple[int, int], cache: Path
                      ) -> tuple[Any, dict[str, np.ndarray], pd.DataFrame]:
    real = open_processed(Path(cfg.ingest.output))
    split = real.manifest["split"].astype(str).to_numpy()
    train_mask, held_mask = split == "train", np.isin(split, ("val", "test"))
    train_imgs, held_imgs = real.load(train_mask, size), real.load(held_mask, size)
    tm = real.manifest[train_mask].reset_index(drop=True)
    torch.manual_seed(0)
    if cache.is_file():
        encoder = torch.load(cache, weights_only=False)
    else:
        encoder, _ = train_encoder(train_imgs, tm["perugini_grade"].to_numpy(),
                                   tm["metastasis"].to_numpy(dtype=bool), cfg.audit.encoder,
                                   torch.device("cpu"))
        torch.save(encoder, cache)
    feats = {"train": embed(encoder, train_imgs), "heldout": embed(encoder, held_imgs)}
    return encoder, feats, tm


def evaluate(cfg: Config, run: Path, images: int, steps: int, guidance: float, eta: float,
             only: list[int] | None, precision: str = "auto") -> list[dict[str, Any]]:
    """Sample and score every snapshot of ``run``; results appended to ``run/eval.jsonl``."""
    from tasks.common.montage import write_montage

    snaps = sorted(run.glob("snap-*.pt"), key=lambda p: int(p.stem.split("-")[1]))
    if only:
        snaps = [s for s in snaps if int(s.stem.split("-")[1]) in only]
    payload = torch.load(snaps[0], weights_only=False)
    hp = payload["hparams"]
    size = (cfg.diffusion.image_rows, cfg.diffusion.image_cols)
    encoder, feats, tm = _encoder_features(cfg, size, run.parent / f"encoder-{size[0]}.pt")
    mean, std = feats["train"].mean(0), feats["train"].std(0) + 1e-8
    z = {k: (v - mean) / std for k, v in feats.items()}
    spec = ConditionSpec.from_dict(hp["spec"])
    rng = np.random.default_rng(7)
    rows = tm.iloc[rng.integers(0, len(tm), images)]
    cond = torch.as_tensor(spec.encode(rows), dtype=torch.long)
    results = []
    for snap in snaps:
        payload = torch.load(snap, weights_only=False)
        module = DiffusionModule(**payload["hparams"])
        module.load_state_dict(payload["state_dict"])
        module.eval()
        started = time.perf_counter()
        bf16 = auto_precision(precision, "cpu") == "bf16-mixed"
        syn = sample_batches(module, cond, steps, guidance, size, eta=eta, bf16=bf16)
        sample_s = time.perf_counter() - started
        fs = (embed(encoder, syn) - mean) / std
        m = feature_metrics(z["train"], fs, cfg.audit.nearest_k, 5, 1)
        ref = feature_metrics(z["train"], z["heldout"][:images], cfg.audit.nearest_k, 5, 1)
        tag = f"{snap.stem}-ddim{steps}-g{guidance}-eta{eta}" + ("" if bf16 else "-fp32")
        np.save(run / f"samples-{tag}.npy", syn.numpy().astype(np.float16))
        shown = pd.DataFrame({"index": np.arange(images), "split": "synthetic",
                              "perugini_grade": rows["perugini_grade"].to_numpy(),
                              "metastasis": rows["metastasis"].to_numpy(),
                              "amyloid": rows["perugini_grade"].to_numpy() > 0})
        shown["group"] = [f"P{g}{' met' if m else ''}" for g, m in
                          zip(shown["perugini_grade"], shown["metastasis"], strict=True)]
        shown = shown.sort_values("group", kind="stable")
        write_montage(syn.numpy(), shown, run / f"montage-{tag}.png", per_site=8, by="group",
                      title=f"{tag}: synthetic, class-matched conditions")
        result = {"snapshot": snap.name, "step": payload["step"],
                  "train_seconds": payload["seconds"], "images": images, "ddim_steps": steps,
                  "guidance": guidance, "eta": eta, "bf16": bf16, "sample_seconds": sample_s,
                  **{k: m[k] for k in ("fid", "precision", "recall", "coverage",
                                       "two_sample_auc")},
                  "reference": {k: ref[k] for k in ("fid", "precision", "recall",
                                                    "two_sample_auc")}}
        print(json.dumps(result), flush=True)
        with (run / "eval.jsonl").open("a") as fh:
            fh.write(json.dumps(result) + "\n")
        results.append(result)
    return results


def soft_tissue_grain(images: np.ndarray) -> float:
    """Mean relative high-frequency residual in soft tissue, over images and views.

    The residual is the image minus its 3x3 median; soft tissue is where the median lies
    between 2 % and 12 % of the view's maximum (above the background, below bone). Real
    processed scans at 128 x 32 are nearly noise-free there (about 0.12 on the study data),
    so a sampler that leaves grain shows up as a larger value. Why: focal lesions are a few
    pixels across, and grain of their size is what a lesion classifier has to see through.
    """
    from scipy import ndimage

    values = []
    for view in np.asarray(images, dtype=np.float32).reshape(-1, *images.shape[-2:]):
        smooth = ndimage.median_filter(view, 3)
        soft = (smooth > 0.02 * view.max()) & (smooth < 0.12 * view.max())
        if soft.any():
            values.append(float(np.abs(view - smooth)[soft].mean() / smooth[soft].mean()))
    return float(np.mean(values))


def fidelity(cfg: Config, snap: Path, guidance: float, steps: int,
             task: str = "amyloidosis", per_class: int = 60, eta: float = 0.0,
             grain_only: bool = False) -> dict[str, Any]:
    """TSTR / TRTR of one snapshot for one task (the audit's ``tstr_task``).

    Amyloidosis: ``per_class`` Perugini-0 images and half as many each of Perugini 2 and 3 (no
    metastasis). Metastasis: ``per_class`` images without and ``per_class`` with metastases
    (Perugini 0). Trains the audit's TSTR classifier on them and the same classifier on as
    many real training images with the same positive share, both scored on the real
    validation split. Why a probe: guidance and sampler steps are chosen on internal data
    through the audit's own measure, one cheap sample per setting, before a full synthesis.
    """
    from tasks.audit.tstr import tstr_task

    payload = torch.load(snap, weights_only=False)
    module = DiffusionModule(**payload["hparams"])
    module.load_state_dict(payload["state_dict"])
    module.eval()
    size = (cfg.diffusion.image_rows, cfg.diffusion.image_cols)
    if task == "amyloidosis":
        grades = np.array([0] * per_class + [2] * (per_class // 2) + [3] * (per_class // 2))
        mets = np.zeros(len(grades), dtype=bool)
        labels = (grades >= 2).astype(int)
    else:
        mets = np.array([False] * per_class + [True] * per_class)
        grades = np.zeros(len(mets), dtype=int)
        labels = mets.astype(int)
    cond = torch.as_tensor(module.spec.encode(pd.DataFrame({"perugini_grade": grades,
                                                            "metastasis": mets})))
    bf16 = auto_precision("auto", "cpu") == "bf16-mixed"
    syn = sample_batches(module, cond, steps, guidance, size, eta=eta, bf16=bf16)
    real = open_processed(Path(cfg.ingest.output))
    split = real.manifest["split"].astype(str).to_numpy()
    def real_labels(name: str) -> np.ndarray:
        rows = real.manifest.loc[split == name]
        if task == "amyloidosis":
            return (rows["perugini_grade"].to_numpy() >= 2).astype(int)
        return rows["metastasis"].to_numpy(dtype=bool).astype(int)

    grain = {"grain_synthetic": soft_tissue_grain(syn.numpy()),
             "grain_real_val": soft_tissue_grain(real.load(split == "val", size).numpy())}
    if grain_only:
        result = {"snapshot": snap.name, "task": task, "guidance": guidance,
                  "ddim_steps": steps, "eta": eta, "images": len(grades), **grain}
        print(json.dumps(result), flush=True)
        return result
    positive = {name: real_labels(name) for name in ("train", "val")}
    entry = tstr_task(syn, labels, real.load(split == "train", size),
                      positive["train"], real.load(split == "val", size), positive["val"],
                      cfg.audit.tstr.model_copy(update={"steps": 500}), 17, torch.device("cpu"))
    result = {"snapshot": snap.name, "task": task, "guidance": guidance, "ddim_steps": steps,
              "eta": eta, **grain,
              **{k: entry[k] for k in ("auc_synthetic", "auc_real", "ratio",
                                       "positives_synthetic", "positives_real", "n_val",
                                       "positives_val")}}
    print(json.dumps(result), flush=True)
    return result


def contrast(cfg: Config, images: int, guidance: float, steps: int) -> list[dict[str, Any]]:
    """Share of label-consistent images with plain and with contrastive guidance.

    Plain: ``eps_null + s (eps_cond - eps_null)``. Contrastive: the unconditional branch asks
    for the opposite metastasis value (other factors null), ``eps_anti + s (eps_cond -
    eps_anti)``, meant to push a metastasis-free scan away from lesions. ``images`` Perugini-0,
    non-superscan images per metastasis value and rule, seeds 0.. (the same starting noise for
    both rules); scored by the audit's label-consistency classifier (``audit.consistency``:
    trained on the real training split, thresholds from the real validation split).
    """
    from tasks.artifacts.diffusion_model import load_trained
    from tasks.audit.consistency import thresholds
    from tasks.audit.tstr import TASKS, score, train_classifier

    module, size = load_trained(Path(cfg.diffusion.output))
    spec = module.spec
    real = open_processed(Path(cfg.ingest.output))
    split = real.manifest["split"].astype(str).to_numpy()
    y = TASKS["metastasis"](real.manifest)
    check = cfg.audit.consistency
    clf = train_classifier(real.load(split == "train", size), y[split == "train"],
                           cfg.audit.tstr.model_copy(update={
                               "steps": check.steps or 1500, "batch_size": check.batch_size,
                               "lr": check.lr, "seed": check.seed}), torch.device("cpu"))
    low, high = thresholds(score(clf, real.load(split == "val", size)), y[split == "val"],
                           check.quantile)

    def indices(**values: Any) -> list[int]:
        return [f.index_of(values[f.name]) if f.name in values else f.null_index
                for f in spec.factors]

    results = []
    for met in (False, True):
        cond = {"perugini_grade": 0, "metastasis": met}
        if "superscan" in spec.names:
            cond["superscan"] = False
        for rule, uncond in (("plain", spec.null_indices),
                             ("contrastive", indices(metastasis=not met))):
            start = time.time()
            syn = sample_batches(module, torch.tensor([indices(**cond)] * images), steps,
                                 guidance, size, null_cond=uncond)
            scores = score(clf, syn)
            consistent = scores >= low if met else scores <= high
            result = {"metastasis": met, "guidance_rule": rule, "guidance": guidance,
                      "ddim_steps": steps, "images": images,
                      "consistent": round(float(consistent.mean()), 3),
                      "mean_score": round(float(scores.mean()), 3),
                      "seconds": round(time.time() - start, 1)}
            print(json.dumps(result), flush=True)
            results.append(result)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train")
    e = sub.add_parser("eval")
    f = sub.add_parser("fidelity")
    c = sub.add_parser("contrast")
    c.add_argument("--images", type=int, default=48)
    c.add_argument("--guidance", type=float, default=2.0)
    c.add_argument("--steps", type=int, default=25)
    f.add_argument("--snapshot", type=Path, required=True)
    f.add_argument("--guidance", type=float, default=2.0)
    f.add_argument("--steps", type=int, default=25)
    f.add_argument("--task", default="amyloidosis", choices=["amyloidosis", "metastasis"])
    f.add_argument("--per-class", type=int, default=60)
    f.add_argument("--eta", type=float, default=0.0,
                   help="DDIM eta: 0 deterministic, 1 stochastic (less grain, RESULTS.md)")
    f.add_argument("--grain-only", action="store_true",
                   help="only sample and measure soft-tissue grain (no TSTR classifiers)")
    for p in (t, e, f, c):
        p.add_argument("--params", type=Path, default=Path("params.yaml"))
        p.add_argument("--set", dest="overrides", action="append", default=[])
    t.add_argument("--out", type=Path, required=True)
    t.add_argument("--snapshots", default="500,1000,2000")
    t.add_argument("--init", type=Path, default=None)
    t.add_argument("--oversample-metastasis", type=int, default=0,
                   help="extra copies of each metastatic training image")
    e.add_argument("--run", type=Path, required=True)
    e.add_argument("--images", type=int, default=300)
    e.add_argument("--steps", type=int, default=50)
    e.add_argument("--guidance", type=float, default=1.5)
    e.add_argument("--eta", type=float, default=0.0)
    e.add_argument("--only", default="")
    e.add_argument("--precision", default="auto", choices=["auto", "32-true", "bf16-mixed"])
    args = parser.parse_args()
    if args.command == "contrast":
        contrast(load_config(args.params, args.overrides), args.images, args.guidance,
                 args.steps)
    elif args.command == "fidelity":
        fidelity(load_config(args.params, args.overrides), args.snapshot, args.guidance,
                 args.steps, args.task, args.per_class, args.eta, args.grain_only)
    elif args.command == "train":
        cfg = load_config(args.params, args.overrides)
        train(cfg, args.out, {int(s) for s in args.snapshots.split(",")}, args.init,
              args.oversample_metastasis)
    else:
        saved = json.loads((args.run / "config.json").read_text())
        overrides = [f"diffusion.image_rows={saved['diffusion']['image_rows']}",
                     f"diffusion.image_cols={saved['diffusion']['image_cols']}", *args.overrides]
        cfg = load_config(args.params, overrides)
        only = [int(s) for s in args.only.split(",") if s]
        evaluate(cfg, args.run, args.images, args.steps, args.guidance, args.eta, only,
                 args.precision)


if __name__ == "__main__":
    main()
