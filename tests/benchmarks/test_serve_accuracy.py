"""``filial bench serve`` (a), small: the tabular stream cut to 300-row slices (seconds), the
result's shape, and the ``served`` mode answering exactly as the served model alone does."""

from __future__ import annotations

import argparse
import json

from benchmarks import serve_accuracy
from daemon.serve.weighting import MODES


def test_tabular_accuracy_by_mode_has_the_shape_serve_bench_joins():
    parser = argparse.ArgumentParser()
    serve_accuracy.add_arguments(parser)
    out = serve_accuracy.main(parser.parse_args(["--streams", "tabular", "--rows-per-slice", "300"]))
    json.dumps(out)                                             # one JSON line
    assert set(out["accuracy"]) == {"tabular"} and set(out["accuracy"]["tabular"]) == set(MODES)
    assert all(0.0 <= a <= 1.0 for a in out["accuracy"]["tabular"].values())
    assert isinstance(out["members"]["tabular"], int) and out["members"]["tabular"] >= 0
    (run,) = out["runs"]
    assert run["accuracy"]["served"] == run["served_model_accuracy"]    # the served mode is the served model
    assert run["test_rows"] == 4 * 60                                   # every slice's test rows, once
    assert set(run["per_slice"]["route"]) == {"base", "move1", "move2", "swap"}
    assert out["oracle"]["tabular"] >= run["served_model_accuracy"]      # per slice the best member, served included
    assert "no_stream_below_served_by_1pt" in out["targets"] and out["conflicting"] is None
