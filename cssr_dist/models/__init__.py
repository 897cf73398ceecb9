"""Models: timm backbones (feature maps), per-pixel heads (linear, PCSSR/RCSSR), losses.

Importing this package registers the project's backbones in timm's registry, so
`timm.create_model("wrn40_4")` works after `import cssr_dist.models`.
"""

from .backbones import PROJECT_BACKBONES, FeatureBackbone, build_backbone
from .cssr_head import CSSRHead, l2_distance_closed_form, reference_cssr_logits
from .cssr_l1_function import chunked_l1_distance
from .linear_head import LinearHead
from .losses import (
    avg_softmax_loss,
    build_loss,
    class_log_probs,
    class_probabilities,
    loss_kind_for_head,
    predicted_class,
    softmax_avg_loss,
)
from .osr_model import HEADS, ModelOutput, OSRModel, build_head, build_model
from .pretrained import load_state_dict_in_order, read_state_dict

__all__ = [
    "CSSRHead", "FeatureBackbone", "HEADS", "LinearHead", "ModelOutput", "OSRModel", "PROJECT_BACKBONES",
    "avg_softmax_loss", "build_backbone", "build_head", "build_loss", "build_model", "chunked_l1_distance",
    "class_log_probs", "class_probabilities", "l2_distance_closed_form", "load_state_dict_in_order",
    "loss_kind_for_head", "predicted_class", "read_state_dict", "reference_cssr_logits", "softmax_avg_loss",
]
