"""The projection heads of the student and the teacher, as a `HeadConfig` describes them."""

import collections

from keras_dinov2.layers.dino_head import DINOHead

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
