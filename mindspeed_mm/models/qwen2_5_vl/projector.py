"""Qwen2.5-VL patch merger: Qwen2-VL's (models/qwen2vl/projector.py) with an RMSNorm ``ln_q`` (no bias) and an
output width of ``vision.out_hidden_size`` (the LLM's hidden size; the ViT's own width is ``vision.hidden_size``)."""
from mindspeed_mm.models.qwen2vl.projector import VisionProjector as Qwen2VLProjector
from mindspeed_mm.platform.norm import Norm


class VisionProjector(Qwen2VLProjector):
    """ViT patch features [n_patches, vis_hidden] -> LLM token features [n_patches / merge**2, out_hidden]."""

    def __init__(self, vision, config):
        super().__init__(vision, config)
        # HF: Qwen2_5_VLRMSNorm(context_dim, eps=1e-6); config.normalization is the ViT's "RMSNorm"
        self.layernorm = Norm(config, vision.hidden_size, eps=1e-6)
