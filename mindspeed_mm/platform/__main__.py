"""`python -m mindspeed_mm.platform [--device auto|npu|cuda|cpu]`: what this machine offers."""
import argparse

from mindspeed_mm.errors import cli_main
from mindspeed_mm.platform import setup_platform


@cli_main
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    platform = setup_platform(args.device)
    from mindspeed_mm.platform.attention import select_backend  # imports megatron-core: after the setup

    print(f"device: {platform.device_type}  backend: {platform.backend}  "
          f"attention: {select_backend(platform.device_type)}")


if __name__ == "__main__":
    main()
