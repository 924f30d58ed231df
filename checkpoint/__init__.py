"""HF <-> MindSpeed-MM (Megatron layout) weight conversion."""
