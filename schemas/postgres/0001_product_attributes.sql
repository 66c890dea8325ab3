-- attrstream PostgreSQL sink, migration 0001: the latest attributes of every product.
--
-- Applied by `attrstream serve` at start when [database] run_migrations = true (the default),
-- inside one transaction under an advisory lock, and recorded in attrstream_schema_migrations;
-- or by hand (`psql -f`), in which case record it too (see README "PostgreSQL sink").
-- Statements are idempotent (IF NOT EXISTS) so applying it twice is harmless.

CREATE TABLE IF NOT EXISTS product_attributes (
    -- The product (the output record's Kafka key): one row per product.
    product_id      text        PRIMARY KEY,
    -- The event whose attributes the row holds (consumers de-duplicate on it).
    event_id        text        NOT NULL,
    -- The event's own time; NULL when the producer sent none (such an event is older than any
    -- event with a time).
    event_time      timestamptz,
    -- When attrstream produced the attributes.
    processed_time  timestamptz NOT NULL,
    -- The model that produced them (name and version, e.g. a registry version).
    model_name      text        NOT NULL,
    model_version   text        NOT NULL,
    -- Size of the decoded (EXIF-oriented) image in pixels.
    image_width     integer     NOT NULL,
    image_height    integer     NOT NULL,
    -- Aggregated attributes, as in the Avro record: {"labels": [{"label", "max_score",
    -- "count"}], "main_object": {"label", "score", "detection_index", "area_fraction"} | null,
    -- "object_colours": [{"detection_index", "label", "colours": [{"name", "r", "g", "b",
    -- "fraction"}]}]}.
    attributes      jsonb       NOT NULL,
    -- Every detection, best first: [{"label", "label_id", "score", "box_px": {"x_min", "y_min",
    -- "x_max", "y_max"}, "box_norm": {...}}].
    detections      jsonb       NOT NULL,
    -- The input event's metadata map, unchanged.
    metadata        jsonb       NOT NULL DEFAULT '{}'::jsonb,
    -- When this row last changed (a redelivered or older event leaves it untouched).
    updated_at      timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE product_attributes IS
    'attrstream: latest detected attributes per product. Upsert rule: a row is replaced only by an '
    'event with a later (event_time, event_id) (NULL event_time first, event_id compared bytewise), '
    'or by the same event processed by a different model; redeliveries change nothing.';

-- "Which products show a cup?": attributes @> '{"labels": [{"label": "cup"}]}'.
CREATE INDEX IF NOT EXISTS product_attributes_attributes_idx
    ON product_attributes USING gin (attributes jsonb_path_ops);

-- Incremental readers ("what changed since my last sync?").
CREATE INDEX IF NOT EXISTS product_attributes_updated_at_idx
    ON product_attributes (updated_at);
