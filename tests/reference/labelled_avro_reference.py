"""LabelledImage Avro parity with an independent implementation (fastavro), for tests/labelled_data.rs.

    labelled_avro_reference.py check DIR   reads DIR/cases.json written by the Rust test: each case is a
                                           Confluent-framed value Rust encoded (file), the schema id in
                                           its header, and the record as Rust's serde JSON ("domain").
                                           Checks the framing, decodes the body with fastavro against
                                           schemas/labelled_image.avsc (no bytes may be left over) and
                                           compares with the domain record mapped to the Avro shape.
    labelled_avro_reference.py write DIR   writes LabelledImage bodies encoded by fastavro with the
                                           current schema, an older draft (no metadata / event_time,
                                           no iscrowd in boxes) and a newer one (an added field), plus
                                           the expected records as Rust serde JSON (null: decoding must
                                           fail): DIR/cases.json, DIR/*.bin and DIR/*.avsc.

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
SCHEMA_FILE = os.path.join(ROOT, "schemas", "labelled_image.avsc")
NS = "io.attrstream."
EPOCH = datetime.datetime(1970, 1, 1, tzinfo=datetime.timezone.utc)


def millis(value):
    """fastavro returns timestamp-millis as aware datetimes; compare as integer milliseconds."""
    if value is None or isinstance(value, int):
        return value
    return (value - EPOCH) // datetime.timedelta(milliseconds=1)


def to_avro(d):
    """Rust serde JSON of LabelledImage (src/events/labelled.rs) -> the Avro record shape."""
    image = d["image"]
    if "inline" in image:
        image = (NS + "InlineImage", {"data": base64.b64decode(image["inline"])})
    else:
        image = (NS + "ImageUri", {"uri": image["uri"]})
    return {
        "product_id": d["product_id"],
        "image": image,
        "width": d["width"],
        "height": d["height"],
        "annotations": [
            {k: a[k] for k in ("x1", "y1", "x2", "y2", "label", "iscrowd")} for a in d["annotations"]
        ],
        "split": d["split"],
        "label_source": d["label_source"],
        "event_id": d["event_id"],
        "event_time": d["event_time_ms"],
        "metadata": d["metadata"],
    }


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
    schema = fastavro.schema.load_schema(SCHEMA_FILE)
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
            body, schema, None, return_record_name=True, return_record_name_override=True
        )
        if body.tell() != len(value) - 5:
            errors.append(f"{name}: {len(value) - 5 - body.tell()} bytes left after the record")
        record["event_time"] = millis(record["event_time"])
        compare(record, to_avro(case["domain"]), name, errors)
    if errors:
        sys.exit("fastavro disagrees with attrstream's LabelledImage encoding:\n" + "\n".join(errors))
    print(f"{len(cases)} LabelledImage values decoded by fastavro match")


def older_schema(current):
    """A first draft: no metadata or event_time, boxes without iscrowd."""
    old = json.loads(json.dumps(current))
    old["fields"] = [f for f in old["fields"] if f["name"] not in ("metadata", "event_time")]
    for f in old["fields"]:
        if f["name"] == "annotations":
            items = f["type"]["items"]
            items["fields"] = [x for x in items["fields"] if x["name"] != "iscrowd"]
    return old


def newer_schema(current):
    """A later, compatible version: an added field with a default."""
    new = json.loads(json.dumps(current))
    new["fields"].append({"name": "annotator", "type": "string", "default": "", "doc": "Who drew the boxes."})
    return new


def domain(product_id, image, annotations, width=None, height=None, split=None, label_source="human",
           event_id=None, event_time_ms=None, metadata=None):
    return {
        "product_id": product_id,
        "image": image,
        "width": width,
        "height": height,
        "annotations": annotations,
        "split": split,
        "label_source": label_source,
        "event_id": event_id,
        "event_time_ms": event_time_ms,
        "metadata": metadata or {},
    }


def box(x1, y1, x2, y2, label, iscrowd=None):
    return {"x1": x1, "y1": y1, "x2": x2, "y2": y2, "label": label, "iscrowd": iscrowd}


def write(directory):
    current = json.load(open(SCHEMA_FILE))
    writers = {"current": current, "older": older_schema(current), "newer": newer_schema(current)}
    parsed = {k: fastavro.parse_schema(v) for k, v in writers.items()}
    for k, v in writers.items():
        with open(os.path.join(directory, f"{k}.avsc"), "w") as f:
            json.dump(v, f)
    png = b"\x89PNG\r\n\x1a\n" + bytes(range(256))
    inline = (NS + "InlineImage", {"data": png})
    inline_domain = {"inline": base64.b64encode(png).decode()}
    uri = (NS + "ImageUri", {"uri": "s3://bucket/labelled/p-1.jpg"})
    uri_domain = {"uri": "s3://bucket/labelled/p-1.jpg"}
    boxes = [box(1.5, 2.25, 100.0, 80.125, "cup", False), box(0.0, 0.0, 0.0, 10.0, "dining table", True),
             box(3.0, 4.0, 5.0, 6.0, "ünï ✓")]
    cases = [
        # name, writer, Avro record, expected domain record (None: decoding must fail)
        (
            "inline_full",
            "current",
            {"product_id": "p-1", "image": inline, "width": 640, "height": 480, "annotations": boxes,
             "split": "validation", "label_source": "coco-import", "event_id": "e-1",
             "event_time": 1700000000123, "metadata": {"file_name": "a.png", "ü": "✓"}},
            domain("p-1", inline_domain, boxes, 640, 480, "validation", "coco-import", "e-1", 1700000000123,
                   {"file_name": "a.png", "ü": "✓"}),
        ),
        (
            "uri_bare",
            "current",
            {"product_id": "p-2", "image": uri, "width": None, "height": None, "annotations": [],
             "split": None, "label_source": "human", "event_id": None, "event_time": None, "metadata": {}},
            domain("p-2", uri_domain, []),
        ),
        (
            "test_split",
            "current",
            {"product_id": "p-3", "image": uri, "width": 1, "height": 1, "annotations": [box(0.0, 0.0, 1.0, 1.0, "x")],
             "split": "test", "label_source": "model", "event_id": None, "event_time": -5, "metadata": {}},
            domain("p-3", uri_domain, [box(0.0, 0.0, 1.0, 1.0, "x")], 1, 1, "test", "model", None, -5),
        ),
        (
            "older_writer",
            "older",
            {"product_id": "p-4", "image": uri, "width": 10, "height": None,
             "annotations": [{"x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0, "label": "cup"}],
             "split": "train", "label_source": "human", "event_id": "e-4"},
            domain("p-4", uri_domain, [box(1.0, 2.0, 3.0, 4.0, "cup")], 10, None, "train", "human", "e-4"),
        ),
        (
            "newer_writer",
            "newer",
            {"product_id": "p-5", "image": inline, "width": None, "height": None, "annotations": boxes[:1],
             "split": None, "label_source": "synthetic", "event_id": None, "event_time": 7, "metadata": {},
             "annotator": "alice"},
            domain("p-5", inline_domain, boxes[:1], label_source="synthetic", event_time_ms=7),
        ),
        (
            "inverted_box",
            "current",
            {"product_id": "p-6", "image": uri, "width": None, "height": None,
             "annotations": [box(10.0, 0.0, 5.0, 1.0, "cup")], "split": None, "label_source": "human",
             "event_id": None, "event_time": None, "metadata": {}},
            None,
        ),
        (
            "empty_product_id",
            "current",
            {"product_id": "", "image": uri, "width": None, "height": None, "annotations": [], "split": None,
             "label_source": "human", "event_id": None, "event_time": None, "metadata": {}},
            None,
        ),
    ]
    manifest = []
    for name, writer, record, expected in cases:
        out = io.BytesIO()
        fastavro.schemaless_writer(out, parsed[writer], record)
        with open(os.path.join(directory, name + ".bin"), "wb") as f:
            f.write(out.getvalue())
        again = fastavro.schemaless_reader(io.BytesIO(out.getvalue()), parsed[writer], None)
        assert again["product_id"] == record["product_id"], name
        manifest.append({"name": name, "file": name + ".bin", "writer": writer + ".avsc", "expected": expected})
    with open(os.path.join(directory, "cases.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    print(f"wrote {len(manifest)} fastavro-encoded LabelledImage records")


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("check", "write"):
        sys.exit(__doc__)
    {"check": check, "write": write}[sys.argv[1]](sys.argv[2])
