"""What one LM-stage step costs with the evaluation's tasks in the mix: `v3_phases()` against `visual_phases()`.

Loads the committed base (SmolLM2 from its package, the committed tower, projector and LoRA), adds a fresh LoRA
as the LM stage does, counts the tokens (and answer tokens) of --samples samples of each curriculum (6 rows per
visual definition), and times forward + backward + step of batches of 16 of them under bf16 autocast.

    python benchmarks/task_step_cost.py --steps 2 --samples 400

Writes benchmarks/out/task_step_cost.json and .png.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from mcllava.backbone import Backbone  # noqa: E402
from mcllava.proving_base import load  # noqa: E402
from mcllava.proving_base.build.config import v3_phases, visual_phases  # noqa: E402
from mcllava.proving_base.build.lm import add_lora  # noqa: E402
from mcllava.proving_base.build.pool import encode_pool, lm_loss  # noqa: E402
from mcllava.proving_base.tasks import lm_sample  # noqa: E402
from mcllava.tokens import word_embedding_norm  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="timed steps per curriculum (after one warm-up step)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--samples", type=int, default=400, help="samples per curriculum whose tokens are counted")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out"))
    args = ap.parse_args()
    model, processor = load()
    backbone = Backbone(model, processor, "proving-ground")
    add_lora(model, 32, 32, projector=False)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    norm = word_embedding_norm(model, len(backbone.tokenizer))
    n = args.batch * (args.steps + 1)
    res = {}
    phases = {"visual_phases": visual_phases(900)[0], **{f"v3_phases {p.name}": p for p in v3_phases()}}
    for name, phase in phases.items():
        t0 = time.time()
        samples = [lm_sample(0, i, phase.curriculum) for i in range(max(n, args.samples))]
        drawn = time.time() - t0
        enc = [
            backbone.encode(
                backbone.format_prompt(s["question"], s.get("system"), image=s["image"] is not None),
                s["answer"],
                definition_rows=6,
            )
            for s in samples[: args.samples]
        ]
        pool = encode_pool(backbone, model, samples[:n], 192, rows=6)
        times = []
        for step in range(args.steps + 1):
            idx = torch.arange(step * args.batch, (step + 1) * args.batch)
            t = time.time()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = lm_loss(backbone, pool, idx, norm)
            opt.zero_grad()
            loss.backward()
            opt.step()
            times.append(time.time() - t)
        res[name] = {
            "seconds_per_step": sum(times[1:]) / args.steps,
            "tokens_per_sample": sum(len(e.input_ids) for e in enc) / len(enc),
            "answer_tokens_per_sample": sum(sum(x != -100 for x in e.labels) for e in enc) / len(enc),
            # what a step pays for: every sample of a batch padded to its longest
            "padded_width_per_batch": sum(
                max(len(e.input_ids) for e in enc[i : i + args.batch]) for i in range(0, len(enc), args.batch)
            )
            / -(-len(enc) // args.batch),
            "draw_seconds_per_sample": drawn / len(samples),
            "kinds": {k: pool.kinds.count(k) for k in sorted(set(pool.kinds))},
        }
        print(name, json.dumps(res[name]))
    res["threads"] = torch.get_num_threads()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "task_step_cost.json").write_text(json.dumps(res, indent=1))
    plt.bar(list(phases), [res[k]["seconds_per_step"] for k in phases])
    plt.ylabel(f"s per step (batch {args.batch}, CPU, {res['threads']} threads)")
    plt.savefig(args.out / "task_step_cost.png", dpi=100)


if __name__ == "__main__":
    main()
