import pytest

from mops.errors import UserError
from mops.prune.config import PruneConfig, parse_pattern


@pytest.mark.parametrize("text,expected", [("2:4", (2, 4)), ("4:8", (4, 8)), ("3:4", (3, 4)), ("7:8", (7, 8)), (" 1 : 2 ", (1, 2))])
def test_parse_pattern_accepts_n_of_m(text, expected):
    assert parse_pattern(text) == expected


@pytest.mark.parametrize("text", ["5:4", "0:4", "4:4", "2-4", "2:", "a:b", "-1:4", "2:4:8"])
def test_parse_pattern_rejects_with_the_bad_value_named(text):
    with pytest.raises(UserError, match="--pattern") as err:
        parse_pattern(text)
    assert repr(text) in str(err.value) and "2:4" in str(err.value)


@pytest.mark.parametrize("sparsity", [1.2, 0, 0.0, 1.0, -0.5])
def test_sparsity_outside_open_unit_interval_is_refused(sparsity):
    with pytest.raises(UserError, match=r"--sparsity .*between 0 and 1"):
        PruneConfig(method="magnitude", sparsity=sparsity)


def test_exactly_one_of_sparsity_or_pattern():
    with pytest.raises(UserError, match="exactly one"):
        PruneConfig(method="wanda", sparsity=0.5, pattern="2:4")
    with pytest.raises(UserError, match="exactly one"):
        PruneConfig(method="wanda")


def test_unknown_method_lists_the_accepted_ones():
    with pytest.raises(UserError, match="'obs'.*sparsegpt, wanda, magnitude"):
        PruneConfig(method="obs", sparsity=0.5)


def test_setting_names_and_target_sparsity():
    assert PruneConfig(method="magnitude", pattern="7:8").setting == "7:8"
    assert PruneConfig(method="magnitude", pattern="7:8").target_sparsity == 0.875
    assert PruneConfig(method="magnitude", sparsity=0.9).setting == "0.90"
    assert PruneConfig(method="magnitude", sparsity=0.75).to_dict()["pattern"] is None
