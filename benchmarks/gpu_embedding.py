"""VGG-16 conv trunk + GeM on a GPU: images/s at fp32, TF32, bf16 and fp16, and how close the
reduced-precision vectors stay to fp32 (cosine per vector). Sizing for ingest on GPUs.

    python benchmarks/gpu_embedding.py            # on a machine with an NVIDIA GPU and PyTorch

The product's embedder runs the same network in TensorFlow/Keras (which uses a GPU when one is
present); this script uses torchvision's VGG-16 definition (same layers, same shapes) because the
lent GPU machines carry PyTorch, not TensorFlow. Weights are random (speed and numerical
equivalence only; no download). Inputs: the two passes of the default descriptor, 224 x 224 and
448 x 336 (a 4:3 photo at longer side 448).
"""

from __future__ import annotations

import json
import sys
import time


def main() -> None:
    import torch
    import torchvision

    torch.manual_seed(0)
    device = "cuda"
    trunk = torchvision.models.vgg16(weights=None).features[:30].to(device).eval()  # up to block5_conv3 + ReLU
    trunk = trunk.to(memory_format=torch.channels_last)
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "rows": []}

    def gem(maps: torch.Tensor, p: float = 3.0) -> torch.Tensor:
        pooled = maps.float().clamp(min=1e-6).pow(p).mean(dim=(2, 3)).pow(1.0 / p)
        return torch.nn.functional.normalize(pooled, dim=1)

    for height, width in ((224, 224), (336, 448)):
        for batch in (32, 128):
            x = torch.rand(batch, 3, height, width, device=device).to(memory_format=torch.channels_last)
            with torch.inference_mode():
                torch.backends.cuda.matmul.allow_tf32 = False
                torch.backends.cudnn.allow_tf32 = False
                reference = gem(trunk(x))
                for mode in ("fp32", "tf32", "bf16", "fp16"):
                    torch.backends.cuda.matmul.allow_tf32 = mode == "tf32"
                    torch.backends.cudnn.allow_tf32 = mode == "tf32"
                    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)

                    def run():
                        if dtype is None:
                            return gem(trunk(x))
                        with torch.autocast("cuda", dtype=dtype):
                            return gem(trunk(x))

                    for _ in range(3):
                        run()
                    torch.cuda.synchronize()
                    rounds = 10
                    started = time.perf_counter()
                    for _ in range(rounds):
                        vectors = run()
                    torch.cuda.synchronize()
                    seconds = (time.perf_counter() - started) / rounds
                    cosine = (vectors * reference).sum(dim=1)
                    row = {"input": f"{width}x{height}", "batch": batch, "mode": mode,
                           "images_per_s": round(batch / seconds, 1), "min_cosine_to_fp32": round(cosine.min().item(), 6),
                           "mean_cosine_to_fp32": round(cosine.mean().item(), 6)}
                    report["rows"].append(row)
                    print(json.dumps(row), flush=True)
    try:
        import onnxruntime

        report["onnxruntime_providers"] = onnxruntime.get_available_providers()
    except ImportError:
        report["onnxruntime_providers"] = None
    json.dump(report, sys.stdout if len(sys.argv) < 2 else open(sys.argv[1], "w"), indent=1)


if __name__ == "__main__":
    main()
