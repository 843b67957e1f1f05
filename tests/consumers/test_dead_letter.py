"""The dead-letter producer on the real embedded broker: what a restart learns from the topic itself."""

from __future__ import annotations

import time

from consumers.connection import KafkaConnection
from consumers.dead_letter import DeadLetterProducer


def test_delivered_names_the_sources_whose_letters_the_topic_holds(kafka, unique):
    topic = f"{unique}.dlq"
    kafka.create_topics({topic: 2})
    producer = DeadLetterProducer(KafkaConnection(bootstrap=kafka.address), topic)
    try:
        before = int(time.time() * 1000)
        assert producer.delivered({}) == set()
        assert producer.delivered({"in:0:1": before}) == set()   # an empty topic
        for offset in range(3):
            producer.send(b"junk", [("slice", b"a")], "bad_bytes", "not safetensors", f"in:0:{offset}")
        producer.send(b"", [], "too_large", "over the limit", "in:1:9")
        # sent (two partitions of the topic, a reference among them), and one whose send never happened
        asked = {"in:0:2": before, "in:1:9": before, "in:0:7": before}
        assert producer.delivered(asked) == {"in:0:2", "in:1:9"}
        # read from the earliest note's time on (a minute's slack for the clock): notes made long after the
        # letters still find them, and a letter older than the slack is not looked for
        assert producer.delivered({"in:0:0": before + 30_000}) == {"in:0:0"}
        assert producer.delivered({"in:0:0": before + 3_600_000}) == set()
    finally:
        producer.close()
