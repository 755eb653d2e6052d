"""edgeqa: turn a vision-language teacher into a small, gated, edge-ready defect inspector.

The library, by domain: `config` (params, profiles, dataset locations), `data` (synthetic data, ingestion,
validation), `vlm` (the vision backbone, constrained scoring, the LLaVA-style model), `teacher`, `student`,
`evaluation`; `answerer` (the one interface every model answers through), `stack` (the local SeaweedFS +
Prefect), `cli`. Stage entry points live in the project's `tasks/`, flows in its `flows/`; the edge runtime is
the separate, torch-free `edgeqa_runtime`. Nothing here does work at import time.
"""

__version__ = "0.1.0"
