"""fp32 vs bf16 inference: masks and scores of one trained segmenter on the Lucchi++ validation
slices 145-164 (no TTA, the model's threshold). Prints the CPU kind.

    .venv/bin/python benchmarks/segment_lucchi.py --preset cpu --max-time 9m --out runs/bench/cpu_auto_9m
    .venv/bin/python benchmarks/precision_agreement.py runs/bench/cpu_auto_9m/model
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from emsynth.data.readers import read_volume
from emsynth.engine.device import cpu_kind, thread_count
from emsynth.segment.infer import predict_with
from emsynth.segment.metrics import IOU_NAME, counts
from emsynth.segment.model import Segmenter

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "lucchi_pp" / "train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="segmenter run folder or its model/")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="lucchi_pp/train folder")
    args = parser.parse_args()
    torch.set_num_threads(thread_count(None))
    model = Segmenter.load(args.model)
    volume = read_volume(args.data, "auto").select(list(range(145, 165)))
    truth = volume.labels["mito"]
    masks = {}
    for precision in ("fp32", "bf16"):
        masks[precision] = predict_with(model, volume.image, precision=precision,
                                        tta=False) >= model.threshold
    scores = {p: counts(m, truth).iou for p, m in masks.items()}
    print(f"[{cpu_kind()}] {IOU_NAME} at threshold {model.threshold:.3f}: fp32 "
          f"{scores['fp32']:.4f}, bf16 {scores['bf16']:.4f} (difference "
          f"{scores['bf16'] - scores['fp32']:+.4f}); bf16 vs fp32 masks agree at IoU "
          f"{counts(masks['bf16'], masks['fp32']).iou:.4f}")


if __name__ == "__main__":
    main()
