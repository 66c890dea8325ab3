"""Minimal reader for TensorFlow's frozen GraphDef protobuf (no TensorFlow, no protobuf package).

Decodes just the fields the SSD converter needs:
  GraphDef.node (1) -> NodeDef{name 1, op 2, input 3, device 4, attr 5 (map<string, AttrValue>)}
  AttrValue{list 1, s 2, i 3, f 4, b 5, type 6, shape 7, tensor 8}
  TensorProto{dtype 1, tensor_shape 2, tensor_content 4, float_val 5, double_val 6,
              int_val 7, string_val 8, int64_val 10, bool_val 11}
  TensorShapeProto{dim 2 -> Dim{size 1}, unknown_rank 3}
Tensors are returned as numpy arrays with TensorFlow's own layout (e.g. Conv2D HWIO).
"""

import struct

import numpy as np

# tensorflow/core/framework/types.proto
DTYPES = {
    1: np.float32, 2: np.float64, 3: np.int32, 4: np.uint8, 5: np.int16, 6: np.int8,
    7: object, 9: np.int64, 10: np.bool_, 19: np.float16,
}


def _varint(buf, pos):
    result = 0
    shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7


def _fields(buf):
    """Yields (field_number, wire_type, value) for one message; value is int or memoryview."""
    pos = 0
    end = len(buf)
    while pos < end:
        key, pos = _varint(buf, pos)
        field, wt = key >> 3, key & 7
        if wt == 0:
            val, pos = _varint(buf, pos)
        elif wt == 1:
            val = buf[pos:pos + 8]
            pos += 8
        elif wt == 2:
            n, pos = _varint(buf, pos)
            val = buf[pos:pos + n]
            pos += n
        elif wt == 5:
            val = buf[pos:pos + 4]
            pos += 4
        else:
            raise ValueError(f"unsupported wire type {wt}")
        yield field, wt, val


def _signed64(v):
    return v - (1 << 64) if v >= (1 << 63) else v


def _packed_varints(val, wt):
    if wt == 0:
        return [val]
    out = []
    pos = 0
    while pos < len(val):
        v, pos = _varint(val, pos)
        out.append(v)
    return out


def parse_shape(buf):
    dims = []
    unknown = False
    for f, wt, v in _fields(buf):
        if f == 2:
            size = 0
            for f2, _, v2 in _fields(v):
                if f2 == 1:
                    size = _signed64(v2)
            dims.append(size)
        elif f == 3:
            unknown = bool(v)
    return None if unknown else dims


def parse_tensor(buf):
    dtype = None
    shape = []
    content = None
    floats, doubles, ints, int64s, bools, strings = [], [], [], [], [], []
    for f, wt, v in _fields(buf):
        if f == 1:
            dtype = v
        elif f == 2:
            shape = parse_shape(v)
        elif f == 4:
            content = bytes(v)
        elif f == 5:
            if wt == 2:
                floats.extend(struct.unpack(f"<{len(v) // 4}f", v))
            else:
                floats.append(struct.unpack("<f", v)[0])
        elif f == 6:
            if wt == 2:
                doubles.extend(struct.unpack(f"<{len(v) // 8}d", v))
            else:
                doubles.append(struct.unpack("<d", v)[0])
        elif f == 7:
            ints.extend(_signed64(x) for x in _packed_varints(v, wt))
        elif f == 8:
            strings.append(bytes(v))
        elif f == 10:
            int64s.extend(_signed64(x) for x in _packed_varints(v, wt))
        elif f == 11:
            bools.extend(bool(x) for x in _packed_varints(v, wt))
    np_dtype = DTYPES.get(dtype)
    if np_dtype is None:
        raise ValueError(f"unsupported tensor dtype {dtype}")
    count = int(np.prod(shape)) if shape else 1
    if np_dtype is object:
        arr = np.array(strings, dtype=object)
        return arr.reshape(shape) if arr.size == count else arr
    if content is not None:
        arr = np.frombuffer(content, dtype=np.dtype(np_dtype).newbyteorder("<")).astype(np_dtype)
    else:
        vals = {np.float32: floats, np.float64: doubles, np.int64: int64s, np.bool_: bools}.get(np_dtype, ints)
        arr = np.array(vals, dtype=np_dtype)
        if arr.size == 0:
            arr = np.zeros(count, dtype=np_dtype)
        elif arr.size < count:  # TF repeats the last value to fill the shape
            arr = np.concatenate([arr, np.full(count - arr.size, arr[-1], dtype=np_dtype)])
    return arr.reshape(shape)


def parse_attr_value(buf):
    for f, wt, v in _fields(buf):
        if f == 1:
            out = {"list": {}}
            lst = out["list"]
            for f2, wt2, v2 in _fields(v):
                if f2 == 2:
                    lst.setdefault("s", []).append(bytes(v2).decode("utf-8", "replace"))
                elif f2 == 3:
                    lst.setdefault("i", []).extend(_signed64(x) for x in _packed_varints(v2, wt2))
                elif f2 == 4:
                    if wt2 == 2:
                        lst.setdefault("f", []).extend(struct.unpack(f"<{len(v2) // 4}f", v2))
                    else:
                        lst.setdefault("f", []).append(struct.unpack("<f", v2)[0])
                elif f2 == 6:
                    lst.setdefault("type", []).extend(_packed_varints(v2, wt2))
                elif f2 == 7:
                    lst.setdefault("shape", []).append(parse_shape(v2))
            return out
        if f == 2:
            return {"s": bytes(v).decode("utf-8", "replace")}
        if f == 3:
            return {"i": _signed64(v)}
        if f == 4:
            return {"f": struct.unpack("<f", v)[0]}
        if f == 5:
            return {"b": bool(v)}
        if f == 6:
            return {"type": v}
        if f == 7:
            return {"shape": parse_shape(v)}
        if f == 8:
            return {"tensor": parse_tensor(v)}
    return {"list": {}}  # an empty AttrValue is an empty list


class Node:
    __slots__ = ("name", "op", "inputs", "attr")

    def __init__(self, name, op, inputs, attr):
        self.name, self.op, self.inputs, self.attr = name, op, inputs, attr

    def __repr__(self):
        return f"Node({self.name!r}, {self.op!r}, {self.inputs!r})"


def parse_node(buf):
    name, op, inputs, attr = "", "", [], {}
    for f, wt, v in _fields(buf):
        if f == 1:
            name = bytes(v).decode()
        elif f == 2:
            op = bytes(v).decode()
        elif f == 3:
            inputs.append(bytes(v).decode())
        elif f == 5:
            key, value = None, None
            for f2, _, v2 in _fields(v):
                if f2 == 1:
                    key = bytes(v2).decode()
                elif f2 == 2:
                    value = v2
            attr[key] = parse_attr_value(value) if value is not None else {"list": {}}
    return Node(name, op, inputs, attr)


def read_graph(path):
    """Returns the GraphDef's nodes as an ordered dict name -> Node."""
    with open(path, "rb") as fh:
        data = memoryview(fh.read())
    nodes = {}
    for f, wt, v in _fields(data):
        if f == 1:
            node = parse_node(v)
            nodes[node.name] = node
    return nodes


def const_value(nodes, name):
    """The value of a Const node (following Identity nodes), as a numpy array."""
    name = name.split(":")[0].lstrip("^")
    node = nodes[name]
    while node.op == "Identity":
        node = nodes[node.inputs[0].split(":")[0]]
    if node.op != "Const":
        raise ValueError(f"{name} is a {node.op}, not a Const")
    return node.attr["value"]["tensor"]


# ---------------------------------------------------------------------------------------------
# A tiny float32 evaluator for constant subgraphs (the anchor generator and similar), following
# TensorFlow's op semantics closely enough for the ops that occur there. Not a general runtime.
# ---------------------------------------------------------------------------------------------

def _strided_slice(x, begin, end, strides, attr):
    bm = attr.get("begin_mask", {}).get("i", 0)
    em = attr.get("end_mask", {}).get("i", 0)
    sm = attr.get("shrink_axis_mask", {}).get("i", 0)
    if attr.get("ellipsis_mask", {}).get("i", 0) or attr.get("new_axis_mask", {}).get("i", 0):
        raise NotImplementedError("StridedSlice with ellipsis/new_axis masks")
    idx = []
    for d in range(len(begin)):
        if sm & (1 << d):
            idx.append(int(begin[d]))
            continue
        b = None if bm & (1 << d) else int(begin[d])
        e = None if em & (1 << d) else int(end[d])
        idx.append(slice(b, e, int(strides[d])))
    return np.asarray(x[tuple(idx)])


def evaluate(nodes, name, feeds=None, cache=None):
    """Evaluates tensor `name` ("node" or "node:k"); `feeds` maps tensor names to arrays."""
    feeds = feeds or {}
    cache = {} if cache is None else cache

    def ev(tensor):
        tensor = tensor.lstrip("^")
        node_name, _, port = tensor.partition(":")
        port = int(port) if port else 0
        key = f"{node_name}:{port}"
        if key in feeds:
            return feeds[key]
        if node_name in feeds:
            return feeds[node_name]
        if key in cache:
            return cache[key]
        node = nodes[node_name]
        outs = _run(node, [ev(i) for i in node.inputs if not i.startswith("^")])
        for k, v in enumerate(outs):
            cache[f"{node_name}:{k}"] = v
        return outs[port]

    return ev(name)


def _run(node, a):
    op = node.op
    at = node.attr
    f32 = np.float32
    if op == "Const":
        return [at["value"]["tensor"]]
    if op == "Identity":
        return [a[0]]
    if op == "Assert":
        return [np.zeros(0)]
    if op == "Shape":
        return [np.array(np.shape(a[0]), dtype=np.int32)]
    if op == "Reshape":
        return [np.reshape(a[0], [int(v) for v in np.ravel(a[1])])]
    if op == "Slice":
        begin = [int(v) for v in a[1]]
        size = [int(v) for v in a[2]]
        idx = tuple(slice(b, None if s == -1 else b + s) for b, s in zip(begin, size))
        return [a[0][idx]]
    if op == "StridedSlice":
        return [_strided_slice(a[0], a[1], a[2], a[3], at)]
    if op == "ConcatV2":
        return [np.concatenate([np.asarray(v) for v in a[:-1]], axis=int(a[-1]))]
    if op == "Pack":
        return [np.stack([np.asarray(v) for v in a], axis=at.get("axis", {}).get("i", 0))]
    if op == "Unpack":
        axis = at.get("axis", {}).get("i", 0)
        return [np.take(a[0], i, axis=axis) for i in range(a[0].shape[axis])]
    if op == "Tile":
        return [np.tile(a[0], [int(v) for v in a[1]])]
    if op == "Fill":
        return [np.full([int(v) for v in np.ravel(a[0])], a[1], dtype=np.asarray(a[1]).dtype)]
    if op == "ExpandDims":
        return [np.expand_dims(a[0], int(a[1]))]
    if op == "Cast":
        dst = DTYPES[at["DstT"]["type"]]
        return [np.asarray(a[0]).astype(dst)]
    if op == "Range":
        start, limit, delta = a
        return [np.arange(start, limit, delta, dtype=np.asarray(start).dtype)]
    if op == "Sqrt":
        return [np.sqrt(a[0])]
    if op == "Rsqrt":
        return [(1 / np.sqrt(a[0])).astype(np.asarray(a[0]).dtype)]
    if op == "Exp":
        return [np.exp(a[0])]
    if op == "Sigmoid":
        x = np.asarray(a[0])
        return [(1 / (1 + np.exp(-x))).astype(x.dtype)]
    binary = {
        "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "RealDiv": np.divide,
        "Minimum": np.minimum, "Maximum": np.maximum, "Equal": np.equal, "Greater": np.greater,
        "Less": np.less,
    }
    if op in binary:
        x, y = np.asarray(a[0]), np.asarray(a[1])
        out = binary[op](x, y)
        if op not in ("Equal", "Greater", "Less") and x.dtype == f32:
            out = out.astype(f32)
        return [out]
    if op == "All":
        axes = tuple(int(v) for v in np.ravel(a[1]))
        return [np.all(a[0], axis=axes if axes else None)]
    raise NotImplementedError(f"op {op} ({node.name})")
