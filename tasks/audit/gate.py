"""The generator's champion / challenger gate, on its audit, before its synthetic set is released.

Why: a diffusion model retrained on a grown archive is not a better one. Its audit (quality and
privacy) is compared with the audit recorded on the registry's ``@champion`` generator when it
was promoted (version tags ``audit.<metric>``):

- no number worse beyond its tolerance (``audit.promotion``): FID up by more than
  ``fid_tolerance`` (a share), precision or recall down, or ``|two-sample AUC - 0.5|`` up, by
  more than ``quality_tolerance``, withheld share or median NCC up by more than
  ``privacy_tolerance``;
- and better overall: FID lower by more than ``margin`` (a share).

A promoted generator's set is released and the model becomes ``@champion`` (the audit's
adapter sets the alias, the tags and logs the released set with its run). A refused one becomes
``@challenger``, and the released set is the champion's again (the copy logged with its audit
run): the classifiers never train on a generator that did not pass. The first generator is
promoted with the reason "no champion yet".
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tasks.config import AuditPromotionConfig, Config

NO_CHAMPION = "no champion yet"
TAG_PREFIX = "audit."
RELEASED_ARTIFACT = "released"
"""Where a promoted generator's released set is kept among its audit run's artifacts."""


@dataclass
class GeneratorGate:
    """The decision on one generator (``promoted``, ``challenger`` or ``kept``) and why."""

    decision: str
    reason: str
    name: str | None = None
    version: str | None = None
    champion_version: str | None = None
    champion_audit_run: str | None = None
    metrics: dict[str, float | None] = field(default_factory=dict)
    checks: list[dict[str, Any]] = field(default_factory=list)

    @property
    def promote(self) -> bool:
        """Whether this generator's synthetic set is released."""
        return self.decision in ("promoted", "kept")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (audit.json's ``generator_gate``)."""
        return asdict(self)


def gate_metrics(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The numbers the gate compares, from the audit's DVC metrics document."""
    quality, privacy = metrics.get("quality", {}), metrics.get("privacy", {})
    auc = quality.get("two_sample_auc")
    return {"fid": quality.get("fid"), "precision": quality.get("precision"),
            "recall": quality.get("recall"),
            "two_sample_gap": None if auc is None else abs(float(auc) - 0.5),
            "withheld_fraction": metrics.get("withheld_fraction"),
            "median_ncc": privacy.get("median_ncc")}


def compare(new: dict[str, float | None], old: dict[str, float | None],
            cfg: AuditPromotionConfig) -> tuple[str, str, list[dict[str, Any]]]:
    """``(decision, reason, checks)`` of a new generator's numbers against the champion's."""
    rules = (("fid", "relative_up", cfg.fid_tolerance), ("precision", "down",
                                                          cfg.quality_tolerance),
             ("recall", "down", cfg.quality_tolerance),
             ("two_sample_gap", "up", cfg.quality_tolerance),
             ("withheld_fraction", "up", cfg.privacy_tolerance),
             ("median_ncc", "up", cfg.privacy_tolerance))
    checks, worse = [], []
    for key, kind, tolerance in rules:
        a, b = new.get(key), old.get(key)
        if a is None or b is None:
            checks.append({"metric": key, "new": a, "champion": b, "worse": False,
                           "note": "not compared (missing)"})
            continue
        if kind == "relative_up":
            bad = a > b * (1.0 + tolerance)
        elif kind == "down":
            bad = a < b - tolerance
        else:
            bad = a > b + tolerance
        checks.append({"metric": key, "new": a, "champion": b, "worse": bool(bad), "note": ""})
        if bad:
            worse.append(f"{key} {a:.4g} vs {b:.4g}")
    if worse:
        return "challenger", (f"worse than the champion generator beyond tolerance: "
                              f"{', '.join(worse)}"), checks
    fid, old_fid = new.get("fid"), old.get("fid")
    if fid is None or old_fid is None:
        return "challenger", "not comparable overall: no FID on one side", checks
    shown, old_shown = distinct(fid, old_fid)
    change = f"{(fid / old_fid - 1.0) * 100:+.3g} %" if old_fid else "n/a"
    if not fid < old_fid * (1.0 - cfg.margin):
        return "challenger", (f"not better overall: FID {shown} vs the champion's "
                              f"{old_shown} ({change}; margin {cfg.margin:g})"), checks
    return "promoted", (f"better overall: FID {shown} < the champion's {old_shown} "
                        f"({change}), no quality or privacy number worse beyond tolerance"),\
        checks


def distinct(a: float, b: float, digits: int = 4) -> tuple[str, str]:
    """``a`` and ``b`` with as many significant digits as it takes to tell them apart.

    Why: a reason such as "FID 5559 < the champion's 5559" reads as a contradiction when the
    values differ below four digits; equal values stay short (up to 12 digits are tried).
    """
    for n in range(digits, 13):
        left, right = f"{a:.{n}g}", f"{b:.{n}g}"
        if left != right or a == b:
            return left, right
    return left, right


def _registered(synthesis: dict[str, Any] | None) -> tuple[str | None, str | None]:
    model = (synthesis or {}).get("model") or {}
    name, version = model.get("registered_name"), model.get("registered_version")
    return (str(name), str(version)) if name and version else (None, None)


def gate_generator(cfg: Config, synthesis: dict[str, Any] | None, metrics: dict[str, Any]
                   ) -> GeneratorGate:
    """Decide on the generator that made the audited set (read-only on the registry).

    Args:
        cfg: parameters (``audit.promotion``, ``mlflow``).
        synthesis: the synthetic set's synthesis.json (which registered model made it).
        metrics: the audit's DVC metrics document.
    """
    numbers = gate_metrics(metrics)
    name, version = _registered(synthesis)
    if name is None:
        return GeneratorGate("promoted", "the generator is not registered "
                             "(diffusion.registered_model_name null): released ungated",
                             metrics=numbers)
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=cfg.mlflow.resolved_uri())
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champion = None
    if champion is None:
        return GeneratorGate("promoted", NO_CHAMPION, name, version, metrics=numbers)
    if str(champion.version) == version:
        return GeneratorGate("kept", "this generator is the champion already", name, version,
                             str(champion.version), champion.tags.get("audit_run_id"),
                             metrics=numbers)
    old = {key: (float(champion.tags[TAG_PREFIX + key])
                 if champion.tags.get(TAG_PREFIX + key) not in (None, "", "None") else None)
           for key in numbers}
    decision, reason, checks = compare(numbers, old, cfg.audit.promotion)
    run = champion.tags.get("audit_run_id")
    if decision == "challenger" and not run:
        decision, reason = "promoted", (f"{reason}; but the champion generator has no released "
                                        "set on record to release instead, so this one is "
                                        "promoted")
    return GeneratorGate(decision, reason, name, version, str(champion.version), run,
                         metrics=numbers, checks=checks)


def fetch_champion_released(cfg: Config, gate: GeneratorGate, target: Path) -> Path:
    """Download the champion generator's released set into ``target`` (the released folder).

    Raises:
        OSError: the set cannot be downloaded (the message names the run).
    """
    from mlflow.artifacts import download_artifacts

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        local = download_artifacts(run_id=gate.champion_audit_run,
                                   artifact_path=RELEASED_ARTIFACT, dst_path=str(target.parent),
                                   tracking_uri=cfg.mlflow.resolved_uri())
    except Exception as exc:  # MLflow raises several types for a missing run or artifact
        raise OSError(f"the champion generator's released set (audit run "
                      f"{gate.champion_audit_run}) cannot be downloaded: {exc}") from exc
    if Path(local) != target:
        Path(local).rename(target)
    return target


def record_generator(cfg: Config, gate: dict[str, Any], audit_run_id: str,
                     released: Path) -> None:
    """Set the generator's alias and tags; keep a promoted generator's released set in MLflow.

    Called by the audit's adapter inside its run (``gate``: audit.json's ``generator_gate``).
    """
    if not gate.get("name") or not gate.get("version"):
        return
    import mlflow
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=cfg.mlflow.resolved_uri())
    name, version = gate["name"], gate["version"]
    promoted = gate["decision"] in ("promoted", "kept")
    tags = {"promotion": gate["decision"], "promotion_reason": gate["reason"][:4900],
            "compared_with": (f"version {gate['champion_version']}"
                              if gate.get("champion_version") else "")}
    if gate["decision"] == "promoted":
        mlflow.log_artifacts(str(released), RELEASED_ARTIFACT)
        tags["audit_run_id"] = audit_run_id
        tags |= {TAG_PREFIX + k: str(v) for k, v in gate["metrics"].items()}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, "champion" if promoted else "challenger", version)
    mlflow.set_tags({"synthdx.generator_gate": gate["decision"],
                     "synthdx.generator_gate.reason": gate["reason"][:4900]})
