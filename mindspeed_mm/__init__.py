"""MindSpeed-MM: Qwen2-VL fine-tuning on megatron-core."""
