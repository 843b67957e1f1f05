"""The applied-batch ledger: duplicates by offset and by batch id, per partition, through JSON."""

from consumers.ledger import AppliedLedger
from consumers.wire import BatchSource


def test_replays_are_recognised_by_offset_and_by_batch_id_within_their_partition():
    ledger = AppliedLedger()
    first = BatchSource("t", 0, 5)
    assert not ledger.already_applied(first, "b1")
    ledger.mark_applied(first, "b1")
    assert ledger.already_applied(first, "b1")                       # the same record again
    assert ledger.already_applied(BatchSource("t", 0, 3), None)      # an older offset
    assert ledger.already_applied(BatchSource("t", 0, 99), "b1")     # the same batch id at another offset
    assert not ledger.already_applied(BatchSource("t", 0, 6), "b2")
    assert not ledger.already_applied(BatchSource("t", 1, 0), "b1")  # another partition keeps its own ids
    assert ledger.next_offsets() == {"t:0": 6} and ledger.applied_offset("t:0") == 6
    assert ledger.knows_batch("t:0", "b1") and not ledger.knows_batch("t:1", "b1")


def test_a_dead_letter_advances_the_offset_without_an_id():
    ledger = AppliedLedger()
    ledger.mark_applied(BatchSource("t", 0, 0), None)
    assert ledger.next_offsets() == {"t:0": 1} and ledger.to_json()["t:0"]["batch_ids"] == []


def test_a_dead_lettered_batch_id_is_known_but_not_applied():
    ledger = AppliedLedger()
    ledger.mark_dead_lettered(BatchSource("t", 0, 4), "poison-1")
    assert ledger.next_offsets() == {"t:0": 5}
    assert ledger.knows_batch("t:0", "poison-1")  # the log-reset check recognises the record at offset 4
    assert not ledger.already_applied(BatchSource("t", 0, 9), "poison-1")
    restored = AppliedLedger.from_json(ledger.to_json())
    assert restored.knows_batch("t:0", "poison-1") and restored.to_json()["t:0"]["batch_ids"] == []
    assert AppliedLedger.from_json({"t:0": {"next_offset": 3, "batch_ids": ["a"]}}).knows_batch("t:0", "a")


def test_forgetting_a_partition_keeps_its_batch_ids():
    ledger = AppliedLedger()
    ledger.mark_applied(BatchSource("t", 0, 7), "b7")
    assert ledger.forget_partition("t:0", "log reset") == 8
    assert ledger.applied_offset("t:0") == 0
    assert not ledger.already_applied(BatchSource("t", 0, 0), "new")   # the refilled log is read again
    assert ledger.already_applied(BatchSource("t", 0, 0), "b7")        # but the applied batch is not


def test_json_round_trip_and_id_cap():
    ledger = AppliedLedger(max_ids=3)
    for i in range(5):
        ledger.mark_applied(BatchSource("t", 2, i), f"b{i}")
    assert ledger.to_json() == {"t:2": {"next_offset": 5, "batch_ids": ["b2", "b3", "b4"], "dead_lettered_ids": []}}
    twin = AppliedLedger.from_json(ledger.to_json(), max_ids=3)
    assert twin.to_json() == ledger.to_json()
    assert twin.knows_batch("t:2", "b4") and not twin.knows_batch("t:2", "b0")
