"""What a Lightning training shows on the console: its progress, and no notices nobody can act on.

Progress: Lightning's default bar is Rich's, and in a pipe (a scheduled run's log, ``synthdx
run`` relaying a stage) Rich draws nothing until training has ended, so a 2,000-step run
printed nothing for its whole life; on a terminal, training measured in steps made it read
"Epoch 7/-2". Here a terminal gets a Rich bar counting steps and a log gets a line every 30 s.

Notices: ``quiet_lightning`` drops, by their exact text, the few Lightning and PyTorch messages
a user of this platform cannot act on (advertising tips, a deprecation inside Lightning, hints
that do not apply to step-based training). Everything else still shows.

Kept apart from ``progress`` so stages that do not train need not import Lightning.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar

from tasks.common.progress import LOG_EVERY_SECONDS, format_duration, on_terminal

UNACTIONABLE_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    # torch 2.13 deprecated LeafSpec(); Lightning 2.6 builds one for every value it logs.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated"),
    # Lightning counts the logging interval in steps across epochs when training is measured
    # in steps, so a short epoch loses no logs (the tiny and demo data have short epochs).
    (UserWarning, r"The number of training batches \(\d+\) is smaller than the logging interval"),
    # The images are memory-mapped (diffusion) or in memory (classifiers): a worker process
    # per core does not speed up reading them, and `*.num_workers` is a parameter anyway.
    (UserWarning, r"The '\w+' does not have many workers which may be a bottleneck"),
)
"""(category, message regex) of the warnings ``quiet_lightning`` ignores."""

UNACTIONABLE_LOG_PREFIXES = ("💡 Tip:",)
"""Start of the Lightning log messages ``quiet_lightning`` drops (litlogger/litmodels ads)."""

_RANK_ZERO_LOGGERS = ("lightning.pytorch.utilities.rank_zero",
                      "lightning.fabric.utilities.rank_zero")


class _DropTips(logging.Filter):
    """Drop Lightning's advertising tips, keep every other message."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(UNACTIONABLE_LOG_PREFIXES)


def quiet_lightning() -> None:
    """Ignore the Lightning/PyTorch notices in ``UNACTIONABLE_*``, by message (idempotent).

    Why narrowly: a warning that says something about this run (a bad value, a real
    deprecation in the project's own calls) must still reach the user.

    Also, when logging is configured (Prefect's console handler on the root logger, as in
    every stage), Lightning's own ``INFO: ...`` console handler is removed: Lightning's
    messages propagate to the root as well, so each was printed twice.
    """
    for category, message in UNACTIONABLE_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in _RANK_ZERO_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropTips) for f in logger.filters):
            logger.addFilter(_DropTips())
    lightning_logger = logging.getLogger("lightning")
    if logging.getLogger().handlers and lightning_logger.propagate:
        for handler in list(lightning_logger.handlers):
            if type(handler) is logging.StreamHandler:
                lightning_logger.removeHandler(handler)


class StepRichProgressBar(RichProgressBar):
    """Lightning's Rich bar, worded for training that is measured in steps, not epochs.

    Why: with ``max_steps`` and no ``max_epochs`` Lightning sets ``max_epochs=-1`` and its bar
    reads "Epoch 7/-2". Here the epoch has no total, the step count towards ``max_steps`` is
    shown with the metrics, and the logger's run id (``v_num``) is left out.
    """

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs = self.trainer.max_epochs
        if max_epochs is None or max_epochs < 0:
            return f"Epoch {current_epoch}"
        return super()._get_train_description(current_epoch)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule
                    ) -> dict[str, Any]:
        """The bar's metrics plus ``step k/N``, without the run id."""
        items = dict(super().get_metrics(trainer, pl_module))
        items.pop("v_num", None)
        if trainer.max_steps and trainer.max_steps > 0:
            items = {"step": f"{trainer.global_step}/{trainer.max_steps}", **items}
        return items


class LogProgress(ProgressBar):
    """Training progress as a plain line every ``every_s`` seconds: for logs, not terminals.

    Prints ``<name>: step k/N (p %), epoch e, loss x, r images/s, ETA t`` at the first step,
    then at most every ``every_s`` seconds, and at the last step. A ``ProgressBar`` (so
    Lightning adds no bar of its own); only global rank 0 prints.

    Args:
        name: what is trained (the stage name).
        batch_size_fn: images in a batch (None: rates are given in steps/s).
        every_s: seconds between lines.
        loss_key: the progress-bar metric shown as the loss.
        clock: time source (tests pass a fake one).
        write: where lines go (default: print to stdout, flushed).
    """

    def __init__(self, name: str, batch_size_fn: Callable[[Any], int] | None = None,
                 every_s: float = LOG_EVERY_SECONDS, loss_key: str = "train/loss_step",
                 clock: Callable[[], float] = time.monotonic,
                 write: Callable[[str], None] | None = None) -> None:
        super().__init__()
        self.name = name
        self.batch_size_fn = batch_size_fn
        self.every_s = every_s
        self.loss_key = loss_key
        self.clock = clock
        self.write = write or (lambda line: print(line, flush=True))
        self._enabled = True
        self._started = 0.0
        self._first_step = 0
        self._items = 0
        self._last: float | None = None

    def disable(self) -> None:
        """Print nothing (Lightning calls this on every rank but 0)."""
        self._enabled = False

    def enable(self) -> None:
        """Print again."""
        self._enabled = True

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the clock at the step training starts (or resumes) from."""
        self._started, self._first_step, self._items = self.clock(), trainer.global_step, 0
        self._last = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           outputs: Any, batch: Any, batch_idx: int) -> None:
        """Count the batch; print when the interval has passed, or at the first or last step."""
        if self.batch_size_fn is not None:
            self._items += int(self.batch_size_fn(batch)) * trainer.world_size
        if not self._enabled:
            return
        now = self.clock()
        last_step = trainer.max_steps is not None and 0 < trainer.max_steps <= trainer.global_step
        if self._last is None or now - self._last >= self.every_s or last_step:
            self._last = now
            self.write(self.line(trainer, pl_module, now))

    def line(self, trainer: L.Trainer, pl_module: L.LightningModule, now: float) -> str:
        """The progress line at this point of training."""
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"step {step}/{total} ({100 * step / total:.0f} %)" if total and total > 0
                 else f"step {step}", f"epoch {trainer.current_epoch}"]
        loss = self.get_metrics(trainer, pl_module).get(self.loss_key)
        if isinstance(loss, int | float):
            parts.append(f"loss {loss:.4f}")
        elapsed, done = now - self._started, step - self._first_step
        if elapsed > 0 and done > 0:
            if self.batch_size_fn is not None:
                parts.append(f"{self._items / elapsed:.1f} images/s")
            else:
                parts.append(f"{done / elapsed:.2f} steps/s")
            if total and total > 0:
                parts.append(f"ETA {format_duration((total - step) * elapsed / done)}")
        return f"{self.name}: " + ", ".join(parts)


def lightning_progress_callbacks(name: str = "training",
                                 batch_size_fn: Callable[[Any], int] | None = None
                                 ) -> list[L.Callback]:
    """A Rich bar counting steps on a terminal; elsewhere a ``LogProgress`` line every 30 s.

    Args:
        name: what is trained, at the start of each log line.
        batch_size_fn: images in a batch, for the images/s of the log lines.
    """
    if on_terminal():
        return [StepRichProgressBar(leave=True)]
    return [LogProgress(name, batch_size_fn)]
