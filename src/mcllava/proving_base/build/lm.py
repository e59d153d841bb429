"""Stage 3, lm: LoRA on SmolLM2, trained on pools of world samples in curriculum phases."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, inject_adapter_in_model
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from ...backbone import Backbone
from ...errors import McLlavaError
from ...tokens import word_embedding_norm
from ..data import GATE_DEFINITIONS, TASK_KINDS, Curriculum
from .common import _autocast, _done, _finish, _log, _save_ckpt, _start
from .config import LORA_TARGETS, BuildConfig
from .pool import EncodedPool, lm_loss, make_pool, sample_features
from .scoring import answer_report, yes_no_report, yes_no_scores

# held out when the phases train the evaluation's tasks: every task kind, scored by teacher-forced answer loss and
# token accuracy at each eval (the gate generates; this is the cheap curve)
VAL_TASKS = Curriculum(2, 0.5, (0, 0, 0, 0, 0, 0), tasks={k: 1.0 for k in TASK_KINDS})
VAL_TASKS_N = 100


def pool_spec(cur: Curriculum, start: int, n: int, seed: int) -> dict:
    """What a saved pool was drawn from; a curriculum without task weights reads as before they existed, so that a
    work folder's pools are not drawn again."""
    c = asdict(cur)
    if not any(c["tasks"].values()):
        del c["tasks"]
    return {"curriculum": c, "start": start, "n": n, "seed": seed}


def add_lora(model, rank: int, alpha: int, projector: bool = True):
    """LoRA on every attention and MLP matrix of the language model (in place); the projector trains if asked."""
    lm = model.model.language_model
    inject_adapter_in_model(
        LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LORA_TARGETS)), lm
    )
    model.requires_grad_(False)
    for n, p in lm.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    model.model.multi_modal_projector.requires_grad_(projector)
    return model


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_lora_delta(model, path: Path, rank: int, alpha: int) -> int:
    """Start the LoRA from an export's `lm_delta.safetensors` (continuing a build); returns the factors loaded."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        if (int(meta.get("lora_rank", rank)), int(meta.get("lora_alpha", alpha))) != (rank, alpha):
            raise McLlavaError(
                f"{path} holds a rank {meta.get('lora_rank')} / alpha {meta.get('lora_alpha')} LoRA; "
                f"this build's LoRA is rank {rank} / alpha {alpha}"
            )
        delta = {k: f.get_tensor(k) for k in f.keys()}
    params = dict(model.model.language_model.named_parameters())
    missing = [k for k in delta if f"{k}.default.weight" not in params]
    if missing or len(delta) != sum("lora_" in n for n in params):
        raise McLlavaError(f"{path} does not fit this model's LoRA (e.g. {missing[:2]})")
    with torch.no_grad():
        for k, v in delta.items():
            params[f"{k}.default.weight"].copy_(v.float())
    return len(delta)


def stage_lm(cfg: BuildConfig) -> dict:
    st, work = cfg.lm, cfg.work / "lm"
    if (info := _done(cfg.work, "lm")) is not None:
        return info
    tok, model, processor = _start(cfg, "lm")
    backbone = Backbone(model, processor, "proving-ground-build")
    add_lora(model, st.lora_rank, st.lora_alpha, projector=st.lr_projector > 0)
    if st.init_from is not None:
        load_lora_delta(model, Path(st.init_from) / "lm_delta.safetensors", st.lora_rank, st.lora_alpha)
    dev = torch.device(st.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise McLlavaError(f"the LM stage asks for {st.device!r}, but torch sees no CUDA device here")
    model.to(dev).train()  # pools are drawn on the CPU and kept there; their tower features come from `dev`
    pools: dict[str, EncodedPool] = {}
    # held out: recognition with text, word and visual definitions ("val"; only Yes/No samples are scored, so no
    # generic questions), and "Is there a ...?" alone ("val_read": is the image read at all?)
    # the recognition samples are drawn as the gate draws its definitions (1-2 definitions, half of the negatives
    # look-alikes), whatever the phases are, so that the curve predicts the gate
    val_cur = replace(GATE_DEFINITIONS, mix=(0, 0, 0.1, 0.25, 0.25, 0))
    read_cur = Curriculum(mix=(0, 1, 0, 0, 0, 0), questions=(1, 0, 0, 0))  # "Is there a ...?" only
    wanted = [
        (p.name, p.curriculum, (i + 1) * 10**6, min(st.pool, p.steps * st.batch_size))
        for i, p in enumerate(st.phases)
        if p.steps > 0
    ]
    wanted += [("val", val_cur, 10**8, st.val_pool), ("val_read", read_cur, 10**8 + 10**6, st.val_read)]
    if any(any(p.curriculum.tasks.values()) for p in st.phases):
        wanted.append(("val_tasks", VAL_TASKS, 10**8 + 2 * 10**6, VAL_TASKS_N))
    for name, cur, start, n in wanted:  # each pool's samples come from its own index range
        path, spec = work / f"pool_{name}.pt", pool_spec(cur, start, n, cfg.seed)
        saved = torch.load(path, weights_only=False) if path.exists() else {}
        if saved.pop("spec", None) == spec:
            pools[name] = EncodedPool(**saved)
        else:  # none yet, or drawn for other phases (a run continued from another's checkpoint): draw it again
            pools[name] = make_pool(cfg, backbone, model, cur, start, n, cfg.seed, desc=f"3/4 encode pool {name}")
            _save_ckpt(path, {**pools[name].__dict__, "spec": spec})
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    proj = [p for p in model.model.multi_modal_projector.parameters() if p.requires_grad]
    groups = [{"params": lora, "lr": st.lr_lora}] + ([{"params": proj, "lr": st.lr_projector}] if proj else [])
    opt = torch.optim.AdamW(groups, weight_decay=0.0)
    total = st.steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, st.lr_factor)
    step, ckpt = 0, work / "ckpt.pt"
    if ckpt.exists():
        s = torch.load(ckpt, weights_only=False, map_location=dev)
        model.load_state_dict(s["trainable"], strict=False)
        opt.load_state_dict(s["opt"]), sched.load_state_dict(s["sched"])
        step = s["step"]
    t0, losses, norm = time.time(), [], word_embedding_norm(model, len(tok))
    bar = tqdm(total=total, initial=step, desc="3/4 projector + LoRA", disable=not cfg.progress)
    while step < total:
        current = st.phases[st.phase_at(step)]
        phase, oracle = current.name, current.oracle
        pool = pools[phase]
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        idx = torch.randint(0, len(pool.kinds), (st.batch_size,), generator=gen)
        with _autocast(cfg, st.device):
            loss = lm_loss(backbone, pool, idx, norm, oracle)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(lora + proj, 1.0)
        opt.step()
        sched.step()
        step += 1
        losses.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
        record = {
            "step": step,
            "phase": phase,
            "loss": float(np.mean(losses[-st.checkpoint_every :])),
            "seconds": time.time() - t0,
        }
        if step % st.eval_every == 0 or step == total:
            model.eval()
            record["tokens"] = "oracle" if oracle else "tower"  # the held-out pools are scored on the phase's tokens

            def report(p: EncodedPool) -> dict:
                return yes_no_report(
                    yes_no_scores(backbone, p, features=lambda idx: sample_features(backbone, p, idx, norm, oracle)), p
                )

            with _autocast(cfg, st.device):
                record["val"] = report(pools["val"])
                record["val"]["exists"] = report(pools["val_read"])["exists"]
                if "val_tasks" in pools:
                    p = pools["val_tasks"]
                    record["val_tasks"] = answer_report(
                        backbone, p, features=lambda idx: sample_features(backbone, p, idx, norm, oracle)
                    )
            model.train()
            tqdm.write(
                f"step {step}: "
                + json.dumps(
                    {k: (round(v["weighted_accuracy"], 3), round(v["auc"] or 0, 3)) for k, v in record["val"].items()}
                )
                + (
                    " tasks (token accuracy): "
                    + json.dumps({k: round(v["token_accuracy"], 3) for k, v in record["val_tasks"].items()})
                    if "val_tasks" in record
                    else ""
                )
            )
        out_of_time = st.time_budget is not None and time.time() - t0 > st.time_budget
        if step % st.checkpoint_every == 0 or step == total or "val" in record or out_of_time:
            _log(cfg.work, "lm", record)
            _save_ckpt(
                ckpt,
                {
                    "trainable": trainable_state(model),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "step": step,
                },
            )
        if out_of_time:
            tqdm.write(f"time budget of {st.time_budget:.0f} s spent: the LM stage ends at step {step} of {total}")
            break
    bar.close()
    state = trainable_state(model)
    save_file({k: v.contiguous() for k, v in state.items()}, work / "trainable.safetensors")
    return _finish(
        cfg.work,
        "lm",
        {
            "steps": step,
            "planned_steps": total,
            "seconds": time.time() - t0,
            "final_loss": float(np.mean(losses[-20:])) if losses else None,
            "device": st.device,
            "init_from": st.init_from,
        },
    )
