"""DVC stage entry points, and nothing else: one file per stage in dvc.yaml, each a thin main() that parses
`--params` and the paths dvc.yaml passes, reads its own params sections, and calls one `edgeqa` function.
These files never import each other, Prefect or `flows` (an import-linter contract checks it)."""
