"""The projection heads of the student and the teacher, as a `HeadConfig` describes them."""

import collections

from keras import ops

from keras_dinov2.layers.dino_head import DINOHead
from keras_dinov2.ops import call_layer, eager_dispatch
from keras_dinov2.ops.eager import split_rows

# One student's trainable parts: its backbone, its DINO head and its iBOT head (the DINO head itself when tied).
StudentParts = collections.namedtuple("StudentParts", ["backbone", "dino_head", "ibot_head"])


def build_head(heads, name, prototypes, bottleneck, input_dim, dtype):
    """One built `DINOHead` with the config's hidden width and depth, `prototypes` outputs."""
    layer = DINOHead(
        num_prototypes=prototypes, hidden_dim=heads.hidden_dim, bottleneck_dim=bottleneck,
        num_layers=heads.num_layers, use_bn=heads.use_bn, norm_last_layer=heads.norm_last_layer, dtype=dtype,
        name=name,
    )
    layer.build((None, input_dim))
    return layer


def projection_heads(heads, ibot_on, input_dim, dtype):
    """(student DINO, teacher DINO, student iBOT, teacher iBOT) heads.

    The iBOT heads are heads of their own only with `heads.ibot_separate_head` and iBOT on; otherwise they are the
    DINO heads (the same objects), as the reference ties them.
    """
    student_dino = build_head(heads, "student_dino_head", heads.num_prototypes, heads.bottleneck_dim, input_dim,
                              dtype)
    teacher_dino = build_head(heads, "teacher_dino_head", heads.num_prototypes, heads.bottleneck_dim, input_dim,
                              dtype)
    if not (heads.ibot_separate_head and ibot_on):
        return student_dino, teacher_dino, student_dino, teacher_dino
    student_ibot = build_head(heads, "student_ibot_head", heads.ibot_num_prototypes, heads.ibot_bottleneck_dim,
                              input_dim, dtype)
    teacher_ibot = build_head(heads, "teacher_ibot_head", heads.ibot_num_prototypes, heads.ibot_bottleneck_dim,
                              input_dim, dtype)
    return student_dino, teacher_dino, student_ibot, teacher_ibot


def run_heads(calls, reduction=None):
    """The logits of several head calls [(head, rows (N_i, D), row_weights or None), ...], in order.

    Where ops are dispatched eagerly (PyTorch, `keras_dinov2.ops.eager_dispatch`), calls on the same head without
    batch norm run as one call over their rows concatenated, then split: a head without batch norm treats each row
    alone, so the logits are those of the separate calls, and the reference calls its head once per step on
    [local CLS; global CLS; masked patches] likewise (one prototype weight normalization and one set of GEMMs instead
    of one per part). With batch norm each call keeps its own statistics (and `row_weights`), as `DINOHead`
    documents; so does a call whose row count is unknown, and every call on a compiling backend.
    """
    results = [None] * len(calls)
    groups = {}
    concatenate = eager_dispatch()
    for index, (head, rows, row_weights) in enumerate(calls):
        if head.use_bn or rows.shape[0] is None or not concatenate:
            results[index] = call_layer(head, rows, row_weights=row_weights, reduction=reduction)
        else:
            groups.setdefault(id(head), []).append(index)
    for indices in groups.values():
        head = calls[indices[0]][0]
        if len(indices) == 1:
            results[indices[0]] = call_layer(head, calls[indices[0]][1], reduction=reduction)
            continue
        logits = call_layer(head, ops.concatenate([calls[i][1] for i in indices], axis=0), reduction=reduction)
        for i, part in zip(indices, split_rows(logits, [int(calls[i][1].shape[0]) for i in indices])):
            results[i] = part
    return results
