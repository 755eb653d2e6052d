import shutil

import pytest
import yaml

from edgeqa.config import ParamsError, load_params, profiles

from ..conftest import REPO


def test_params_yaml_is_the_demo_profile():
    """params.yaml as committed holds the demo values, and demo covers every key another profile sets."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    demo = profiles.load_profile("demo", REPO)
    for key, value in demo.items():
        assert profiles.get_dotted(raw, key) == value, key
    for name in profiles.available(REPO):
        missing = set(profiles.load_profile(name, REPO)) - set(demo)
        assert not missing, f"profile {name} sets keys that demo does not restore: {missing}"


@pytest.mark.parametrize("name", ["tiny", "mtile", "full"])
def test_each_profile_applies_validates_and_reverts(tmp_path, name):
    p = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", p)
    changes = profiles.apply(name, p, REPO)
    assert changes, f"profile {name} changes nothing"
    applied = yaml.safe_load(p.read_text())
    for key, (_, new) in changes.items():
        assert profiles.get_dotted(applied, key) == new
    load_params(p)
    profiles.apply("demo", p, REPO)
    assert yaml.safe_load(p.read_text()) == yaml.safe_load((REPO / "params.yaml").read_text())


@pytest.mark.parametrize("first", ["tiny", "mtile", "full"])
@pytest.mark.parametrize("then", ["tiny", "mtile", "full"])
def test_profiles_apply_one_after_another(tmp_path, first, then):
    """DVC's override writer reformats params.yaml (flow lists become block lists, comments move); a second
    profile applied on that output must still give valid YAML with its values (CI once broke on tiny, then
    mtile emptying a list that carried a line-end comment)."""
    p = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", p)
    profiles.apply(first, p, REPO)
    profiles.apply(then, p, REPO)
    applied = yaml.safe_load(p.read_text())
    for key, value in profiles.load_profile(then, REPO).items():
        assert profiles.get_dotted(applied, key) == value, key
    load_params(p)
    profiles.apply("demo", p, REPO)
    assert yaml.safe_load(p.read_text()) == yaml.safe_load((REPO / "params.yaml").read_text())


def test_profile_may_not_set_paths(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "bad.yaml").write_text("paths.synth_dir: elsewhere\n")
    with pytest.raises(ParamsError, match=r"paths\.synth_dir: a profile may not set paths"):
        profiles.load_profile("bad", tmp_path)


def test_invalid_profile_value_leaves_params_untouched(tmp_path):
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "bad.yaml").write_text("synth.image_size: 8\n")
    p = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", p)
    before = p.read_bytes()
    with pytest.raises(ParamsError, match=r"synth\.image_size"):
        profiles.apply("bad", p, tmp_path)
    assert p.read_bytes() == before


def test_unknown_profile_and_unknown_key(tmp_path):
    with pytest.raises(ParamsError, match="unknown profile 'nope'"):
        profiles.load_profile("nope", REPO)
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "typo.yaml").write_text("synth.seeed: 1\n")
    with pytest.raises(ParamsError, match=r"synth\.seeed: no such key"):
        profiles.changed_keys("typo", REPO / "params.yaml", tmp_path)
