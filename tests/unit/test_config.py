import os
import subprocess
import sys

import pytest
import yaml

from edgeqa.config import ParamsError, load_params, parse_params

from ..conftest import REPO


def _raw():
    return yaml.safe_load((REPO / "params.yaml").read_text())


def test_params_yaml_loads_into_typed_sections(params):
    assert params.synth.image_size == 256
    assert set(params.ingest.splits) == {"labelled", "unlabelled", "val", "test"}
    assert abs(sum(params.ingest.splits.values()) - 1) < 1e-9
    assert params.validate_cfg.min_per_class_split >= 1


def test_unknown_key_is_rejected_with_its_dotted_name():
    raw = _raw()
    raw["ingest"]["mask_facts"]["colour"] = 3
    with pytest.raises(ParamsError, match=r"ingest\.mask_facts\.colour: unknown key"):
        parse_params(raw)


@pytest.mark.parametrize(("path", "value", "expect"), [
    (("ingest", "splits"), {"labelled": 0.5, "unlabelled": 0.4, "val": 0.1, "test": 0.2},
     r"ingest\.splits: .*sum to 1\.0"),
    (("ingest", "splits"), {"train": 1.0}, r"ingest\.splits: .*exactly the keys"),
    (("synth", "image_size"), 20, r"synth\.image_size: .*greater than or equal to 64"),
    (("ingest", "adapter"), "coco", r"ingest\.adapter: .*'mvtec', 'magnetic_tile' or 'folder'"),
    (("synth", "contrast"), [0.5, 0.1], r"synth\.contrast: .*low < high"),
    (("ingest", "image_exts"), ["png"], r"ingest\.image_exts: .*start with a dot"),
    (("ingest", "mask_facts", "size_classes"), {"small": 0.5, "tiny": 0.1, "large": 1.0}, r"size_classes: .*increase"),
    (("student", "frozen_blocks"), 12, r"student: .*frozen_blocks \(12\) must be <= vision_blocks"),
    (("student", "aux_fields"), ["defect_type"], r"student: .*must include verdict"),
    (("student", "aux_fields"), ["verdict", "colour"],
     r"student\.aux_fields\[1\]: .*'verdict', 'defect_type' or 'location'"),
    (("student", "decoder", "hidden"), 190, r"student\.decoder: .*multiple of heads"),
    (("student", "decoder", "arch"), "mamba", r"student\.decoder\.arch: .*'llama' or 'gpt2'"),
    (("sft", "weights"), {"human": 1.0}, r"sft\.weights: .*exactly \{human"),
    (("sft", "min_teacher_confidence"), 0.3, r"sft\.min_teacher_confidence: .*greater than or equal to 0\.5"),
    (("teacher", "vision_tune_from"), 4, r"teacher: .*vision_head_steps > 0 reads the ImageNet output of Lite0"),
    (("sft", "paste", "renderers"), [["crack", "laser"]], r"sft\.paste\.renderers\[0\]\[1\]: .*'crack'"),
    (("distill", "top_k"), 50, r"distill\.top_k \(50\) must be <= teacher\.top_k"),
    (("evaluate", "models"), ["teacher", "Distill"], r"evaluate\.models: .*'Distill'.*lower-case"),
    (("evaluate", "models"), ["teacher", "sft", "sft"], r"evaluate\.models: .*unique"),
    (("distill", "weights"), {"human": 1.0, "teacher": -1.0}, r"distill\.weights: .*w >= 0"),
    (("sft", "paste", "contrast"), [0.5, 0.1], r"sft\.paste\.contrast: .*low < high"),
    (("release", "challenger", "max_latency_ratio"), 0, r"release\.challenger\.max_latency_ratio: .*greater than 0"),
])
def test_bad_values_name_the_key_and_what_is_allowed(path, value, expect):
    raw = _raw()
    node = raw
    for p in path[:-1]:
        node = node[p]
    node[path[-1]] = value
    with pytest.raises(ParamsError, match=expect):
        parse_params(raw)


def test_missing_section_and_bad_file(tmp_path):
    raw = _raw()
    del raw["validate"]
    with pytest.raises(ParamsError, match=r"validate: Field required"):
        parse_params(raw)
    bad = tmp_path / "p.yaml"
    bad.write_text("synth: [unclosed")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(bad)
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "none.yaml")


def test_no_work_at_import_time(tmp_path):
    """Importing every module creates no files, contacts nothing, and does not pull in GX."""
    code = ("import sys, edgeqa.config, edgeqa.config.profiles, edgeqa.config.datasets, edgeqa.io, edgeqa.stage, "
            "edgeqa.data.synth, edgeqa.data.ingest, edgeqa.data.validate, edgeqa.data.maskfacts, edgeqa.benchrec, "
            "edgeqa.answerer, edgeqa.vlm.scoring, edgeqa.vlm.convert, edgeqa.vlm.vision, edgeqa.stack, edgeqa.cli, "
            "edgeqa.project, edgeqa_runtime.schema, edgeqa_runtime.preprocess, edgeqa_runtime.session; "
            "assert 'torch' not in sys.modules, 'torch imported at import time'; "
            "assert 'great_expectations' not in sys.modules, 'GX imported at import time'; "
            "assert 'prefect' not in sys.modules, 'prefect imported by the CLI at import time'")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr
    assert list(tmp_path.iterdir()) == []


def test_no_tool_phones_home():
    """DVC analytics and its update check are off in the committed config; weed and Prefect flags are set."""
    import configparser

    cfg = configparser.ConfigParser()
    cfg.read(REPO / ".dvc" / "config")
    assert cfg["core"]["analytics"] == "false" and cfg["core"]["check_update"] == "false"
    from edgeqa.stack import Stack, StackConfig

    st = Stack(StackConfig.load(REPO, env={}))
    assert "-master.telemetry=false" in st._weed_cmd()
    assert st.prefect_env()["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
