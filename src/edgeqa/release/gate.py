"""Stage `gate`: the absolute release rules (`gate.rules` in params.yaml) checked on DVC-tracked inputs only:
the `evaluate` metrics of the candidate (the edge bundle, scored through the edge runtime), of the teacher and
of the `baseline` student (human labels only), and the bundle folder itself. Nothing here depends on what is
in production or on this machine's speed (champion/challenger and latency belong to the release flow, which
DVC cannot cache honestly).

A refusal is a normal outcome: the stage always writes its report and exits 0; `passed` says which. A
profile may relax a rule only through `gate.overrides.<rule>` with `gate.override_reason`, and each report
row says whether its threshold is the policy's or an override.
"""

from __future__ import annotations

import json
import logging
import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeqa.config import GateConfig
from edgeqa.errors import StageError
from edgeqa.io import atomic_write_text, write_json
from edgeqa.report import fmt, md_table
from edgeqa_runtime.bundle import MANIFEST, BundleError, verify
from edgeqa_runtime.files import folder_fingerprint

log = logging.getLogger("edgeqa.gate")
Evals = dict[str, dict[str, Any]]  # role (candidate, teacher, baseline) -> evaluate metrics


@dataclass(frozen=True)
class Rule:
    name: str  # the key in gate.rules / gate.overrides
    what: str  # what the value is, for the report
    value: Callable[[Evals, dict[str, Any]], float | None]  # (evaluations, bundle facts) -> value
    op: str  # ">=" or "<="


def _metric(role: str, key: str) -> Callable[[Evals, dict[str, Any]], float | None]:
    return lambda e, b: e[role].get(key)


def _drop(ref: str, key: str) -> Callable[[Evals, dict[str, Any]], float | None]:
    def f(e: Evals, b: dict[str, Any]) -> float | None:
        r, c = e[ref].get(key), e["candidate"].get(key)
        return None if r is None or c is None else r - c
    return f


RULES: tuple[Rule, ...] = (
    Rule("min_auroc", "image AUROC", _metric("candidate", "auroc"), ">="),
    Rule("min_type_accuracy", "defect-type accuracy (defective images)", _metric("candidate", "type_accuracy"), ">="),
    Rule("min_parse_rate", "answers that parse", _metric("candidate", "parse_rate"), ">="),
    Rule("max_miss_rate", "miss rate at the shipped threshold", _metric("candidate", "miss_rate"), "<="),
    Rule("max_overkill_rate", "overkill rate at the shipped threshold", _metric("candidate", "overkill_rate"), "<="),
    Rule("max_bundle_mb", "bundle size (MB, every file)", lambda e, b: b["bytes"] / 1e6, "<="),
    Rule("max_auroc_drop_vs_teacher", "teacher AUROC - candidate AUROC", _drop("teacher", "auroc"), "<="),
    Rule("max_auroc_drop_vs_baseline", "baseline AUROC - candidate AUROC", _drop("baseline", "auroc"), "<="),
    Rule("max_type_accuracy_drop_vs_baseline", "baseline type accuracy - candidate type accuracy",
         _drop("baseline", "type_accuracy"), "<="),
)
_OPS = {">=": operator.ge, "<=": operator.le}


def bundle_facts(folder: Path) -> dict[str, Any]:
    """Size, fingerprint and integrity of the bundle folder; a folder that is no bundle at all is an error."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise StageError(f"{folder / MANIFEST} is missing: gate.candidate must name an edge bundle (the quantize "
                         "stage's output), not a PyTorch model folder")
    facts: dict[str, Any] = {"bytes": sum(p.stat().st_size for p in folder.rglob("*") if p.is_file()),
                             "fingerprint": folder_fingerprint(folder)}
    try:
        m = verify(folder)
        facts.update(intact=True, problem=None, version=m.get("version"), source=m.get("source"),
                     threshold=(m.get("threshold") or {}).get("threshold"))
    except BundleError as exc:
        facts.update(intact=False, problem=str(exc), version=None, source=None, threshold=None)
    return facts


def check(cfg: GateConfig, evals: Evals, bundle: dict[str, Any]) -> dict[str, Any]:
    """Every rule with its value, threshold (policy or override), pass/fail; `passed` only if all pass."""
    rules, overrides = cfg.rules.model_dump(), cfg.overrides.model_dump()
    rows: list[dict[str, Any]] = []
    for r in RULES:
        override = overrides[r.name]
        threshold = rules[r.name] if override is None else override
        value = r.value(evals, bundle)
        ok = value is not None and bool(_OPS[r.op](value, threshold))
        rows.append({"rule": r.name, "what": r.what, "value": value, "op": r.op, "threshold": threshold,
                     "policy": rules[r.name], "source": "policy" if override is None else "override",
                     "passed": ok, "why": None if value is not None else "no value in the evaluate metrics"})
    # consistency: the candidate's scores are this bundle's, and every row was scored on the same images
    c = evals["candidate"]
    rows.append({"rule": "bundle_intact", "what": "every bundle file matches its SHA-256 in the manifest",
                 "value": bundle["intact"], "op": "==", "threshold": True, "policy": True, "source": "policy",
                 "passed": bool(bundle["intact"]), "why": bundle["problem"]})
    same = c.get("fingerprint") == bundle["fingerprint"]
    rows.append({"rule": "scored_this_bundle", "what": "evaluate scored the bundle being gated (fingerprint)",
                 "value": c.get("fingerprint"), "op": "==", "threshold": bundle["fingerprint"], "policy": None,
                 "source": "policy", "passed": same,
                 "why": None if same else "evaluate@candidate is stale: rerun it (dvc repro)"})
    keys = {role: (e.get("split"), e.get("images"), e.get("defective")) for role, e in evals.items()}
    comparable = len(set(keys.values())) == 1
    rows.append({"rule": "same_images", "what": "candidate, teacher and baseline scored on one split (images)",
                 "value": {k: list(v) for k, v in keys.items()}, "op": "==", "threshold": "equal", "policy": None,
                 "source": "policy", "passed": comparable,
                 "why": None if comparable else "the three evaluate reports differ in split or image count"})
    failed = [r["rule"] for r in rows if not r["passed"]]
    return {"passed": not failed, "failed": failed, "rules": rows, "candidate": cfg.candidate,
            "split": c.get("split"), "images": c.get("images"),
            "bundle": {k: bundle[k] for k in ("version", "source", "bytes", "fingerprint", "threshold")},
            "overrides": {k: {"value": v, "policy": rules[k]} for k, v in overrides.items() if v is not None},
            "override_reason": cfg.override_reason or None,
            "teacher_knowledge_in_bundle": bundle["source"] not in (None, "baseline"),
            "summary": summary(not failed, rows)}


def summary(passed: bool, rows: list[dict[str, Any]]) -> str:
    if passed:
        n = sum(r["source"] == "override" for r in rows)
        return "passed: every rule holds" + (f" ({n} by an explicit override)" if n else "")
    bad = [r for r in rows if not r["passed"]]
    return "refused: " + "; ".join(
        f"{r['rule']} ({r['what']}: {fmt(r['value'])}, allowed {r['op']} {fmt(r['threshold'])})"
        if r["why"] is None else f"{r['rule']} ({r['why']})" for r in bad)


def render(res: dict[str, Any]) -> str:
    b = res["bundle"]
    lines = [f"# gate: {'PASSED' if res['passed'] else 'REFUSED'}", "",
             f"{res['summary']}", "",
             f"Candidate `{res['candidate']}`: bundle {b['version']} ({fmt(b['bytes'] / 1e6, 2)} MB), compressed "
             f"from `{b['source']}`, shipped threshold {fmt(b['threshold'])}; scored on the {res['split']} split "
             f"({res['images']} images) through the edge runtime.", ""]
    if not res["teacher_knowledge_in_bundle"]:
        lines += ["The bundle was compressed from the `baseline` student (human labels only): it carries none of "
                  "the teacher's knowledge (the prune report says why that source was chosen).", ""]
    rows = [[r["rule"], r["what"], fmt(r["value"]) if not isinstance(r["value"], dict) else "see JSON",
             f"{r['op']} {fmt(r['threshold'])}", r["source"], "pass" if r["passed"] else "**FAIL**"]
            for r in res["rules"]]
    lines += [md_table(["rule", "value of", "value", "allowed", "threshold from", "result"], rows), ""]
    if res["overrides"]:
        lines += [f"Overrides (a profile's explicit exception; reason: {res['override_reason']}):", ""]
        lines += [f"- `{k}`: {fmt(v['value'])} instead of the policy's {fmt(v['policy'])}"
                  for k, v in res["overrides"].items()] + [""]
    lines += ["This stage checks the absolute rules on DVC-tracked inputs only. The champion/challenger "
              "comparison and the latency check run uncached in the release flow.", ""]
    return "\n".join(lines)


def _read(path: Path, role: str) -> dict[str, Any]:
    if not path.is_file():
        raise StageError(f"{path} is missing: the gate needs evaluate@{role} (run dvc repro)")
    try:
        m = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(m, dict):
        raise StageError(f"{path}: expected the evaluate stage's metrics object")
    return m


def run(cfg: GateConfig, evaluations: Path, bundle: Path, metrics: Path, report: Path, report_json: Path
        ) -> dict[str, Any]:
    evals = {role: _read(Path(evaluations) / name / "metrics.json", name)
             for role, name in (("candidate", cfg.candidate), ("teacher", "teacher"), ("baseline", "baseline"))}
    res = check(cfg, evals, bundle_facts(bundle))
    write_json(report_json, res)
    atomic_write_text(report, render(res))
    flat = {"passed": res["passed"], "failed_rules": len(res["failed"]), "overrides": len(res["overrides"])}
    flat["values"] = {r["rule"]: r["value"] for r in res["rules"] if isinstance(r["value"], int | float)
                      and not isinstance(r["value"], bool)}
    write_json(metrics, flat)
    log.info("gate %s", res["summary"])
    return res
