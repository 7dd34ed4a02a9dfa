"""Sizes, bits, clusters and MACs of a loaded model, computed from the verified spec."""

from __future__ import annotations

import math
import os

from escepe_rt._fbs.OpCode import OpCode
from escepe_rt.format import ModelSpec


def node_macs(spec: ModelSpec, node) -> int:
    """Multiply-accumulates per sample (convolutions and linear layers only)."""
    if node.op not in (OpCode.CONV2D, OpCode.LINEAR):
        return 0
    w = spec.tensors[node.weight]
    out = spec.values[node.output].shape
    per_output = math.prod(w.shape[1:])  # (Cin/g)*kh*kw, or in_features
    return math.prod(out) * per_output


def model_info(spec: ModelSpec, path: str = "", thresholds=None) -> dict:
    sections = []
    cumulative_macs = 0
    exits = []
    for s, (begin, end) in enumerate(spec.sections):
        nodes = spec.nodes[begin:end]
        weight_ids = [n.weight for n in nodes if n.weight >= 0]
        extra_ids = [t for n in nodes for t in (n.scale, n.shift) if t >= 0]
        tensors = [spec.tensors[t] for t in weight_ids]
        weights = sum(t.count for t in tensors)
        weight_bytes = sum(spec.buffers[spec.tensors[t].buffer][1] for t in weight_ids)
        stored = sum(spec.buffers[spec.tensors[t].buffer][1] for t in weight_ids + extra_ids)
        clusters = sorted({len(spec.codebooks[t.codebook][1]) for t in tensors if t.codebook >= 0})
        macs = sum(node_macs(spec, n) for n in nodes)
        cumulative_macs += macs
        sections.append(
            {
                "index": s,
                "nodes": end - begin,
                "weights": weights,
                "channel_params": sum(spec.tensors[t].count for t in extra_ids),
                "clusters": clusters,
                "bits_per_weight": 8 * weight_bytes / weights if weights else 0.0,
                "stored_bytes": stored,
                "macs": macs,
            }
        )
        ex = spec.exits[s]
        exits.append(
            {
                "index": s,
                "name": ex.name,
                "threshold": (thresholds or [e.threshold for e in spec.exits])[s],
                "stored_threshold": ex.threshold,
                "macs": cumulative_macs,
            }
        )
    file_bytes = os.path.getsize(path) if path and os.path.exists(path) else None
    fp32 = spec.metadata.get("fp32_param_bytes")
    info = {
        "schema_version": "{}.{}".format(*spec.schema_version),
        "writer": spec.writer,
        "input_shape": spec.input_shape,
        "num_classes": spec.values[spec.exits[0].logits].shape[0],
        "labels": list(spec.labels),
        "exit_policy": spec.exit_policy,
        "sections": sections,
        "exits": exits,
        "parameters": sum(sec["weights"] + sec["channel_params"] for sec in sections),
        "file_bytes": file_bytes,
        "metadata": dict(spec.metadata),
    }
    if fp32 and file_bytes:
        info["fp32_param_bytes"] = int(fp32)
        info["compression_ratio"] = int(fp32) / file_bytes
    return info
