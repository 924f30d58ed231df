from setuptools import find_packages, setup

with open("requirements.txt") as f:
    install_requires = [l.strip() for l in f if l.strip() and not l.startswith("#")]

setup(
    name="mindspeed_mm",
    version="0.1.0",
    description="Qwen2-VL fine-tuning on megatron-core (Ascend NPU, CUDA, CPU)",
    packages=find_packages(include=["mindspeed_mm", "mindspeed_mm.*", "checkpoint", "checkpoint.*"]),
    python_requires=">=3.10",
    install_requires=install_requires,
    extras_require={
        "test": ["pytest>=8", "peft>=0.21"],  # the LoRA reference (training never imports it)
        "npu": ["torch_npu"],
    },
)
