"""`make bench`: measure the stack and the data stages; write reports/bench/infra.json (shared record format).

It never retrains: it times what exists. The stack measured is a temporary one on free loopback ports,
so a running `edgeqa up` is untouched. Ratios are measured within one run, on the same machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from edgeqa import benchrec
from edgeqa.compress.prune import STUDENTS
from edgeqa.config import load_params
from edgeqa.project import copy_worktree, load_project_module
from edgeqa.stack import PORT_KEYS, Stack, StackConfig, free_ports


def _copy_project(dst: Path, root: Path) -> Path:
    """A clean copy of the project (`copy_worktree`) whose relative `ingest.root` still points at the data: a
    profile such as mtile writes `../shared/...`, which would not resolve from the temp folder."""
    from dvc.utils.hydra import apply_overrides

    from edgeqa.config import load_params
    from edgeqa.config.profiles import to_override

    repo = copy_worktree(dst, root)
    data_root = Path(load_params(root / "params.yaml").ingest.root)
    where = (root / data_root).resolve()
    if not data_root.is_absolute() and not where.is_relative_to(root.resolve()):  # inside: a stage's output
        apply_overrides(repo / "params.yaml", [to_override("ingest.root", str(where))])
    return repo


def _timed(cmd: list[str], cwd: Path, env: dict[str, str] | None = None) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed in {cwd}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return time.perf_counter() - t0


def main(root: Path) -> int:
    """Benchmark the project at `root`."""
    os.environ.setdefault("DVC_NO_ANALYTICS", "1")
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    os.environ["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    params = load_params(root / "params.yaml")
    out = root / params.paths.bench_dir / "infra.json"
    recs = []
    with tempfile.TemporaryDirectory(prefix="edgeqa-bench-") as tmp:
        tmpd = Path(tmp)
        base = StackConfig.load(root)
        cfg = StackConfig(state_dir=tmpd / "stack", ports=dict(zip(PORT_KEYS, free_ports(len(PORT_KEYS)))),
                          buckets=base.buckets, prefect_block=base.prefect_block)
        stack = Stack(cfg)
        try:
            t0 = time.perf_counter()
            stack.up()
            first = time.perf_counter() - t0
            stack.down()
            t0 = time.perf_counter()
            stack.up()
            cold = time.perf_counter() - t0
            t0 = time.perf_counter()
            stack.up()
            warm = time.perf_counter() - t0
            recs += [
                benchrec.record("infra:up_cold_s", cold, "s", "<= 10 s",
                                "edgeqa up (services stopped, state kept: the everyday cold start)"),
                benchrec.record("infra:up_first_s", first, "s", "<= 10 s",
                                "edgeqa up on an empty state dir (creates the Prefect DB, credentials, buckets)"),
                benchrec.record("infra:up_running_s", warm, "s", None, "edgeqa up when already running"),
            ]
            print(f"up: first {first:.1f} s, cold {cold:.1f} s, running {warm:.2f} s")

            # ingest + validate of the real magnetic-tile set, as the stages run (subprocesses, GX import included)
            from edgeqa.config import profiles
            from edgeqa.config.datasets import dataset_path

            if dataset_path("mtile", root).is_dir():
                pfile = tmpd / "params-mtile.yaml"
                shutil.copy(root / "params.yaml", pfile)
                profiles.apply("mtile", pfile, root)
                mt = load_params(pfile)
                ing = tmpd / "mt-ingest"
                t_ing = _timed([sys.executable, "-m", "tasks.ingest", "--params", str(pfile), "--out", str(ing)],
                               root)
                t_val = _timed([sys.executable, "-m", "tasks.validate", "--params", str(pfile), "--manifest",
                                str(ing / "manifest.parquet"), "--docs", str(tmpd / "mt-docs")], root)
                recs.append(benchrec.record("data:mtile_ingest_validate_s", t_ing + t_val, "s", "<= 30 s",
                                            f"python -m tasks.ingest + tasks.validate on {mt.ingest.root}"))
                print(f"mtile ingest {t_ing:.1f} s + validate {t_val:.1f} s")

            # bare `dvc repro` vs the Prefect flow over the same (data) stages, each from a clean copy (empty
            # cache, no outputs). The model stages are left out: `make bench` never retrains.
            target = "validate"
            bare_repo = _copy_project(tmpd / "bare" / "repo", root)
            bare = _timed(["dvc", "repro", target], bare_repo)
            noop = min(_timed(["dvc", "repro", target], bare_repo) for _ in range(3))
            recs.append(benchrec.record("dvc:noop_repro_s", noop, "s", "<= 3 s",
                                        f"dvc repro {target} (everything up to date)"))
            flow_repo = _copy_project(tmpd / "flow" / "repo", root)
            os.environ["PREFECT_API_URL"] = cfg.prefect_api_url
            os.environ["PREFECT_HOME"] = str(cfg.path("prefect"))
            os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
            pipeline = load_project_module(root, "flows.pipeline").pipeline

            flow = pipeline.with_options(result_storage=f"s3-bucket/{cfg.prefect_block}", persist_result=True)
            t0 = time.perf_counter()
            state = flow(repo=str(flow_repo), push=False, target=target, return_state=True)
            flowt = time.perf_counter() - t0
            if not state.is_completed():
                raise RuntimeError(f"bench flow run failed: {state.message}")
            recs += [
                benchrec.record("flow:bare_dvc_repro_s", bare, "s", None, f"dvc repro {target} from a clean copy"),
                benchrec.record("flow:prefect_flow_s", flowt, "s", None,
                                f"edgeqa-pipeline flow, target {target}, no push, from a clean copy"),
                benchrec.record("flow:overhead_s", flowt - bare, "s", None, "flow wall - bare dvc repro wall"),
                benchrec.record("flow:overhead_ratio", flowt / bare, "x", "<= 1.1 (from the student issue on)",
                                "flow wall / bare dvc repro wall, same stages, same run"),
            ]
            print(f"bare dvc repro {bare:.1f} s, flow {flowt:.1f} s, ratio {flowt / bare:.2f}, no-op {noop:.2f} s")
        finally:
            stack.down()
    benchrec.write(out, recs)
    print(f"wrote {out}")
    teacher_ips = teacher_bench(params, root)
    student_bench(params, root, teacher_ips)
    edge_bench(params, root)
    models_bench(params, root)
    return 0


EDGE_SAMPLE = 50  # test images, the first by sha256: the same sample on every run of the same data


def _latency(fn: Any, paths: list[str]) -> dict[str, float]:
    """p50 / p95 / mean of per-image wall times (ms), from the image file to the answer, after one warm-up."""
    import numpy as np

    fn(paths[0])
    ms = []
    for p in paths:
        t0 = time.perf_counter()
        fn(p)
        ms.append((time.perf_counter() - t0) * 1000)
    a = np.asarray(ms)
    return {"p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "mean": float(a.mean())}


def edge_bench(params: Any, root: Path) -> None:
    """reports/bench/edge.json: batch 1, one thread, image file to answer (decoding and the reason included), on
    a fixed sample of `test` images, every model in one run: the unpruned source student in PyTorch and as an FP32
    export, the pruned student as an FP32 export, and the shipped bundle (INT8 where quantize kept it). The
    teacher at batch 1 / one thread on a smaller sample. Each lever gets its own ratio."""
    import json

    import pandas as pd
    import torch

    from edgeqa.student.export import export
    from edgeqa.student.model import Student
    from edgeqa.teacher.local import LocalTeacher
    from edgeqa_runtime.bundle import verify
    from edgeqa_runtime.session import OrtStudent

    bundle = root / params.paths.model_dir("edge")
    pruned = root / params.paths.model_dir("pruned")
    manifest = root / params.paths.ingest_dir / "manifest.parquet"
    if not (bundle / "manifest.json").is_file() or not manifest.exists():
        print(f"no edge bundle at {bundle}: run `make run` first; edge benchmark skipped")
        return
    m = verify(bundle)
    source = root / params.paths.model_dir(m["source"])
    df = pd.read_parquet(manifest)
    paths = [str(p) for p in df[df.split == "test"].sort_values("sha256").path[:EDGE_SAMPLE]]
    n_tok = params.quantize.max_reason_tokens
    torch.set_num_threads(1)
    lat: dict[str, dict[str, float]] = {}
    pt = Student(source, 1)
    lat["pytorch"] = _latency(lambda p: pt.predict_paths([p], n_tok), paths)
    sizes = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, folder in (("fp32", source), ("fp32_pruned", pruned)):
            export(folder, Path(tmp) / name)
            ort = OrtStudent(Path(tmp) / name, 1)
            lat[name] = _latency(lambda p, o=ort: o.predict_paths([p], n_tok), paths)
            sizes[name] = sum(e["bytes"] for e in json.loads((Path(tmp) / name / "manifest.json").read_text())
                              ["files"].values())
    edge = OrtStudent(bundle, 1)
    lat["edge"] = _latency(lambda p: edge.predict_paths([p], n_tok), paths)
    teacher_dir = root / params.paths.model_dir("teacher")
    if (teacher_dir / "teacher.json").exists():
        t = LocalTeacher(teacher_dir, 1)
        lat["teacher"] = _latency(lambda p: t.predict_paths([p], n_tok, 1), paths[:10])
    size = sum(e["bytes"] for e in m["files"].values()) + (bundle / "manifest.json").stat().st_size
    cmd = f"make bench: batch 1, 1 thread, {len(paths)} test images (first by sha256), file to answer"
    recs = [benchrec.record("edge:bundle_bytes", size, "bytes", "<= 5 MB", f"every file in {bundle.name}/"),
            benchrec.record("edge:fp32_export_bytes", sizes["fp32"], "bytes", None, f"{m['source']}, unpruned, FP32"),
            benchrec.record("edge:fp32_pruned_export_bytes", sizes["fp32_pruned"], "bytes", None, "pruned, FP32")]
    for k, v in lat.items():
        n = "10 test images" if k == "teacher" else cmd
        recs += [benchrec.record(f"edge:{k}_p50_ms", v["p50"], "ms", "<= 10 ms" if k == "edge" else None, n),
                 benchrec.record(f"edge:{k}_p95_ms", v["p95"], "ms", None, n)]
    recs.append(benchrec.record("edge:pruned_over_unpruned_p50", lat["fp32_pruned"]["p50"] / lat["fp32"]["p50"], "x",
                                "<= 0.6 (at about 50 % of the MACs)", "FP32 exports of both, same run"))
    prune_metrics = root / params.paths.reports_dir / "prune" / "metrics.json"
    if prune_metrics.is_file():
        pm = json.loads(prune_metrics.read_text())
        recs.append(benchrec.record("edge:pruned_over_unpruned_macs", pm["macs_ratio"], "x", "about 0.5",
                                    f"on-device path, prune step {pm['kept_step']} (reports/prune/metrics.json)"))
    recs.append(benchrec.record("edge:fp32_over_edge_p50", lat["fp32_pruned"]["p50"] / lat["edge"]["p50"], "x",
                                ">= 2 (INT8 vs FP32)", f"the pruned student's FP32 export vs the bundle, graphs "
                                f"{m['graphs']}; same run"))
    if "teacher" in lat:
        recs.append(benchrec.record("edge:teacher_over_edge_p50", lat["teacher"]["p50"] / lat["edge"]["p50"], "x",
                                    ">= 50", "same run"))
    out = root / params.paths.bench_dir / "edge.json"
    benchrec.write(out, recs)
    print("edge (batch 1, 1 thread, p50 ms): " + ", ".join(f"{k} {v['p50']:.1f}" for k, v in lat.items())
          + f"; bundle {size:,} bytes ({m['graphs']}); wrote {out}")


def int8_gemm_macs_per_s(n: int = 1024, runs: int = 10) -> float:
    """The int8 MAC rate onnxruntime reaches here on one large GEMM on one thread (MatMulInteger, u8 x s8 ->
    s32, n x n x n): the machine's practical limit for the quantized layers."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.integers(-127, 127, (n, n), dtype=np.int8), "B")
    g = helper.make_graph([helper.make_node("MatMulInteger", ["A", "B"], ["Y"])], "gemm",
                          [helper.make_tensor_value_info("A", TensorProto.UINT8, [n, n])],
                          [helper.make_tensor_value_info("Y", TensorProto.INT32, [n, n])], [b])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = 1, 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    a = {"A": rng.integers(0, 255, (n, n), dtype=np.uint8)}
    sess.run(None, a)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        sess.run(None, a)
        times.append(time.perf_counter() - t0)
    return n ** 3 / float(np.median(times))


def pareto_png(points: dict[str, tuple[float, float]], out: Path, title: str) -> None:
    """A scatter of test AUROC against p50 latency (log scale), the Pareto front (no other model both faster
    and better) joined by a line; drawn with Pillow (already a runtime dependency), written by rename."""
    import math

    from PIL import Image, ImageDraw

    w, h, m = 900, 560, 70
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    xs = [math.log10(max(v[0], 1e-3)) for v in points.values()]
    ys = [v[1] for v in points.values()]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs)) + (math.ceil(max(xs)) == math.floor(min(xs)))
    y0, y1 = max(0.0, math.floor(min(ys) * 20) / 20 - 0.05), 1.0

    def at(lat: float, auc: float) -> tuple[float, float]:
        return (m + (math.log10(max(lat, 1e-3)) - x0) / (x1 - x0) * (w - 2 * m),
                h - m - (auc - y0) / (y1 - y0) * (h - 2 * m))

    d.rectangle([m, m, w - m, h - m], outline="black")
    for e in range(x0, x1 + 1):
        x, _ = at(10 ** e, y0)
        d.line([x, h - m, x, h - m + 6], fill="black")
        d.text((x - 12, h - m + 10), f"{10 ** e:g}", fill="black")
    for k in range(int(round((y1 - y0) / 0.05)) + 1):
        yv = y0 + 0.05 * k
        _, y = at(10 ** x0, yv)
        d.line([m - 6, y, m, y], fill="black")
        d.text((m - 45, y - 6), f"{yv:.2f}", fill="black")
    d.text((w / 2 - 160, h - 30), "p50 latency, ms (batch 1, one thread; log scale)", fill="black")
    d.text((10, m - 20), "test AUROC", fill="black")
    d.text((m, 15), title, fill="black")
    front = sorted((v for v in points.values()), key=lambda v: (v[0], -v[1]))
    best, line = -1.0, []
    for lat, auc in front:
        if auc > best:
            best = auc
            line.append(at(lat, auc))
    if len(line) > 1:
        d.line(line, fill=(200, 60, 60), width=2)
    placed: list[tuple[float, float]] = []
    for name, (lat, auc) in points.items():
        x, y = at(lat, auc)
        d.ellipse([x - 5, y - 5, x + 5, y + 5], fill=(40, 90, 200))
        ty = y - 14
        while any(abs(ty - py) < 13 and abs(x - px) < 70 for px, py in placed):  # labels of close points stack
            ty += 13
        placed.append((x, ty))
        d.text((x + 8, ty), name, fill="black")
    tmp = out.with_name(out.name + ".tmp")
    img.save(tmp, format="PNG")
    tmp.replace(out)


MODEL_ROWS = (("teacher", "teacher"), ("patchknn", "patchknn"), ("baseline", "student"), ("sft", "student"),
              ("distill", "student"), ("pruned", "student"), ("edge", "edge"))


def models_bench(params: Any, root: Path) -> None:
    """reports/bench/models.json (+ models.md): every model of the pipeline in one run on the same 50 `test`
    images (the teacher on 10): parameters, file size, MACs, p50/p95 at batch 1 on one thread, throughput at
    batch 8 on two threads, peak RSS (each model in its own process), the quality figures `evaluate` wrote, the
    ratios against the teacher and against the unpruned FP32 student, and the physical limit (MACs / the int8
    GEMM rate measured here on one core)."""
    import json

    import numpy as np
    import pandas as pd

    from edgeqa.report import md_table
    from edgeqa_runtime.bundle import verify

    manifest = root / params.paths.ingest_dir / "manifest.parquet"
    bundle = root / params.paths.model_dir("edge")
    if not manifest.exists() or not (bundle / "manifest.json").is_file():
        print("no edge bundle: run `make run` first; models benchmark skipped")
        return
    source = verify(bundle)["source"]
    df = pd.read_parquet(manifest)
    test = df[df.split == "test"].sort_values("sha256")
    paths = [str(p) for p in test.path[:EDGE_SAMPLE]]
    n_tok = params.quantize.max_reason_tokens
    rate = int8_gemm_macs_per_s()
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, kind in MODEL_ROWS:
            folder = root / params.paths.model_dir("teacher" if kind == "patchknn" else name)
            if not folder.is_dir() or (kind == "patchknn" and not (folder / "anomaly_bank.safetensors").is_file()):
                continue
            pf = Path(tmp) / f"{name}.json"
            pf.write_text(json.dumps(paths[:10] if kind == "teacher" else
                                     [str(p) for p in test.path] if kind == "patchknn" else paths))
            r = subprocess.run([sys.executable, "-m", "edgeqa.benchmodel", kind, str(folder), str(pf), str(n_tok)],
                               cwd=root, capture_output=True, text=True)
            if r.returncode != 0:
                raise RuntimeError(f"benchmodel {name} failed:\n{r.stderr[-2000:]}")
            row = json.loads(r.stdout.strip().splitlines()[-1])
            ev = root / params.paths.reports_dir / "evaluate" / name / "metrics.json"
            q = json.loads(ev.read_text()) if ev.is_file() else {}
            row.update({k: q.get(k) for k in ("auroc", "type_accuracy", "miss_rate", "overkill_rate", "parameters")})
            if kind == "patchknn":  # its own test AUROC from its scores; no type, no location, no reason
                from edgeqa.evaluation.metrics import auroc

                y = (test.label == "defective").to_numpy().astype(int)
                row["auroc"] = auroc(y, np.asarray(row.pop("scores")))
                row["file_bytes"] = row["bank_bytes"]
                row["parameters"] = None
            elif kind == "edge":
                row["file_bytes"] = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
            elif kind == "student":
                row["file_bytes"] = (folder / "model.safetensors").stat().st_size
            else:
                base = root / params.paths.base_lm_dir / "model.safetensors"
                row["file_bytes"] = base.stat().st_size + sum(f.stat().st_size for f in folder.rglob("*")
                                                              if f.is_file())
            rows[name] = row
            print(f"{name}: p50 {row['p50_ms']:.1f} ms, {row['images_per_s_batch8_2threads']:.1f} img/s batch 8, "
                  f"peak RSS {row['peak_rss_bytes'] / 2**20:.0f} MiB")
    if "edge" in rows and "pruned" in rows:
        rows["edge"]["macs"] = rows["pruned"]["macs"]  # the same network; INT8 changes the arithmetic, not its count
    teacher_p50 = rows.get("teacher", {}).get("p50_ms")
    fp32_p50 = rows.get(source, {}).get("p50_ms")
    cmd = (f"make bench: {len(paths)} test images (first by sha256; the teacher on 10), batch 1 / 1 thread and "
           f"batch {8} / 2 threads, each model in its own process")
    recs = [benchrec.record("models:int8_gemm_macs_per_s", rate, "MAC/s", None,
                            "onnxruntime MatMulInteger 1024^3, one thread, same run")]
    table = []
    for name, row in rows.items():
        if row.get("macs"):
            row["physical_limit_ms"] = row["macs"] / rate * 1000
        if teacher_p50:
            row["teacher_over_p50"] = teacher_p50 / row["p50_ms"]
        if fp32_p50:
            row["fp32_student_over_p50"] = fp32_p50 / row["p50_ms"]
        units = {"bank_rows": "count", "bank_bytes": "bytes",
                 "p50_ms": "ms", "p95_ms": "ms", "images_per_s_batch8_2threads": "img/s", "peak_rss_bytes": "bytes",
                 "file_bytes": "bytes", "macs": "MAC", "parameters": "count", "auroc": "", "type_accuracy": "",
                 "miss_rate": "", "overkill_rate": "", "physical_limit_ms": "ms", "teacher_over_p50": "x",
                 "fp32_student_over_p50": "x"}
        targets = {("edge", "p50_ms"): "<= 10 ms", ("edge", "file_bytes"): "<= 5 MB",
                   ("edge", "teacher_over_p50"): ">= 50"}
        for k, unit in units.items():
            if row.get(k) is not None:
                recs.append(benchrec.record(f"models:{name}:{k}", row[k], unit, targets.get((name, k)), cmd))
        table.append([name, f"{row['parameters']:,}" if row.get("parameters") else "", f"{row['file_bytes'] / 1e6:.2f}",
                      f"{row['macs'] / 1e6:.0f}" if row.get("macs") else "not counted", f"{row['p50_ms']:.1f}",
                      f"{row['p95_ms']:.1f}", f"{row['images_per_s_batch8_2threads']:.1f}",
                      f"{row['peak_rss_bytes'] / 2**20:.0f}",
                      f"{row['physical_limit_ms']:.2f}" if row.get("macs") else "",
                      f"{row['teacher_over_p50']:.1f}" if row.get("teacher_over_p50") else "",
                      f"{row['fp32_student_over_p50']:.2f}" if row.get("fp32_student_over_p50") else "",
                      *(f"{row[k]:.3f}" if row.get(k) is not None else "" for k in ("auroc", "type_accuracy"))])
    out = root / params.paths.bench_dir / "models.json"
    benchrec.write(out, recs)
    md = (f"# Models, one run ({benchrec.cpu()})\n\n{cmd}. Physical limit: MACs / {rate / 1e9:.1f} GMAC/s, the "
          "int8 rate of one large GEMM on one core here. FP32 student: the unpruned source of the bundle "
          f"({source}), PyTorch. Quality: `evaluate` on test. `patchknn`: the classical row, a PatchCore-style "
          "patch-kNN on the same ImageNet backbone (the teacher's anomaly bank; MB = the bank; no coreset); its "
          "AUROC is from its own scores on every test image, and it gives no type, no location and no reason."
          "\n\n"
          + md_table(["model", "parameters", "MB", "MMACs", "p50 ms", "p95 ms", "img/s (b8, 2 thr)", "peak RSS MiB",
                      "limit ms", "teacher / p50", "FP32 student / p50", "AUROC", "type acc."], table) + "\n")
    from edgeqa.io import atomic_write_text

    atomic_write_text(out.with_suffix(".md"), md)
    pts = {n: (r["p50_ms"], r["auroc"]) for n, r in rows.items() if r.get("auroc") is not None}
    if pts:
        pareto_png(pts, out.with_name("models_pareto.png"), f"edgeqa models, one run: {benchrec.cpu()}")
    print(md)


def student_bench(params: Any, root: Path, teacher_ips: float | None) -> None:
    """reports/bench/student.json: size, answer speed in PyTorch and in onnxruntime (exported here, to a temp
    folder), both beside the teacher's speed measured in the same `make bench` run, and the training time."""
    import json

    import pandas as pd

    from edgeqa.student.export import export
    from edgeqa.student.model import Student, is_student_folder
    from edgeqa.student.train import teacher_parameters
    from edgeqa_runtime.session import OrtStudent

    sdir = root / params.paths.model_dir("distill")
    manifest = root / params.paths.ingest_dir / "manifest.parquet"
    if not is_student_folder(sdir) or not manifest.exists():
        print(f"no student at {sdir}: run `make run` first; student benchmark skipped")
        return
    out = root / params.paths.bench_dir / "student.json"
    df = pd.read_parquet(manifest)
    paths = list(df[df.split == "unlabelled"].path[: 2 * params.label.batch_size])
    st = Student(sdir, params.student.threads)
    n_s = st.parameters()
    n_t = teacher_parameters(root / params.paths.model_dir("teacher"), root / params.paths.base_lm_dir)
    st.predict_paths(paths[:2], params.teacher.max_reason_tokens, 1)  # warm-up
    t0 = time.perf_counter()
    for i in range(0, len(paths), params.label.batch_size):
        st.predict_paths(paths[i:i + params.label.batch_size], params.teacher.max_reason_tokens, 1)
    ips = len(paths) / (time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as tmp:
        export(sdir, Path(tmp) / "onnx")
        ort = OrtStudent(Path(tmp) / "onnx", params.student.threads)
        ort.predict_paths(paths[:1], params.teacher.max_reason_tokens)
        t0 = time.perf_counter()
        ort.predict_paths(paths[:16], params.teacher.max_reason_tokens)
        ort_ips = 16 / (time.perf_counter() - t0)
    recs = [benchrec.record("student:parameters", n_s, "count", None, "every parameter in model.safetensors"),
            benchrec.record("student:teacher_parameters", n_t, "count", None, "the teacher's weight files"),
            benchrec.record("student:parameter_ratio", n_t / n_s if n_t else None, "x", ">= 30", "teacher / student"),
            benchrec.record("student:images_per_s", ips, "img/s", None,
                            f"Student.predict_paths (PyTorch), batch {params.label.batch_size}, {len(paths)} images"),
            benchrec.record("student:onnxruntime_images_per_s", ort_ips, "img/s", None,
                            "OrtStudent, one image at a time, 16 images (FP32, before quantization)")]
    if teacher_ips:
        recs.append(benchrec.record("student:speedup_over_teacher", ips / teacher_ips, "x", None,
                                    "student / teacher img/s, both measured in this run"))
    stage_times = root / params.paths.bench_dir / "pipeline.json"
    if stage_times.exists():
        walls = {r["name"]: r["value"] for r in json.loads(stage_times.read_text())["records"]}
        students = STUDENTS  # each trained by the stage of its name
        parts = [walls.get(f"stage:{s}") for s in students]
        if all(v is not None for v in parts):
            total = sum(float(v) for v in parts if v is not None)
            recs.append(benchrec.record("student:train_stages_s", total, "s", "<= 120 s (README budget)",
                                        "baseline + sft + distill stage walls, last edgeqa run"))
    benchrec.write(out, recs)
    print(f"student: {n_s:,} parameters ({n_t / n_s if n_t else float('nan'):.1f}x fewer), {ips:.1f} img/s "
          f"PyTorch, {ort_ips:.1f} img/s onnxruntime; wrote {out}")


def teacher_bench(params: Any, root: Path) -> float | None:
    """reports/bench/teacher.json: labelling throughput of the teacher the pipeline built (never retrains)."""
    import json

    import pandas as pd

    from edgeqa.teacher.local import LocalTeacher

    tdir = root / params.paths.model_dir("teacher")
    manifest = root / params.paths.ingest_dir / "manifest.parquet"
    if not (tdir / "teacher.json").exists() or not manifest.exists():
        print(f"no teacher at {tdir}: run `make run` first; teacher benchmark skipped")
        return None
    out = root / params.paths.bench_dir / "teacher.json"
    df = pd.read_parquet(manifest)
    paths = list(df[df.split == "unlabelled"].path[: 2 * params.label.batch_size])
    t = LocalTeacher(tdir, params.teacher.threads)
    t.predict_paths(paths[:2], params.teacher.max_reason_tokens, params.teacher.top_k)  # warm-up
    t0 = time.perf_counter()
    preds = []
    for i in range(0, len(paths), params.label.batch_size):
        preds += t.predict_paths(paths[i:i + params.label.batch_size], params.teacher.max_reason_tokens,
                                 params.teacher.top_k)
    dt = time.perf_counter() - t0
    toks = sum(p["generated_tokens"] for p in preds) / len(preds)
    recs = [benchrec.record("teacher:label_images_per_s", len(paths) / dt, "img/s", ">= 10 (aim 20)",
                            f"LocalTeacher.predict_paths, batch {params.label.batch_size}, {len(paths)} images"),
            benchrec.record("teacher:generated_tokens_per_image", toks, "tokens", None, "same run"),
            benchrec.record("teacher:parameters", t.parameters(), "count", None,
                            "every parameter loaded at inference (LM incl. embeddings, projector, Lite0)")]
    stage_times = root / params.paths.bench_dir / "pipeline.json"
    if stage_times.exists():
        budget = {"stage:teacher_sft": "<= 150 s (README budget)", "stage:label": "<= 60 s (README budget)",
                  "stage:evaluate@teacher": "<= 60 s (README budget: evaluate + gate + release)"}
        for r in json.loads(stage_times.read_text())["records"]:
            if r["name"] in budget:
                recs.append(benchrec.record(f"teacher:{r['name']}_s", r["value"], "s", budget[r["name"]],
                                            "last edgeqa run (reports/bench/pipeline.json)"))
    benchrec.write(out, recs)
    print(f"teacher: {len(paths) / dt:.2f} img/s, {toks:.1f} tokens/image; wrote {out}")
    return len(paths) / dt

