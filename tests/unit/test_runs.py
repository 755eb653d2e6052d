"""Scheduled runs: ops.nightly's validation, a run's overrides written into params.yaml, the run's own checkout,
its name, and `dvc exp save` as the commit a release names."""

import shutil
import subprocess

import pytest
import yaml

from edgeqa import runs
from edgeqa.config import ParamsError, load_params, parse_params
from edgeqa.config.profiles import set_keys
from edgeqa.errors import StageError

from ..conftest import REPO

GIT = ["git", "-c", "user.email=t@example.invalid", "-c", "user.name=t"]


def _raw():
    return yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("key,value,expect", [
    ("cron", "0 2 * *", r"ops\.nightly\.cron: .*not a cron expression"),
    ("cron", "61 2 * * *", r"ops\.nightly\.cron: .*not a cron expression"),
    ("timezone", "Mars/Olympus", r"ops\.nightly\.timezone: .*not an IANA time zone"),
])
def test_a_bad_schedule_names_its_key_and_what_is_allowed(key, value, expect):
    raw = _raw()
    raw["ops"]["nightly"][key] = value
    with pytest.raises(ParamsError, match=expect):
        parse_params(raw)


def test_the_schedule_params_load_and_the_section_defaults_when_absent():
    raw = _raw()
    raw["ops"]["nightly"].update(cron="30 3 * * 1-5", timezone="Europe/Berlin")
    p = parse_params(raw)
    assert (p.ops.nightly.cron, p.ops.nightly.timezone) == ("30 3 * * 1-5", "Europe/Berlin")
    del raw["ops"]
    assert parse_params(raw).ops.lock_wait_s == 6 * 3600


def test_a_runs_overrides_are_written_like_dvc_exp_run_s_and_refused_by_the_profile_rules(tmp_path):
    f = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", f)
    changes = set_keys({"synth.seed": 11, "teacher.backend": "local"}, f, "the run's overrides")
    assert changes["synth.seed"][1] == 11
    assert load_params(f).synth.seed == 11
    before = f.read_bytes()
    for bad, msg in [({"paths.data_dir": "x"}, r"the run's overrides: paths\.data_dir: .*may not set paths"),
                     ({"gate.rules.min_auroc": 0.0}, r"gate\.rules\.min_auroc: .*gate\.overrides\.min_auroc"),
                     ({"synth.nope": 1}, r"synth\.nope: no such key"),
                     ({"synth.seed": "seven"}, r"synth\.seed")]:
        with pytest.raises(ParamsError, match=msg):
            set_keys(bad, f, "the run's overrides")
        assert f.read_bytes() == before, "a refused override leaves params.yaml as it was"


def _repo(path):
    path.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=path, check=True)
    (path / "params.yaml").write_text("a: 1\n")
    (path / "dvc.lock").write_text("schema: '2.0'\nstages:\n  ingest:\n    outs:\n    - path: data/ingest\n"
                                   "      md5: abc.dir\n")
    subprocess.run([*GIT, "add", "-A"], cwd=path, check=True)
    subprocess.run([*GIT, "commit", "-qm", "one"], cwd=path, check=True)
    return path


def test_a_checkout_is_a_clone_per_commit_reused_with_tracked_files_reset(tmp_path):
    src = _repo(tmp_path / "src")
    sha = runs.commit_of(src)
    work, got = runs.checkout(src, "HEAD", tmp_path / "checkouts")
    assert got == sha and work == tmp_path / "checkouts" / sha[:12] and runs.commit_of(work) == sha
    (work / "params.yaml").write_text("a: 2\n")  # a run's overrides
    (work / "output.bin").write_text("kept")  # an untracked output (DVC's, in a real project)
    again, _ = runs.checkout(src, sha[:8], tmp_path / "checkouts")
    assert again == work and (work / "params.yaml").read_text() == "a: 1\n" and (work / "output.bin").exists()
    assert (src / "params.yaml").read_text() == "a: 1\n", "the user's tree is never touched"
    assert not list((tmp_path / "checkouts").glob(".*tmp")), "no half-made clone is left behind"
    with pytest.raises(StageError, match=r"'nope' names no commit"):
        runs.checkout(src, "nope", tmp_path / "checkouts")


def test_a_runs_name_carries_profile_data_fingerprint_and_commit(tmp_path):
    src = _repo(tmp_path / "src")
    fp = runs.data_fingerprint(src)
    assert len(fp) == 8 and int(fp, 16) >= 0
    sha = runs.commit_of(src)
    assert runs.run_name("tiny", src, sha) == f"tiny-data-{fp}-{sha[:7]}"
    assert runs.run_name("tiny", src) == f"tiny-data-{fp}-{sha[:7]}"
    (src / "params.yaml").write_text("a: 3\n")
    assert runs.run_name("tiny", src).endswith("+dirty")
    lock = yaml.safe_load((src / "dvc.lock").read_text())
    lock["stages"]["ingest"]["outs"][0]["md5"] = "def.dir"  # new data: a new fingerprint
    (src / "dvc.lock").write_text(yaml.safe_dump(lock))
    assert runs.data_fingerprint(src) != fp
    (src / "dvc.lock").unlink()
    assert runs.data_fingerprint(src) == "new"


def test_exp_save_gives_head_for_an_unchanged_run_and_the_same_commit_for_the_same_run(tmp_path):
    src = _repo(tmp_path / "src")
    subprocess.run(["dvc", "init", "-q"], cwd=src, check=True)
    subprocess.run([*GIT, "commit", "-qm", "dvc"], cwd=src, check=True)
    head = runs.commit_of(src)
    assert runs.exp_save(src) == ("HEAD", head), "nothing changed: the run is HEAD, no experiment"
    (src / "params.yaml").write_text("a: 5\n")
    name, sha = runs.exp_save(src)
    assert name.startswith("run-") and sha != head
    assert subprocess.run(["git", "show", f"{sha}:params.yaml"], cwd=src, capture_output=True,
                          text=True).stdout == "a: 5\n"
    assert runs.exp_save(src) == (name, sha), "the same workspace saved again is the same experiment"
    assert runs.commit_of(src) == head, "HEAD does not move"
