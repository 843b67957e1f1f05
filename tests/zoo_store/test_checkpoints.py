import pytest
import torch

from zoo_store.checkpoints import CheckpointStore, CorruptCheckpoint, InFlightMarker
from zoo_store.keys import Keys


def test_checkpoint_round_trip_and_corruption_detected(redis_client, unique):
    store = CheckpointStore(redis_client, Keys(unique))
    assert store.load() is None
    store.save({"seq": 3, "applied_offsets": {"t:0": 12}}, {"w": torch.arange(6.0).view(2, 3)})
    meta, tensors = store.load()
    assert meta["applied_offsets"] == {"t:0": 12} and meta["seq"] == 3
    assert torch.equal(tensors["w"], torch.arange(6.0).view(2, 3))
    redis_client.set(Keys(unique).checkpoint_tensors, b"truncated")
    with pytest.raises(CorruptCheckpoint):
        store.load()


def test_in_flight_marker_round_trip_clear_and_unreadable(redis_client, unique):
    marker = InFlightMarker(redis_client, Keys(unique))
    assert marker.read() is None
    marker.mark("t:0:7", 1)
    got = marker.read()
    assert (got.source, got.crashes) == ("t:0:7", 1) and got.since
    marker.clear()
    assert marker.read() is None
    redis_client.set(Keys(unique).checkpoint_inflight, b"{not json")
    assert marker.read() is None  # treated as absent: at worst one more crash before the loop is seen


def test_dead_letter_log_notes_sends_records_them_and_a_checkpoint_trims_both(redis_client, unique):
    from zoo_store.checkpoints import DeadLetterLog

    log = DeadLetterLog(redis_client, Keys(unique))
    log.sending("t:0:3", 1000)
    log.sending("t:0:8", 2000)
    assert log.unsure() == {"t:0:3": 1000, "t:0:8": 2000} and log.sources() == set()
    log.record("t:0:3", "bad_bytes")   # acknowledged: no longer unsure
    assert log.sources() == {"t:0:3"} and log.unsure() == {"t:0:8": 2000}
    log.trim({"t:0": 9})   # a checkpoint past both
    assert log.sources() == set() and log.unsure() == {}
    log.sending("t:0:12", 3000)
    log.trim({"t:0": 12, "t:1": 99})   # not past it
    assert log.unsure() == {"t:0:12": 3000}
