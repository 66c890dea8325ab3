"""Avro parity with an independent implementation (fastavro), for tests/avro_interop.rs.

    avro_reference.py check DIR   reads DIR/cases.json written by the Rust test: each case is a
                                  Confluent-framed value Rust encoded (file), its schema
                                  (product_image_event | product_attributes | dead_letter), the
                                  schema id in the header, and the record as Rust's serde JSON
                                  ("domain"). Checks the magic byte and id, decodes the body with
                                  fastavro against schemas/*.avsc, and compares with the domain
                                  record mapped to the Avro shape here (floats to 1e-6).
    avro_reference.py write DIR   writes ProductImageEvent bodies encoded by fastavro, with the
                                  current schema and with an older and a newer writer schema,
                                  plus the expected records as Rust serde JSON: DIR/cases.json,
                                  DIR/*.bin and the writer schemas DIR/*.avsc.

Exits non-zero with a list of differences when anything disagrees.
"""

import base64
import datetime
import io
import json
import math
import os
import sys

import fastavro

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEMAS = os.path.join(ROOT, "schemas")
NS = "io.attrstream."
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def load(name):
    return fastavro.schema.load_schema(os.path.join(SCHEMAS, name + ".avsc"))


def millis(value):
    """fastavro returns timestamp-millis as aware datetimes; compare as integer milliseconds."""
    if value is None or isinstance(value, int):
        return value
    return (value - EPOCH) // datetime.timedelta(milliseconds=1)


def b64(text):
    return base64.b64decode(text)


# --- Rust serde JSON (src/events/types.rs) -> Avro record shape (schemas/*.avsc) -------------


def event_to_avro(d):
    image = d["image"]
    if "inline" in image:
        image = (NS + "InlineImage", {"data": b64(image["inline"])})
    else:
        image = (NS + "ImageUri", {"uri": image["uri"]})
    return {
        "event_id": d["event_id"],
        "product_id": d["product_id"],
        "image": image,
        "content_type": d["content_type"],
        "metadata": d["metadata"],
        "event_time": d["event_time_ms"],
    }


def box(b):
    return {k: b[k] for k in ("x_min", "y_min", "x_max", "y_max")}


def attributes_to_avro(d):
    a = d["attributes"]
    main = a["main_object"]
    return {
        "event_id": d["event_id"],
        "product_id": d["product_id"],
        "model": {"name": d["model"]["name"], "version": d["model"]["version"]},
        "image_width": d["image_width"],
        "image_height": d["image_height"],
        "detections": [
            {
                "label": x["label"],
                "label_id": x["label_id"],
                "score": x["score"],
                "box_px": box(x["box_px"]),
                "box_norm": box(x["box_norm"]),
            }
            for x in d["detections"]
        ],
        "attributes": {
            "labels": [{"label": l["label"], "max_score": l["max_score"], "count": l["count"]} for l in a["labels"]],
            "main_object": None
            if main is None
            else {
                "label": main["label"],
                "score": main["score"],
                "detection_index": main["detection_index"],
                "area_fraction": main["area_fraction"],
            },
            "object_colours": [
                {
                    "detection_index": o["detection_index"],
                    "label": o["label"],
                    "colours": [
                        {"name": c["name"], "r": c["r"], "g": c["g"], "b": c["b"], "fraction": c["fraction"]}
                        for c in o["colours"]
                    ],
                }
                for o in a["object_colours"]
            ],
        },
        "timings": dict(d["timings"]),
        "event_time": d["event_time_ms"],
        "processed_time": d["processed_time_ms"],
        "metadata": d["metadata"],
    }


def dead_letter_to_avro(d):
    return {
        "original_key": None if d["original_key"] is None else b64(d["original_key"]),
        "original_value": b64(d["original_value"]),
        "source_topic": d["source_topic"],
        "source_partition": d["source_partition"],
        "source_offset": d["source_offset"],
        "event_id": d["event_id"],
        "product_id": d["product_id"],
        "error_kind": d["error_kind"],
        "error_message": d["error_message"],
        "failed_time": d["failed_time_ms"],
    }


TO_AVRO = {
    "product_image_event": event_to_avro,
    "product_attributes": attributes_to_avro,
    "dead_letter": dead_letter_to_avro,
}
TIME_FIELDS = {"event_time", "processed_time", "failed_time"}


def normalise(value, key=None):
    """Decoded record -> plain data: timestamps as ms, tuples (record name, record) kept."""
    if key in TIME_FIELDS:
        return millis(value)
    if isinstance(value, dict):
        return {k: normalise(v, k) for k, v in value.items()}
    if isinstance(value, tuple):
        return (value[0], normalise(value[1]))
    if isinstance(value, list):
        return [normalise(v) for v in value]
    return value


def compare(actual, expected, path, errors):
    if isinstance(expected, float) or isinstance(actual, float):
        ok = isinstance(actual, (int, float)) and isinstance(expected, (int, float))
        if not ok or not math.isclose(actual, expected, rel_tol=1e-6, abs_tol=1e-9):
            errors.append(f"{path}: {actual!r} != {expected!r}")
    elif isinstance(expected, dict):
        if not isinstance(actual, dict) or set(actual) != set(expected):
            errors.append(f"{path}: keys {sorted(actual) if isinstance(actual, dict) else actual!r} != {sorted(expected)}")
            return
        for k in expected:
            compare(actual[k], expected[k], f"{path}.{k}", errors)
    elif isinstance(expected, (list, tuple)):
        if type(actual) is not type(expected) or len(actual) != len(expected):
            errors.append(f"{path}: {actual!r} != {expected!r}")
            return
        for i, (a, e) in enumerate(zip(actual, expected)):
            compare(a, e, f"{path}[{i}]", errors)
    elif actual != expected or type(actual) is not type(expected):
        errors.append(f"{path}: {actual!r} != {expected!r}")


def check(directory):
    with open(os.path.join(directory, "cases.json")) as f:
        cases = json.load(f)
    schemas = {name: load(name) for name in TO_AVRO}
    errors = []
    for case in cases:
        name = case["name"]
        with open(os.path.join(directory, case["file"]), "rb") as f:
            value = f.read()
        if len(value) < 5 or value[0] != 0:
            errors.append(f"{name}: no Confluent magic byte: {value[:5]!r}")
            continue
        schema_id = int.from_bytes(value[1:5], "big")
        if schema_id != case["schema_id"]:
            errors.append(f"{name}: schema id {schema_id} != {case['schema_id']}")
        body = io.BytesIO(value[5:])
        record = fastavro.schemaless_reader(
            body,
            schemas[case["schema"]],
            None,
            return_record_name=True,
            return_record_name_override=True,
        )
        if body.tell() != len(value) - 5:
            errors.append(f"{name}: {len(value) - 5 - body.tell()} bytes left after the record")
        expected = TO_AVRO[case["schema"]](case["domain"])
        compare(normalise(record), expected, name, errors)
    if errors:
        sys.exit("fastavro disagrees with attrstream's encoding:\n" + "\n".join(errors))
    print(f"{len(cases)} values decoded by fastavro match")


# --- fastavro writes, Rust reads ------------------------------------------------------------


def older_event_schema():
    """The first draft of ProductImageEvent: no content_type, metadata or event_time."""
    current = json.load(open(os.path.join(SCHEMAS, "product_image_event.avsc")))
    old = dict(current)
    old["fields"] = [f for f in current["fields"] if f["name"] in ("event_id", "product_id", "image")]
    return old


def newer_event_schema():
    """A later, compatible ProductImageEvent: an extra field with a default and a third image
    branch at the end of the union (the evolution rules in schemas/README.md)."""
    current = json.load(open(os.path.join(SCHEMAS, "product_image_event.avsc")))
    new = json.loads(json.dumps(current))
    for f in new["fields"]:
        if f["name"] == "image":
            f["type"].append(
                {
                    "type": "record",
                    "name": "ImageRef",
                    "doc": "An image in a media store.",
                    "fields": [{"name": "store_id", "type": "string", "doc": "Id in the media store."}],
                }
            )
    new["fields"].append({"name": "channel", "type": "string", "default": "web", "doc": "Sales channel."})
    return new


def domain_event(event_id, product_id, image, content_type=None, metadata=None, event_time_ms=None):
    return {
        "event_id": event_id,
        "product_id": product_id,
        "image": image,
        "content_type": content_type,
        "metadata": metadata or {},
        "event_time_ms": event_time_ms,
    }


def write(directory):
    current = json.load(open(os.path.join(SCHEMAS, "product_image_event.avsc")))
    writers = {"current": current, "older": older_event_schema(), "newer": newer_event_schema()}
    parsed = {k: fastavro.parse_schema(v) for k, v in writers.items()}
    for k, v in writers.items():
        with open(os.path.join(directory, f"{k}.avsc"), "w") as f:
            json.dump(v, f)
    jpeg = bytes([0xFF, 0xD8, 0xFF, 0xE0]) + bytes(range(256)) + b"\x00" * 3
    inline = (NS + "InlineImage", {"data": jpeg})
    uri = (NS + "ImageUri", {"uri": "https://cdn.example.com/p/42.jpg?w=800"})
    inline_domain = {"inline": base64.b64encode(jpeg).decode()}
    uri_domain = {"uri": "https://cdn.example.com/p/42.jpg?w=800"}
    metadata = {"shop": "eu-1", "ünïcode": "✓ ß", "empty": ""}
    cases = [
        # name, writer, Avro record, expected domain record (None: decoding must fail), error kind
        (
            "inline_full",
            "current",
            {"event_id": "e-1", "product_id": "p-1", "image": inline, "content_type": "image/jpeg",
             "metadata": metadata, "event_time": 1700000000123},
            domain_event("e-1", "p-1", inline_domain, "image/jpeg", metadata, 1700000000123),
        ),
        (
            "inline_bare",
            "current",
            {"event_id": "e-2", "product_id": "p-2", "image": inline, "content_type": None, "metadata": {},
             "event_time": None},
            domain_event("e-2", "p-2", inline_domain),
        ),
        (
            "inline_empty",
            "current",
            {"event_id": "e-3", "product_id": "p-3", "image": (NS + "InlineImage", {"data": b""}),
             "content_type": None, "metadata": {}, "event_time": None},
            domain_event("e-3", "p-3", {"inline": ""}),
        ),
        (
            "uri_full",
            "current",
            {"event_id": "e-4", "product_id": "p-4", "image": uri, "content_type": "image/webp",
             "metadata": {"k": "v"}, "event_time": -1000},
            domain_event("e-4", "p-4", uri_domain, "image/webp", {"k": "v"}, -1000),
        ),
        (
            "uri_bare",
            "current",
            {"event_id": "e-5", "product_id": "p-5", "image": uri, "content_type": None, "metadata": {},
             "event_time": None},
            domain_event("e-5", "p-5", uri_domain),
        ),
        (
            "older_writer",
            "older",
            {"event_id": "e-6", "product_id": "p-6", "image": uri},
            domain_event("e-6", "p-6", uri_domain),
        ),
        (
            "newer_writer",
            "newer",
            {"event_id": "e-7", "product_id": "p-7", "image": inline, "content_type": "image/png",
             "metadata": {"a": "b"}, "event_time": 5, "channel": "app"},
            domain_event("e-7", "p-7", inline_domain, "image/png", {"a": "b"}, 5),
        ),
        (
            "newer_writer_new_branch",
            "newer",
            {"event_id": "e-8", "product_id": "p-8", "image": (NS + "ImageRef", {"store_id": "m-1"}),
             "content_type": None, "metadata": {}, "event_time": None, "channel": "app"},
            None,
        ),
        (
            "empty_event_id",
            "current",
            {"event_id": "", "product_id": "p-9", "image": uri, "content_type": None, "metadata": {},
             "event_time": None},
            None,
        ),
    ]
    manifest = []
    for name, writer, record, domain in cases:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, parsed[writer], record)
        with open(os.path.join(directory, name + ".bin"), "wb") as f:
            f.write(out.getvalue())
        # Read back with fastavro itself, so a mistake in this script shows up here.
        again = fastavro.schemaless_reader(io.BytesIO(out.getvalue()), parsed[writer], None, return_record_name=True)
        assert again["event_id"] == record["event_id"], name
        manifest.append({"name": name, "file": name + ".bin", "writer": writer + ".avsc", "expected": domain})
    with open(os.path.join(directory, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} fastavro-encoded events")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("check", "write"):
        sys.exit(__doc__)
    {"check": check, "write": write}[sys.argv[1]](sys.argv[2])
