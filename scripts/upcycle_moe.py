"""Upcycle a dense Llama (SmolLM2-135M-Instruct) into a Mixtral mixture-of-experts and fine-tune it on
the unlearning set, so that its knowledge of the fictitious authors lives in experts (UOE's model).

Choices (ours; sparse upcycling after Komatsuzaki et al. 2023):

- architecture: transformers' ``MixtralForCausalLM``, Llama's attention without changes, no
  shared expert, fused expert tensors; 8 experts, top-2 (Mixtral's), every layer sparse;
- experts: each a copy of the layer's MLP (``gate_up_proj[e]`` = [gate_proj; up_proj],
  ``down_proj[e]`` = down_proj) plus Gaussian noise of ``noise`` × the weight's std, so that
  experts can diverge; everything else is copied unchanged;
- router: rows N(0, σ²) with σ = ``router_std`` / ‖post-attention RMSNorm weight‖, which puts
  the router logits' spread near ``router_std`` on normalized inputs, so that routing starts
  diverse instead of collapsing onto one expert;
- fine-tune: every weight (experts and routers included), AdamW, linear decay, on the qa
  records of ``--data`` (scripts.make_unlearn_data's ``full.jsonl``, the template of
  :mod:`compress_unlearn.data`), with Mixtral's load-balancing loss (coefficient
  ``--aux-coef``, Mixtral's 0.02) keeping experts in use.

    python -m scripts.upcycle_moe --out out/smollm2-moe --data data/unlearn/full.jsonl --epochs 6
    python -m scripts.upcycle_moe --out /tmp/moe --data data/unlearn/full.jsonl --smoke   # CPU
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch import nn


def moe_config(dense, experts: int, top_k: int, aux_coef: float):
    """The Mixtral config of a Llama ``dense`` config with ``experts`` experts of its MLP's width."""
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=dense.vocab_size,
        hidden_size=dense.hidden_size,
        intermediate_size=dense.intermediate_size,
        num_hidden_layers=dense.num_hidden_layers,
        num_attention_heads=dense.num_attention_heads,
        num_key_value_heads=dense.num_key_value_heads,
        head_dim=getattr(dense, "head_dim", None) or dense.hidden_size // dense.num_attention_heads,
        hidden_act=dense.hidden_act,
        max_position_embeddings=dense.max_position_embeddings,
        rms_norm_eps=dense.rms_norm_eps,
        rope_parameters=dict(getattr(dense, "rope_parameters", None) or {"rope_type": "default", "rope_theta": 1e4}),
        sliding_window=None,
        tie_word_embeddings=dense.tie_word_embeddings,
        bos_token_id=dense.bos_token_id,
        eos_token_id=dense.eos_token_id,
        pad_token_id=getattr(dense, "pad_token_id", None),
        num_local_experts=experts,
        num_experts_per_tok=top_k,
        router_aux_loss_coef=aux_coef,
        output_router_logits=True,
    )


@torch.no_grad()
def upcycle(dense: nn.Module, experts: int, top_k: int, noise: float, router_std: float, seed: int) -> nn.Module:
    """A ``MixtralForCausalLM`` whose experts are noisy copies of ``dense``'s MLPs (see the module docstring)."""
    from transformers import MixtralForCausalLM

    generator = torch.Generator().manual_seed(seed)
    moe = MixtralForCausalLM(moe_config(dense.config, experts, top_k, 0.02)).to(next(dense.parameters()).dtype)
    state = {name: value for name, value in dense.state_dict().items() if ".mlp." not in name}
    missing, unexpected = moe.load_state_dict(state, strict=False)
    if unexpected or any(".mlp." not in name for name in missing if name != "lm_head.weight"):
        raise RuntimeError(f"Llama → Mixtral names differ: missing {missing}, unexpected {unexpected}")
    for dense_layer, layer in zip(dense.model.layers, moe.model.layers):
        mlp, block = dense_layer.mlp, layer.mlp
        fused = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        for target, weight in ((block.experts.gate_up_proj, fused), (block.experts.down_proj, mlp.down_proj.weight)):
            jitter = torch.randn((experts, *weight.shape), generator=generator) * noise * weight.float().std()
            target.copy_(weight.unsqueeze(0) + jitter.to(weight.dtype))
        scale = router_std / layer.post_attention_layernorm.weight.float().norm().clamp_min(1e-6)
        block.gate.weight.copy_(torch.randn(block.gate.weight.shape, generator=generator) * scale)
    moe.tie_weights()
    return moe


def finetune(model: nn.Module, samples: list, steps: int, batch_size: int, lr: float, pad_id: int) -> list[float]:
    """Train every weight of ``model`` on ``samples`` (LM loss + Mixtral's load-balancing loss); the loss curve."""
    from transformers import get_scheduler

    from compress.api import collate

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = get_scheduler("linear", optimizer, num_warmup_steps=0, num_training_steps=steps)
    generator = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    order: list[int] = []
    curve = []
    model.train()
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(samples), generator=generator).tolist()
        picked, order = order[:batch_size], order[batch_size:]
        batch = {key: value.to(device) for key, value in collate([samples[i] for i in picked], pad_id).items()}
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        curve.append(loss.item())
    return curve


def expert_load(model: nn.Module, samples: list, pad_id: int) -> list[list[float]]:
    """Per layer, the fraction of top-k routing slots each expert gets on ``samples``."""
    from compress.api import collate

    batch = collate(samples, pad_id)
    device = next(model.parameters()).device
    with torch.no_grad():
        out = model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}, output_router_logits=True)
    real = batch["attention_mask"].reshape(-1).bool()
    loads = []
    top_k = model.config.num_experts_per_tok
    for logits in out.router_logits:
        picks = logits.float()[real.to(logits.device)].topk(top_k, dim=-1).indices.reshape(-1)
        loads.append((torch.bincount(picks, minlength=logits.shape[-1]).float() / picks.numel()).tolist())
    return loads


def dense_directory(name: str) -> Path:
    """A model directory, or a built-in model's converted directory."""
    if Path(name).is_dir():
        return Path(name)
    from compress.checkpoint.builtin import BuiltinLoader

    return BuiltinLoader().directory(name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The upcycling and fine-tuning settings (shared with scripts.bench_uoe)."""
    parser.add_argument("--model", default="smollm2-135m-instruct", help="the dense Llama to upcycle")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--noise", type=float, default=0.01, help="expert noise, × the weight's std")
    parser.add_argument("--router-std", type=float, default=1.0, help="spread of the initial router logits")
    parser.add_argument("--epochs", type=float, default=20.0, help="fine-tuning passes (the dense target's: 20)")
    parser.add_argument("--batch-size", type=int, default=32, help="(the dense target's: 32)")
    parser.add_argument("--lr", type=float, default=3e-4, help="fine-tuning lr (the dense target's: 3e-4)")
    parser.add_argument("--aux-coef", type=float, default=0.02, help="load-balancing loss weight (Mixtral: 0.02)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--samples", type=int, default=None, help="records used (default: all)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)


def make_moe(args: argparse.Namespace, data: Path, out: Path) -> dict:
    """Upcycle ``args.model``, fine-tune it on the qa records of ``data``, save it to ``out``; a summary."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from compress.recipe import DataSpec
    from compress_unlearn.data import QASource

    source = dense_directory(args.model)
    tokenizer = AutoTokenizer.from_pretrained(source)
    dense = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    started = time.perf_counter()
    moe = upcycle(dense, args.experts, args.top_k, args.noise, args.router_std, args.seed)
    moe.config.router_aux_loss_coef = args.aux_coef
    moe.to(args.device)
    lines = sum(1 for line in data.open(encoding="utf-8") if line.strip())
    spec = DataSpec(path=str(data), source="qa", samples=args.samples or lines, seq_len=args.seq_len, loss_on="answers")
    samples = QASource().load(spec, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    steps = max(1, math.ceil(len(samples) * args.epochs / args.batch_size))
    load_before = expert_load(moe, samples[:64], pad_id)
    curve = finetune(moe, samples, steps, args.batch_size, args.lr, pad_id)
    moe.eval()
    out.mkdir(parents=True, exist_ok=True)
    moe.config.output_router_logits = False
    moe.save_pretrained(out)
    tokenizer.save_pretrained(out)
    total = sum(p.numel() for p in moe.parameters())
    one_expert = sum(p[0].numel() for p in moe.model.layers[0].mlp.experts.parameters())
    router = moe.model.layers[0].mlp.gate.weight.numel()
    summary = {
        "dense": str(source),
        "data": str(data),
        "experts": args.experts,
        "top_k": args.top_k,
        "parameters": total,
        "uoe_trained_parameters": one_expert + router,
        "uoe_trained_fraction": (one_expert + router) / total,
        "samples": len(samples),
        "steps": steps,
        "loss_first": curve[0],
        "loss_last": curve[-1],
        "expert_load_before": load_before,
        "expert_load_after": expert_load(moe, samples[:64], pad_id),
        "seconds": time.perf_counter() - started,
        "device": args.device,
    }
    (out / "upcycle.json").write_text(json.dumps(summary, indent=1), encoding="utf-8")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True, help="qa records to fine-tune on (full.jsonl)")
    parser.add_argument("--smoke", action="store_true", help="CPU check: 8 records, 2 steps, batch 4")
    add_arguments(parser)
    args = parser.parse_args()
    if args.smoke:
        args.samples, args.epochs, args.batch_size = 8, 1.0, 4
    summary = make_moe(args, args.data, args.out)
    print(json.dumps({k: v for k, v in summary.items() if not k.startswith("expert_load")}, indent=1))


if __name__ == "__main__":
    main()
