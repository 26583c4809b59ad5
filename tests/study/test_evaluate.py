"""The profile's page title names few runs one by one and many runs by configuration (their config fact)."""
from gradscope.study.evaluate import profile_title


def test_few_runs_are_named_one_by_one():
    assert profile_title({"plain20-bn": {}, "resnet20-bn": {}}) == "gradscope profile: plain20-bn, resnet20-bn"


def test_many_runs_are_counted_by_their_configuration_field():
    runs = {f"{m}-{b}-s{s}": {"config": f"{m}-{b}", "seed": s} for m in ("plain20", "resnet56") for b in ("bn", "nobn")
            for s in (0, 1, 2)}
    assert profile_title(runs) == "gradscope profile: 12 runs of plain20-bn, plain20-nobn, resnet56-bn, resnet56-nobn"


def test_a_long_list_of_configurations_is_cut():
    runs = {f"net{k}": {} for k in range(12)}
    title = profile_title(runs)
    assert title.startswith("gradscope profile: 12 runs of net0, net1") and title.endswith("and 4 more")


def test_configuration_comes_from_the_field_not_the_name():
    """A run whose name looks seeded but whose config says otherwise is counted by its config, never its name."""
    runs = {f"a-s{k}": {"config": f"c{k % 2}"} for k in range(6)}
    assert profile_title(runs) == "gradscope profile: 6 runs of c0, c1"
