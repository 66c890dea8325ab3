"""Independent reader of attrstream's output for the end-to-end tests.

Consumes the given topics from the beginning with confluent-kafka (its own librdkafka build),
checks the Confluent framing (magic byte 0, 4-byte big-endian schema id) and decodes each
body with fastavro using the .avsc files in schemas/ -- no attrstream code involved.
Prints one JSON line per record and exits after COUNT records or TIMEOUT seconds.

usage: kafka_e2e_consume.py BROKERS SCHEMA_DIR COUNT TIMEOUT TOPIC=SCHEMA_FILE [TOPIC=SCHEMA_FILE ...]
"""
import base64
import io
import json
import struct
import sys
import time
import uuid

import fastavro
from confluent_kafka import Consumer


def main():
    brokers, schema_dir, count, timeout = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    schemas = {}
    for spec in sys.argv[5:]:
        topic, schema_file = spec.split("=", 1)
        with open(f"{schema_dir}/{schema_file}") as f:
            schemas[topic] = fastavro.parse_schema(json.load(f))
    consumer = Consumer({
        "bootstrap.servers": brokers,
        "group.id": f"e2e-reader-{uuid.uuid4()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": False,
    })
    consumer.subscribe(list(schemas))
    seen = 0
    deadline = time.time() + timeout
    while seen < count and time.time() < deadline:
        msg = consumer.poll(0.2)
        if msg is None or msg.error():
            continue
        value = msg.value()
        if len(value) < 5 or value[0] != 0:
            raise SystemExit(f"{msg.topic()}[{msg.partition()}]@{msg.offset()}: not Confluent-framed")
        (schema_id,) = struct.unpack(">I", value[1:5])
        record = fastavro.schemaless_reader(io.BytesIO(value[5:]), schemas[msg.topic()])
        print(json.dumps({
            "topic": msg.topic(),
            "partition": msg.partition(),
            "offset": msg.offset(),
            "key": msg.key().decode("utf-8", "replace") if msg.key() else None,
            "schema_id": schema_id,
            "record": record,
        }, default=lambda b: base64.b64encode(b).decode() if isinstance(b, bytes) else str(b)), flush=True)
        seen += 1
    consumer.close()


if __name__ == "__main__":
    main()
