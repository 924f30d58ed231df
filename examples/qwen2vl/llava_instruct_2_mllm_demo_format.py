"""Convert LLaVA-Instruct-150K (COCO2017 images) to the MLLM format used by data.json.

    python examples/qwen2vl/llava_instruct_2_mllm_demo_format.py \
        --llava-json ./data/llava_instruct_150k.json \
        --image-dir ./data/COCO2017/train2017 \
        --output ./data/mllm_format_llava_instruct_data.json
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from mindspeed_mm.data.llava import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
