"""``filial bench cl``'s baseline pool: where and in what order the runs happen must not change what
they measure. The worker processes give the matrices the serial in-process runs give; a failing run
is an error where its result is read, and its worker goes on; the plan picks the epochs on the first
seed. Tiny tabular streams (no dataset, no servers): seconds, most of them importing Avalanche."""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from benchmarks.cl_baselines import BASELINES, BaselineRun, Plan, Spec, Task, pool

SPEC = Spec(stream="tabular", dataset=None, rows_per_slice=60, data_type="tabular", lr=1e-3, batch_size=16,
            device="cpu", ewc_lambda=100.0, lwf_alpha=1.0, lwf_temperature=2.0)


def _matrices(runner, names=BASELINES) -> dict[str, list[list[list[float]]]]:
    plans = {n: Plan(runner, Task(SPEC, n, 0, 0, filial_rows=150), seeds=[0, 1], epochs=[1, 2]) for n in names}
    return {n: [r.matrix for r in p.runs()] + [p.first[e].result().matrix for e in (1, 2)] for n, p in plans.items()}


def test_worker_processes_give_the_serial_matrices_and_survive_a_failing_run():
    pytest.importorskip("avalanche")
    with pool(1) as runner:
        serial = _matrices(runner)
    with pool(2) as runner:
        bad = runner.submit(Task(SPEC, "nonsense", 1, 0, 150))
        assert _matrices(runner) == serial  # exactly: every float, every contender, both seeds and settings
        with pytest.raises(RuntimeError, match="unknown baseline 'nonsense'"):
            bad.result()  # raised where it is read; both workers went on with the others
    assert len(serial["naive"][0]) == 4 and len(serial["joint"][0]) == 1


class _Canned:
    """A pool whose runs score what the test says, by (epochs, seed)."""

    def __init__(self, scores: dict[tuple[int, int], float]) -> None:
        self.scores, self.asked = scores, []

    def submit(self, task: Task) -> Future:
        self.asked.append((task.epochs, task.seed))
        future: Future = Future()
        future.set_result(BaselineRun([[self.scores[task.epochs, task.seed]]], [0], 0.0, 0, 0))
        return future


def test_the_plan_runs_the_other_seeds_at_the_first_seeds_best_epochs():
    runner = _Canned({(2, 0): 0.5, (5, 0): 0.7, (20, 0): 0.7, (5, 1): 0.6, (5, 2): 0.8})
    plan = Plan(runner, Task(SPEC, "naive", 0, 0, 150), seeds=[0, 1, 2], epochs=[2, 5, 20])
    assert plan.best() == 5  # a tie goes to the earlier setting
    assert [r.matrix[0][0] for r in plan.runs()] == [0.7, 0.6, 0.8]
    assert runner.asked == [(2, 0), (5, 0), (20, 0), (5, 1), (5, 2)]


def test_the_longest_runs_go_first():
    image = Spec(**{**SPEC.__dict__, "stream": "split", "dataset": "mnist5k", "data_type": "image"})
    assert Task(image, "gdumb_filial", 20, 0, 4000).cost() > Task(image, "replay500", 20, 0, 4000).cost() \
        > Task(image, "naive", 20, 0, 4000).cost() > Task(image, "naive", 5, 0, 4000).cost()
    assert Task(SPEC, "gdumb_filial", 20, 0, 3200).cost() < Task(image, "naive", 5, 0, 4000).cost()
