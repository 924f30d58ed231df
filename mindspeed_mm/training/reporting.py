"""Progress lines in Megatron-LM's format, and TensorBoard scalars.

Written by the last rank (a last-pipeline-stage rank, where the loss lives),
like Megatron-LM.  Values are averaged over the ``--log-interval`` window; the
loss average skips iterations whose loss was not finite.
"""
import math
import sys
import time


class ProgressReport:
    def __init__(self, train_iters: int, log_interval: int, world_size: int, writer_rank: bool,
                 tensorboard_dir: str = None, stream=None, device_type: str = "gpu"):
        # Megatron-LM says "per GPU"; name the device the processes really run on.
        self.device_label = {"cuda": "GPU", "npu": "NPU"}.get(device_type, device_type.upper())
        self.train_iters, self.log_interval, self.world_size = train_iters, log_interval, world_size
        self.writer_rank = writer_rank
        self.stream = stream or sys.stdout
        self.tb = None
        if writer_rank and tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=tensorboard_dir, max_queue=1000)
        self._reset()

    def _reset(self):
        self.window = {"time": 0.0, "flops": 0.0, "tokens": 0, "iters": 0, "losses": []}

    def print(self, text: str) -> None:
        if self.writer_rank:
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"[{stamp}] {text}", file=self.stream, flush=True)

    def step(self, iteration: int, *, loss: float, lr: float, grad_norm, loss_scale: float, elapsed: float,
             flops: float, tokens: int, consumed_samples: int, global_batch_size: int,
             skipped_iters: int, nan_iters: int) -> None:
        """Record one iteration; print and write scalars every log_interval iterations."""
        w = self.window
        w["time"] += elapsed
        w["flops"] += flops
        w["tokens"] += tokens
        w["iters"] += 1
        if math.isfinite(loss):
            w["losses"].append(loss)
        if self.tb is not None:
            self.tb.add_scalar("lm loss", loss, iteration)
            self.tb.add_scalar("learning-rate", lr, iteration)
            self.tb.add_scalar("loss-scale", loss_scale, iteration)
            if grad_norm is not None:
                self.tb.add_scalar("grad-norm", grad_norm, iteration)
        if iteration % self.log_interval and iteration != self.train_iters:
            return
        n = w["iters"]
        per_iter = w["time"] / n
        tflops = w["flops"] / (w["time"] * self.world_size) / 1e12 if w["time"] > 0 else 0.0
        tokens_per_s = w["tokens"] / (w["time"] * self.world_size) if w["time"] > 0 else 0.0
        mean_loss = sum(w["losses"]) / len(w["losses"]) if w["losses"] else float("nan")
        parts = [
            f"iteration {iteration:8d}/{self.train_iters:8d}",
            f"consumed samples: {consumed_samples:12d}",
            f"elapsed time per iteration (ms): {per_iter * 1000:.1f}",
            f"throughput per {self.device_label} (TFLOP/s/{self.device_label}): {tflops:.3f}",
            f"tokens per second per GPU: {tokens_per_s:.1f}",
            f"learning rate: {lr:.6E}",
            f"global batch size: {global_batch_size:5d}",
            f"lm loss: {mean_loss:.6E}",
            f"loss scale: {loss_scale:.1f}",
        ]
        if grad_norm is not None:
            parts.append(f"grad norm: {grad_norm:.3f}")
        parts += [f"number of skipped iterations: {skipped_iters:3d}", f"number of nan iterations: {nan_iters:3d}"]
        self.print(" " + " | ".join(parts) + " |")
        if self.tb is not None:
            self.tb.add_scalar("throughput-tflops-per-gpu", tflops, iteration)
            self.tb.add_scalar("tokens-per-second-per-gpu", tokens_per_s, iteration)
            self.tb.add_scalar("iteration-time-ms", per_iter * 1000, iteration)
            self.tb.flush()
        self._reset()

    def evaluation(self, iteration: int, loss: float, tokens: int) -> None:
        ppl = math.exp(min(20.0, loss)) if math.isfinite(loss) else float("nan")
        self.print(f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} | "
                   f"lm loss PPL: {ppl:.6E} | supervised tokens: {tokens} |")
        if self.tb is not None:
            self.tb.add_scalar("lm loss validation", loss, iteration)
            self.tb.add_scalar("lm loss validation ppl", ppl, iteration)
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()
