"""Stage `validate`: the Great Expectations suites on the manifest, run by the pipeline and the data tests.

Three batches, each a pandas dataframe checked by its own suite:
- `manifest`: schema, non-null, labels/types/modes/locations in the configured sets, size range, unique
  content hash (so no duplicate inside or across splits), masks present for defective images;
- `files`: a decode check of every image (and mask) from disk, its mode, and mask size == image size;
- `split_counts`: minimum images per (category, class, split), and split fractions within tolerance.

Data Docs HTML is written under the docs folder either way; on failure the stage exits non-zero and prints
each failed expectation with up to N offending rows (path and value).
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, UnidentifiedImageError

from edgeqa.errors import StageError
from edgeqa.io import atomic_write_text, write_json
from edgeqa.report import md_table
from edgeqa.config import GRID_WORDS, SPLITS, IngestConfig, ValidateConfig, load_params
from edgeqa.data.manifest import COLUMNS, LABELS, REQUIRED, SOURCES

log = logging.getLogger("edgeqa.validate")


@dataclass
class Failure:
    suite: str
    expectation: str
    column: str | None
    kwargs: dict[str, Any]
    rows: list[dict[str, Any]] = field(default_factory=list)
    unexpected_count: int | None = None

    def describe(self) -> str:
        what = f"{self.suite}: {self.expectation}" + (f" on column {self.column!r}" if self.column else "")
        args = {k: v for k, v in self.kwargs.items() if k not in ("column", "batch_id", "result_format")}
        head = f"{what} {args}" + (f" ({self.unexpected_count} offending rows)" if self.unexpected_count else "")
        return "\n".join([head, *(f"    {r}" for r in self.rows)])


@dataclass
class ValidationReport:
    success: bool
    evaluated: int
    failed: list[Failure]
    rows: int
    seconds: float


# ------------------------------------------------------------------------------------ derived tables
def decode_table(df: pd.DataFrame) -> pd.DataFrame:
    """Decode every image and mask from disk: ok flag, decoded mode, and whether the mask size matches."""
    out = []
    for r in df.itertuples(index=False):
        rec: dict[str, Any] = {"path": r.path, "decoded": False, "decoded_mode": None, "mode_matches": False,
                               "mask_decoded": None, "mask_size_matches": None, "error": None}
        try:
            with Image.open(r.path) as im:
                im.load()
                rec.update(decoded=True, decoded_mode=im.mode, mode_matches=(im.mode == r.mode))
                size = im.size
        except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"
            size = None
        if isinstance(r.mask_path, str):
            try:
                with Image.open(r.mask_path) as m:
                    m.load()
                    rec["mask_decoded"] = True
                    rec["mask_size_matches"] = size is not None and m.size == size
            except (FileNotFoundError, UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
                rec.update(mask_decoded=False, mask_size_matches=False, error=f"mask {type(exc).__name__}: {exc}")
        out.append(rec)
    return pd.DataFrame(out)


def split_count_table(df: pd.DataFrame, fractions: dict[str, float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(per category/class/split counts incl. zeros, per split fraction deviation) of the dataset's fixed cut:
    reviewed images (source review), which only ever join `labelled`, are not part of it."""
    if "source" in df:
        df = df[df["source"] != "review"]
    cls = df["defect_type"].fillna(df["label"]).astype(str)
    keys = sorted(set(zip(df["category"].astype(str), cls)))
    counts = df.assign(cls=cls).groupby(["category", "cls", "split"]).size()
    rows = [{"category": c, "class": k, "split": s, "n": int(counts.get((c, k, s), 0))}
            for c, k in keys for s in SPLITS]
    per = pd.DataFrame(rows)
    total = len(df)
    frac = pd.DataFrame([{"split": s, "fraction": float((df["split"] == s).sum()) / max(total, 1),
                          "expected": fractions[s]} for s in SPLITS])
    frac["abs_deviation"] = (frac["fraction"] - frac["expected"]).abs()
    return per, frac


# ------------------------------------------------------------------------------------------- suites
def build_suites(df: pd.DataFrame, ingest: IngestConfig, cfg: ValidateConfig) -> dict[str, list[Any]]:
    """Expectations per batch name. The same suites serve the pipeline and the data tests."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    is_good = Column("label") == "good"
    is_defective = Column("label") == "defective"

    m: list[Any] = [
        gxe.ExpectTableColumnsToMatchOrderedList(column_list=list(COLUMNS)),
        gxe.ExpectTableRowCountToBeBetween(min_value=1),
        *[gxe.ExpectColumnValuesToNotBeNull(column=c) for c in REQUIRED],
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(LABELS)),
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=list(SPLITS)),
        gxe.ExpectColumnValuesToBeInSet(column="source", value_set=list(SOURCES)),
        # a reviewed image only ever joins the training pool; val and test stay the dataset's fixed cut
        gxe.ExpectColumnValuesToBeInSet(column="split", value_set=["labelled"],
                                        row_condition=Column("source") == "review"),
        gxe.ExpectColumnValuesToBeInSet(column="mode", value_set=list(ingest.allowed_modes)),
        gxe.ExpectColumnValuesToBeInSet(column="dataset", value_set=[ingest.dataset]),
        gxe.ExpectColumnValuesToBeBetween(column="width", min_value=ingest.min_side, max_value=ingest.max_side),
        gxe.ExpectColumnValuesToBeBetween(column="height", min_value=ingest.min_side, max_value=ingest.max_side),
        gxe.ExpectColumnValuesToBeUnique(column="sha256"),
        gxe.ExpectColumnValuesToMatchRegex(column="sha256", regex=r"^[0-9a-f]{64}$"),
        gxe.ExpectColumnValuesToBeInSet(column="location", value_set=list(GRID_WORDS)),
        gxe.ExpectColumnValuesToBeBetween(column="area_frac", min_value=0.0, max_value=1.0),
        # good images carry no defect facts
        gxe.ExpectColumnValuesToBeNull(column="defect_type", row_condition=is_good),
        gxe.ExpectColumnValuesToBeNull(column="mask_path", row_condition=is_good),
    ]
    if ingest.defect_types is not None:
        m += [
            gxe.ExpectColumnValuesToBeInSet(column="defect_type", value_set=list(ingest.defect_types)),
            gxe.ExpectColumnValuesToNotBeNull(column="defect_type", row_condition=is_defective),
        ]
    if df["mask_path"].notna().any():  # a dataset with masks: every defective image has one (a reviewer draws none)
        m.append(gxe.ExpectColumnValuesToNotBeNull(column="mask_path",
                                                   row_condition=is_defective & (Column("source") == "dataset")))
    files = [
        gxe.ExpectColumnValuesToBeInSet(column="decoded", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="mode_matches", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="decoded_mode", value_set=list(ingest.allowed_modes)),
        gxe.ExpectColumnValuesToBeInSet(column="mask_decoded", value_set=[True]),
        gxe.ExpectColumnValuesToBeInSet(column="mask_size_matches", value_set=[True]),
    ]
    counts = [gxe.ExpectColumnValuesToBeBetween(column="n", min_value=cfg.min_per_class_split)]
    fractions = [gxe.ExpectColumnValuesToBeBetween(column="abs_deviation", min_value=0.0,
                                                   max_value=cfg.split_tolerance)]
    return {"manifest": m, "files": files, "class_split_counts": counts, "split_fractions": fractions}


INDEX_COLUMNS = {"manifest": ["path", "split"], "files": ["path"], "class_split_counts": ["category", "class", "split"],
                 "split_fractions": ["split"]}


def _failures(result: Any, suite: str, max_rows: int) -> list[Failure]:
    out = []
    for r in result.results:
        if r.success:
            continue
        cfg = r.expectation_config
        kwargs = dict(cfg.kwargs)
        res = r.result or {}
        rows = []
        for item in (res.get("unexpected_index_list") or [])[:max_rows]:
            rec = dict(item) if isinstance(item, dict) else {"row": item}
            rows.append({k: (v.item() if hasattr(v, "item") else v) for k, v in rec.items()})
        if not rows and res.get("partial_unexpected_list"):
            rows = [{"value": v} for v in res["partial_unexpected_list"][:max_rows]]
        if not rows and "observed_value" in res:
            rows = [{"observed": res["observed_value"]}]
        out.append(Failure(suite, cfg.type, kwargs.get("column"), kwargs, rows, res.get("unexpected_count")))
    return out


def validate_frames(frames: dict[str, pd.DataFrame], suites: dict[str, list[Any]], max_rows: int,
                    docs_dir: Path | None = None) -> tuple[bool, int, list[Failure]]:
    """Run each suite on its dataframe in one ephemeral GX context; optionally build Data Docs."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    import great_expectations as gx
    from great_expectations.checkpoint import UpdateDataDocsAction
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    if docs_dir is not None:
        context.add_data_docs_site(site_name="edgeqa", site_config={
            "class_name": "SiteBuilder",
            "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(docs_dir.resolve())},
            "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
        })
    source = context.data_sources.add_pandas("edgeqa")
    definitions = []
    for name, exps in suites.items():
        asset = source.add_dataframe_asset(name)
        batch = asset.add_batch_definition_whole_dataframe(name)
        suite = context.suites.add(gx.ExpectationSuite(name=name))
        for e in exps:
            suite.add_expectation(e)
        vd = gx.ValidationDefinition(name=name, data=batch, suite=suite)
        definitions.append(context.validation_definitions.add(vd))
    ok, evaluated, failures = True, 0, []
    for vd in definitions:
        fmt = {"result_format": "COMPLETE", "unexpected_index_column_names": INDEX_COLUMNS.get(vd.name, []),
               "partial_unexpected_count": max_rows}
        cp = context.checkpoints.add(gx.Checkpoint(
            name=f"{vd.name}-checkpoint", validation_definitions=[vd], result_format=fmt,
            actions=[UpdateDataDocsAction(name="docs", site_names=["edgeqa"])] if docs_dir is not None else []))
        res = cp.run(batch_parameters={"dataframe": frames[vd.name]})
        for _, vr in res.run_results.items():
            evaluated += len(vr.results)
            ok = ok and bool(vr.success)
            failures += _failures(vr, vd.name, max_rows)
    return ok, evaluated, failures


def run(ingest: IngestConfig, cfg: ValidateConfig, manifest: Path, docs_dir: Path,
        metrics: Path | None = None, report: Path | None = None) -> ValidationReport:
    t0 = time.perf_counter()
    try:
        df = pd.read_parquet(manifest)
    except (FileNotFoundError, OSError) as exc:
        raise StageError(f"validate: cannot read manifest {manifest}: {exc}") from None
    frames = {"manifest": df}
    missing = [c for c in ("path", "mask_path", "mode", "category", "label", "defect_type", "split") if c not in df]
    if not missing:
        frames["files"] = decode_table(df)
        frames["class_split_counts"], frames["split_fractions"] = split_count_table(df, ingest.splits)
    suites = build_suites(df if "mask_path" in df else df.assign(mask_path=None), ingest, cfg)
    suites = {k: v for k, v in suites.items() if k in frames}
    docs_dir.mkdir(parents=True, exist_ok=True)
    ok, evaluated, failures = validate_frames(frames, suites, cfg.max_failed_rows_shown, docs_dir)
    dt = time.perf_counter() - t0
    rep = ValidationReport(success=ok, evaluated=evaluated, failed=failures, rows=len(df), seconds=round(dt, 3))
    if metrics:
        write_json(metrics, {"success": ok, "expectations": evaluated, "failed": len(failures), "rows": len(df),
                             "seconds": rep.seconds})
    if report:
        body = (f"# validate\n\n**{'PASSED' if ok else 'FAILED'}**: {evaluated - len(failures)}/{evaluated} "
                f"expectations met on {len(df)} manifest rows in {rep.seconds:.1f} s. "
                f"Data Docs: `{docs_dir}/index.html`.\n")
        if failures:
            rows = [[f.suite, f.expectation, f.column, "; ".join(map(str, f.rows[:3]))] for f in failures]
            body += "\n" + md_table(["suite", "expectation", "column", "offending rows (first shown)"], rows) + "\n"
        atomic_write_text(report, body)
    if not ok:
        detail = "\n".join(f"  - {f.describe()}" for f in failures)
        raise StageError(f"validate: {len(failures)} of {evaluated} expectations failed on {manifest}:\n{detail}\n"
                         f"Data Docs: {docs_dir}/index.html")
    log.info("validate: %d expectations passed on %d rows in %.1f s", evaluated, len(df), dt)
    return rep
