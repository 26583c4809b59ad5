"""The profile's page title names few runs one by one and many runs by configuration."""
from gradscope.study.results import profile_title


def test_few_runs_are_named_one_by_one():
    assert profile_title({"plain20-bn": {}, "resnet20-bn": {}}) == "gradscope profile: plain20-bn, resnet20-bn"


def test_many_runs_are_counted_by_configuration_without_seed_suffixes():
    runs = {f"{m}-{b}{s}": {} for m in ("plain20", "resnet56") for b in ("bn", "nobn") for s in ("", "-s1", "-s2")}
    assert profile_title(runs) == "gradscope profile: 12 runs of plain20-bn, plain20-nobn, resnet56-bn, resnet56-nobn"


def test_a_long_list_of_configurations_is_cut():
    runs = {f"net{k}": {} for k in range(12)}
    title = profile_title(runs)
    assert title.startswith("gradscope profile: 12 runs of net0, net1") and title.endswith("and 4 more")
