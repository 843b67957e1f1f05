import torch

from daemon.learn.replay import Reservoir, SliceBuffers


def test_reservoir_stays_bounded_and_samples_the_whole_stream():
    gen = torch.Generator().manual_seed(0)
    r = Reservoir(capacity=100)
    for start in range(0, 10_000, 50):
        ids = torch.arange(start, start + 50)
        r.add(ids.view(-1, 1), ids, gen)
    assert len(r) == 100 and r.seen == 10_000
    # reservoir sampling keeps a uniform sample: late rows are as likely as early ones
    assert (r.y >= 5000).sum() > 25 and (r.y < 5000).sum() > 25


def test_slice_buffers_round_trip_through_tensors():
    gen = torch.Generator().manual_seed(0)
    b = SliceBuffers(replay_capacity=10, heldout_capacity=5)
    b.add("a", torch.ones(20, 2), torch.zeros(20, dtype=torch.long), torch.ones(7, 2), torch.ones(7, dtype=torch.long), gen)
    tensors, meta = b.to_tensors()
    c = SliceBuffers(10, 5)
    c.load_tensors(tensors, meta)
    assert len(c.replay["a"]) == 10 and c.replay["a"].seen == 20 and len(c.heldout["a"]) == 5
    x, y = c.sample_replay(8, gen)
    assert x.shape == (8, 2) and y.shape == (8,)


def test_replay_rehearses_every_slice_equally_however_much_it_sent():
    gen = torch.Generator().manual_seed(0)
    b = SliceBuffers(replay_capacity=1000, heldout_capacity=5)
    b.add("big", torch.zeros(900, 1), torch.zeros(900, dtype=torch.long), torch.zeros(1, 1),
          torch.zeros(1, dtype=torch.long), gen)
    b.add("small", torch.ones(10, 1), torch.ones(10, dtype=torch.long), torch.ones(1, 1),
          torch.ones(1, dtype=torch.long), gen)
    x, y = b.sample_replay(101, gen)
    assert len(y) == 101
    assert int((y == 1).sum()) in (50, 51)   # uniform over rows would give ~1


def test_replay_rehearses_the_other_slices_not_the_one_being_learned():
    gen = torch.Generator().manual_seed(0)
    b = SliceBuffers(replay_capacity=100, heldout_capacity=5)
    for label, name in ((0, "old"), (1, "new")):
        b.add(name, torch.zeros(50, 1), torch.full((50,), label), torch.zeros(1, 1), torch.zeros(1, dtype=torch.long), gen)
    _, y = b.sample_replay(40, gen, learning="new")
    assert (y == 0).all()
    _, y = SliceBuffers(100, 5, replay={"new": b.replay["new"]}).sample_replay(10, gen, learning="new")
    assert (y == 1).all()   # nothing else to rehearse: the slice's own past rows


def test_balanced_rows_gives_every_slice_the_same_share():
    from daemon.learn.replay import balanced_rows

    sets = {"big": (torch.zeros(900, 1), torch.zeros(900, dtype=torch.long)),
            "small": (torch.ones(10, 1), torch.ones(10, dtype=torch.long))}
    x, y = balanced_rows(sets, 100, torch.Generator().manual_seed(0))
    assert len(y) == 200 and int((y == 1).sum()) == 100 and int((y == 0).sum()) == 100
    _, y_small = balanced_rows({"small": sets["small"]}, 10, torch.Generator().manual_seed(0))
    assert len(y_small) == 10   # a slice with exactly enough rows gives each once
    again = balanced_rows(sets, 100, torch.Generator().manual_seed(0))
    assert torch.equal(again[0], x)   # the generator decides
    assert balanced_rows({}, 10, torch.Generator()) is None


def test_other_learners_slices_are_rehearsed_as_equal_shares_but_never_held_as_this_learners():
    gen = torch.Generator().manual_seed(0)
    b = SliceBuffers(replay_capacity=100, heldout_capacity=10)
    b.add("a", torch.zeros(30, 2), torch.zeros(30, dtype=torch.long), torch.zeros(3, 2),
          torch.zeros(3, dtype=torch.long), gen)
    b.others = {"b": (torch.ones(500, 2), torch.ones(500, dtype=torch.long)),
                "a": (torch.full((9, 2), 7.0), torch.full((9,), 7, dtype=torch.long))}   # "a" is held here
    _, y = b.sample_replay(40, gen, learning="c")
    assert (y == 0).sum() == 20 and (y == 1).sum() == 20 and not (y == 7).any()   # its own "a" wins
    _, y = b.sample_replay(40, gen, learning="a")
    assert (y == 1).all()                     # learning "a": rehearsal is the other slices, "b" here
    tensors, meta = b.to_tensors()
    assert set(b.replay_sets()) == {"a"} and not any(".b." in k for k in tensors)   # never checkpointed
