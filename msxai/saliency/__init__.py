"""Instance-level quantitative saliency (Spagnolo et al., Sci Rep 2026) through MONAI sliding-window inference.

* :mod:`~msxai.saliency.sliding`    the exact windowed sliding-window function (``SlidingWindowSpec``)
* :mod:`~msxai.saliency.smoothgrad` instance SmoothGrad (Eq. 2 ``mean`` / Eq. 3 ``max``) and class SmoothGrad
* :mod:`~msxai.saliency.gradcampp`  Grad-CAM++ at a named layer, class level (Eq. 4-7) and instance level (Eq. 8-10)
* :mod:`~msxai.saliency.summary`    per-lesion summary (peaks, masses, rings)
* :mod:`~msxai.saliency.engine`     ``explain`` (model, image, domains) -> per-domain maps + summaries;
  ``write_explanation`` (the one explain-and-write path)

See ``docs/saliency.md``.
"""

from msxai.saliency.engine import Explanation, explain, explain_to_files, lesion_domains, write_explanation
from msxai.saliency.gradcampp import GradCAMPlusPlus, gradcampp
from msxai.saliency.sliding import SlidingWindowSpec, WindowGrid, sliding_window_logits
from msxai.saliency.smoothgrad import class_smoothgrad, instance_smoothgrad, instance_smoothgrad_many
from msxai.saliency.summary import lesion_summary

__all__ = [
    "Explanation",
    "GradCAMPlusPlus",
    "SlidingWindowSpec",
    "WindowGrid",
    "class_smoothgrad",
    "explain",
    "explain_to_files",
    "gradcampp",
    "instance_smoothgrad",
    "instance_smoothgrad_many",
    "lesion_domains",
    "lesion_summary",
    "sliding_window_logits",
    "write_explanation",
]
