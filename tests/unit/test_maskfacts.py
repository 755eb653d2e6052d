import numpy as np
import pytest

from edgeqa.config import GRID_WORDS
from edgeqa.data.maskfacts import grid_word, mask_facts, reference_reason


@pytest.fixture
def cfg(params):
    return params.ingest.mask_facts


@pytest.mark.parametrize(("cy", "cx", "word"), [(5, 5, "upper left"), (5, 50, "top"), (5, 95, "upper right"),
                                                (50, 5, "left"), (50, 50, "center"), (50, 95, "right"),
                                                (95, 5, "lower left"), (95, 50, "bottom"), (95, 95, "lower right")])
def test_grid_words(cy, cx, word):
    assert grid_word(cy, cx, 100, 100) == word
    assert word in GRID_WORDS


def test_horizontal_dark_scratch(cfg):
    gray = np.full((100, 100), 150.0, np.float32)
    m = np.zeros((100, 100), bool)
    m[10:12, 5:40] = True
    gray[m] = 60
    f = mask_facts(m, gray, cfg)
    assert (f.location, f.shape, f.orientation, f.polarity, f.n_regions) == ("upper left", "elongated", "horizontal",
                                                                             "darker", 1)
    assert (f.bbox_x0, f.bbox_y0, f.bbox_x1, f.bbox_y1) == (5, 10, 40, 12)
    assert f.area_frac == pytest.approx(70 / 10000)
    assert f.size_class == "small"


def test_vertical_and_diagonal_and_compact_bright_regions(cfg):
    gray = np.full((100, 100), 100.0, np.float32)
    v = np.zeros((100, 100), bool)
    v[40:90, 80:82] = True
    assert mask_facts(v, gray, cfg).orientation == "vertical"
    d = np.eye(100, dtype=bool) | np.eye(100, k=1, dtype=bool)
    assert mask_facts(d, gray, cfg).orientation == "diagonal"
    two = np.zeros((100, 100), bool)
    two[45:55, 45:55] = True
    two[80:84, 10:14] = True
    g2 = gray.copy()
    g2[two] = 200
    f = mask_facts(two, g2, cfg)
    assert f.n_regions == 2 and f.polarity == "brighter"
    blob = np.zeros((100, 100), bool)
    blob[30:70, 30:70] = True
    fb = mask_facts(blob, gray, cfg)
    assert (fb.shape, fb.orientation, fb.size_class, fb.polarity) == ("compact", "none", "large", "similar")


def test_empty_mask_has_no_facts_and_shape_mismatch_fails(cfg):
    assert mask_facts(np.zeros((10, 10), bool), np.zeros((10, 10), np.float32), cfg) is None
    with pytest.raises(ValueError, match="differs"):
        mask_facts(np.ones((10, 10), bool), np.zeros((10, 12), np.float32), cfg)


def test_reference_reason_carries_more_than_type_and_location(cfg):
    gray = np.full((100, 100), 150.0, np.float32)
    m = np.zeros((100, 100), bool)
    m[10:12, 5:40] = True
    gray[m] = 60
    r = reference_reason("defective", "scratch", mask_facts(m, gray, cfg), ["scratch", "stain"])
    for word in ("scratch", "upper left", "small", "elongated", "horizontally", "darker", "one region", "0.7%"):
        assert word in r, (word, r)
    assert reference_reason("good", None, None, ["crack", "stain"]).startswith("no defect is visible")
    assert "crack or stain" in reference_reason("good", None, None, ["crack", "stain"])
    assert reference_reason("defective", "crack", None) == "crack defect: visible on the surface"
    assert reference_reason("defective", None, None) == "defect: visible on the surface"
