"""Parameter count of VIPA-VLA per part, built on the meta device (no weight is allocated).

Usage:

    python -m modeling_vipa.summary            # the paper's sizes: InternVL3.5-2B + CUT3R + fusion + DiT head
    python -m modeling_vipa.summary --tiny     # the test/CPU configuration

    from modeling_vipa.configuration_vipa import VipaConfig
    from modeling_vipa.summary import parameter_counts
    counts = parameter_counts(VipaConfig.tiny())   # {"InternViT vision tower": ..., ..., "total": ...}
"""

from __future__ import annotations

import argparse

import torch

from .configuration_vipa import VipaConfig
from .modeling_vipa import VipaForActionPrediction

# (label, parameter-name prefixes) in the order the data flows
PARTS = (
    ("InternViT vision tower", ("model.vision_tower.",)),
    ("CUT3R spatial encoder", ("model.spatial_encoder.",)),
    ("fusion layer", ("model.fusion.",)),
    ("projector (pixel shuffle MLP)", ("model.multi_modal_projector.",)),
    ("Qwen3 token embeddings (tied lm_head)", ("model.language_model.embed_tokens.",)),
    ("Qwen3 decoder layers + norm", ("model.language_model.",)),
    ("action queries", ("action_queries",)),
    ("action head (state encoder + DiT)", ("action_head.",)),
)


def parameter_counts(config: VipaConfig) -> dict[str, int]:
    """Parameters per part of a `VipaForActionPrediction(config)` built on the meta device, plus "total".

    Tied weights (lm_head = embed_tokens) are counted once, under the embeddings.
    """
    with torch.device("meta"):
        model = VipaForActionPrediction(config)
    counts = dict.fromkeys([label for label, _ in PARTS], 0)
    unassigned = 0
    for name, param in model.named_parameters():  # named_parameters() yields a tied tensor once
        for label, prefixes in PARTS:
            if name.startswith(prefixes):
                counts[label] += param.numel()
                break
        else:
            unassigned += param.numel()
    if unassigned:
        counts["other"] = unassigned
    counts["total"] = sum(counts.values())
    return counts


def format_table(counts: dict[str, int]) -> str:
    """A plain-text table: part, parameters, millions, share of the total."""
    total = counts["total"]
    width = max(len(k) for k in counts)
    lines = [f"{'part':<{width}}  {'parameters':>14}  {'M':>9}  {'share':>6}"]
    for label, n in counts.items():
        if label == "total":
            lines.append("-" * len(lines[0]))
        lines.append(f"{label:<{width}}  {n:>14,}  {n / 1e6:>9.2f}  {100 * n / total:>5.1f}%")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Print the parameter table of the real-size (or, with --tiny, the tiny) configuration."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tiny", action="store_true", help="the tiny test configuration instead of the paper's"
    )
    args = parser.parse_args(argv)
    config = VipaConfig.tiny() if args.tiny else VipaConfig()
    print(
        f"VIPA-VLA ({'tiny' if args.tiny else 'InternVL3.5-2B + CUT3R'}), meta device, no weights allocated"
    )
    print(format_table(parameter_counts(config)))


if __name__ == "__main__":
    main()
