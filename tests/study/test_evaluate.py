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


def test_a_run_stopped_part_way_has_no_final_loss_beside_a_finished_one(one_thread):
    """A study stopped during its second run: that run's mean loss over the steps it reached was set beside the
    first run's final loss, as if both had trained as long, and fed the training claims. Only runs that ran every
    planned step make the final losses now; the loss table says the other stopped early."""
    from gradscope.data import synthetic
    from gradscope.render.tables import loss_rows
    from gradscope.study.evaluate import evaluate
    from gradscope.study.runs import Settings, run_study
    from gradscope.study.specs import zoo_spec

    settings = Settings(steps=6, batch_size=8, every=2, init_batches=1, image_size=8, workers=1)
    specs = [zoo_spec("plain", depth=8, seed=0), zoo_spec("plain", depth=8, seed=1)]
    seen = []

    def stop_in_the_second_run(phase, n, run):
        seen.append(run)
        if run == specs[1].name and seen.count(run) == 4:  # Ctrl-C after its third training step
            raise KeyboardInterrupt

    study = run_study(specs, synthetic(n_train=64, n_test=1, image_size=8, seed=0)[0], settings,
                      on_step=stop_in_the_second_run)
    assert study.interrupted and set(study.losses["run"]) == {s.name for s in specs}
    results = evaluate(study, settings)
    assert list(results.final_losses) == [specs[0].name]
    header, row = loss_rows(results)
    assert row[1].endswith("(n=1)") and row[3] == f"{specs[1].name} (stopped early)"
