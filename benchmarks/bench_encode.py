"""Encode / decode throughput of vit_vq against the reference design, in one run.

    python benchmarks/bench_encode.py --out OUT            # GPU: seed preset, 16384 codes, batch 64
    python benchmarks/bench_encode.py --small --out OUT    # CPU: tiny preset

Reference (built here, random weights, no download): a transformers `ViTModel` encoder
(ViT-B/16 at 224 px for the seed preset) + a linear projection to the code dimension + the
naive `|z|^2 - 2 z.e + |e|^2` argmin over the codebook; the decoder embeds codes, runs a
second `ViTModel` over them (a 1x1 "patch" embedding of the code grid) and projects every
token to a pixel patch. Its bf16 runs cast the modules to bf16 and keep the lookup in fp32.

vit_vq: `ViTVQTokenizer.encode` / `decode` (fp32; bf16 by casting the encoder and decoder,
or by autocast; bf16 + `torch.compile` of the transformer blocks). The codebook lookup is
`nearest_code`, fp32 "exact", on whichever backend it picks (the fused Triton kernel on CUDA).

Writes `bench_encode.json`, `bench_encode.md` and `bench_encode.png` into `--out` and
prints the table. Rows run most-important first and stop at `--budget-s`.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vit_vq import ViTVQConfig, ViTVQTokenizer
from vit_vq.ops import nearest_code
from vit_vq.pipeline.runtime import cast_for_inference, lookup_backend

REFERENCE_H100 = {"fp32 encode": 987, "fp32 decode": 1026, "bf16 encode": 4193, "bf16 decode": 5461, "bf16 encoder": 6907}
TARGETS = {"encode": 7000, "decode": 6000}  # bf16 img/s on the same card, in the same run as the reference


# -- the reference design --------------------------------------------------------------------
class ReferenceTokenizer(nn.Module):
    """transformers ViT encoder + linear + naive argmin; embedding + ViT decoder + linear to patches."""

    def __init__(self, cfg: ViTVQConfig) -> None:
        super().__init__()
        from transformers import ViTConfig, ViTModel

        common = dict(
            hidden_size=cfg.encoder_width, num_hidden_layers=cfg.encoder_depth, num_attention_heads=cfg.encoder_heads,
            intermediate_size=int(cfg.encoder_width * cfg.mlp_ratio), layer_norm_eps=cfg.layer_norm_eps,
        )
        self.cfg = cfg
        enc = ViTConfig(image_size=cfg.image_size, patch_size=cfg.patch_size, **common)
        self.encoder = ViTModel(enc, add_pooling_layer=False)
        self.to_code = nn.Linear(cfg.encoder_width, cfg.codebook_dim)
        self.codebook = nn.Parameter(torch.randn(cfg.codebook_size, cfg.codebook_dim))
        dec = dict(
            common, hidden_size=cfg.decoder_width, num_hidden_layers=cfg.decoder_depth, num_attention_heads=cfg.decoder_heads,
            intermediate_size=int(cfg.decoder_width * cfg.mlp_ratio),
        )
        dec_cfg = ViTConfig(image_size=cfg.grid_size, patch_size=1, num_channels=cfg.codebook_dim, **dec)
        self.decoder = ViTModel(dec_cfg, add_pooling_layer=False)
        self.to_pixels = nn.Linear(cfg.decoder_width, cfg.patch_size**2 * 3)

    def encode_latents(self, x: torch.Tensor) -> torch.Tensor:
        h = self.encoder(pixel_values=x).last_hidden_state[:, 1:]  # (B, h*w, W), CLS dropped
        return self.to_code(h)  # (B, h*w, D)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode_latents(x).flatten(0, 1).float()  # (N, D) fp32
        e = self.codebook.float()  # (K, D)
        d = z.pow(2).sum(1, keepdim=True) - 2 * z @ e.T + e.pow(2).sum(1)  # (N, K)
        return d.argmin(1).view(x.shape[0], self.cfg.grid_size, self.cfg.grid_size)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        g, p = self.cfg.grid_size, self.cfg.patch_size
        e = F.embedding(codes, self.codebook).to(self.to_pixels.weight.dtype)  # (B, h, w, D)
        h = self.decoder(pixel_values=e.permute(0, 3, 1, 2)).last_hidden_state[:, 1:]  # (B, h*w, W)
        x = self.to_pixels(h).view(-1, g, g, p, p, 3)  # (B, h, w, p, p, 3)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(-1, 3, g * p, g * p)  # (B, 3, H, W)


# -- timing -----------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn: Callable[[], Any], batch: int, device: torch.device, warmup: int, iters: int) -> dict[str, float]:
    """Images/s from the median of `iters` timed calls after `warmup` calls.

    The median resists other jobs on a shared machine; the first call's time (compilation
    included) is reported as `first_call_s`.
    """
    times = []
    with torch.inference_mode():
        for _ in range(warmup + iters):
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    first, timed = times[0], sorted(times[warmup:])
    median = timed[len(timed) // 2] if len(timed) % 2 else 0.5 * (timed[len(timed) // 2 - 1] + timed[len(timed) // 2])
    return {"images_per_s": batch / median, "ms_per_batch": 1e3 * median, "first_call_s": first}


def build(cfg: ViTVQConfig, device: torch.device, seed: int = 0) -> tuple[ReferenceTokenizer, ViTVQTokenizer]:
    torch.manual_seed(seed)
    with torch.device(device):
        ref = ReferenceTokenizer(cfg).eval()
        ours = ViTVQTokenizer(cfg).eval()
    return ref, ours


def run(args: argparse.Namespace) -> dict[str, Any]:
    start = time.perf_counter()
    device = torch.device(args.device)
    preset = "tiny" if args.small else "seed"
    cfg = ViTVQConfig.from_preset(preset, **({} if args.small else {"codebook_size": 16384}))
    B, S = args.batch, cfg.image_size
    ref, ours = build(cfg, device)
    x = torch.rand(B, 3, S, S, device=device)
    codes = torch.randint(0, cfg.codebook_size, (B, cfg.grid_size, cfg.grid_size), device=device)
    norm = ((x - ours.pixel_mean) / ours.pixel_std)  # what the encoder sees

    rows: list[dict[str, Any]] = []

    def add(impl: str, precision: str, op: str, fn: Callable[[], Any], note: str = "") -> None:
        row = {"impl": impl, "precision": precision, "op": op, "note": note}
        if time.perf_counter() - start > args.budget_s:
            row["error"] = "skipped: time budget"
        else:
            try:
                row.update(measure(fn, B, device, args.warmup, args.iters))
            except Exception as err:  # one failing row (e.g. a compile error) must not lose the others
                row["error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
        rows.append(row)
        shown = f"{row['images_per_s']:10.1f} img/s" if "images_per_s" in row else row["error"]
        print(f"  {impl:<10} {precision:<14} {op:<8} {shown}", file=sys.stderr, flush=True)

    # reference, bf16 (the numbers to beat)
    ref_bf16 = copy.deepcopy(ref)
    ref_bf16.encoder.to(torch.bfloat16)
    ref_bf16.decoder.to(torch.bfloat16)
    ref_bf16.to_code.to(torch.bfloat16)
    ref_bf16.to_pixels.to(torch.bfloat16)
    xb = x.to(torch.bfloat16)
    add("reference", "bf16", "encode", lambda: ref_bf16.encode(xb))
    add("reference", "bf16", "decode", lambda: ref_bf16.decode(codes))
    add("reference", "bf16", "encoder", lambda: ref_bf16.encode_latents(xb))

    # vit_vq, bf16: eager (cast), then compiled
    bf = cast_for_inference(copy.deepcopy(ours), "bf16")
    nb = norm.to(torch.bfloat16)
    add("vit_vq", "bf16", "encode", lambda: bf.encode(x, validate=False))
    add("vit_vq", "bf16", "decode", lambda: bf.decode(codes, validate=False))
    add("vit_vq", "bf16", "encoder", lambda: bf.encoder(nb))
    if args.compile:
        bf.compile(mode=args.compile_mode, scope=args.compile_scope, dynamic=False)
        note = f"torch.compile ({args.compile_scope}, {args.compile_mode or 'default'})"
        add("vit_vq", "bf16+compile", "encode", lambda: bf.encode(x, validate=False), note)
        add("vit_vq", "bf16+compile", "decode", lambda: bf.decode(codes, validate=False), note)
        add("vit_vq", "bf16+compile", "encoder", lambda: bf.encoder(nb), note)

    # fp32 rows, then bf16 by autocast
    add("reference", "fp32", "encode", lambda: ref.encode(x))
    add("reference", "fp32", "decode", lambda: ref.decode(codes))
    add("vit_vq", "fp32", "encode", lambda: ours.encode(x, validate=False))
    add("vit_vq", "fp32", "decode", lambda: ours.decode(codes, validate=False))

    def autocast(fn: Callable[[], Any]) -> Callable[[], Any]:
        def wrapped() -> Any:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                return fn()

        return wrapped

    add("vit_vq", "bf16-autocast", "encode", autocast(lambda: ours.encode(x, validate=False)))
    add("vit_vq", "bf16-autocast", "decode", autocast(lambda: ours.decode(codes, validate=False)))

    # the lookup alone, on this batch's latents
    with torch.inference_mode():
        z = ours.quantizer.prepare(ours.encoder(norm)).flatten(0, 1).contiguous()  # (N, D) fp32
    cb = ours.quantizer.codebook()
    e_sq = cb.pow(2).sum(1)
    lookups = {
        "naive": lambda: (z.pow(2).sum(1, keepdim=True) - 2 * z @ cb.T + e_sq).argmin(1),
        "nearest_code exact": lambda: nearest_code(z, cb, metric=ours.quantizer.metric, precision="exact"),
        "nearest_code fast": lambda: nearest_code(z, cb, metric=ours.quantizer.metric, precision="fast"),
    }
    lookup_rows = {}
    for name, fn in lookups.items():
        if time.perf_counter() - start > args.budget_s:
            break
        try:
            lookup_rows[name] = measure(fn, B, device, args.warmup, args.iters)["ms_per_batch"]
        except Exception as err:
            lookup_rows[name] = f"{type(err).__name__}: {str(err).splitlines()[0][:160]}"
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "triton": _version("triton"),
        "preset": preset,
        "codebook_size": cfg.codebook_size,
        "codebook_dim": cfg.codebook_dim,
        "image_size": S,
        "tokens": cfg.num_tokens,
        "batch": B,
        "lookup_backend": lookup_backend(device),
        "allow_tf32": torch.backends.cuda.matmul.allow_tf32,
        "rows": rows,
        "lookup_ms": lookup_rows,
        "wall_s": time.perf_counter() - start,
    }


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


# -- report -----------------------------------------------------------------------------------
def ips(result: dict[str, Any], impl: str, precision: str, op: str) -> float | None:
    for r in result["rows"]:
        if (r["impl"], r["precision"], r["op"]) == (impl, precision, op):
            return r.get("images_per_s")
    return None


def summary(result: dict[str, Any]) -> list[str]:
    """Target checks and the lookup's share of the encode time."""
    lines = [] if result["preset"] == "seed" else ["(the img/s targets apply to the seed preset on an H100)"]
    best = {op: max((v for p in ("bf16", "bf16+compile", "bf16-autocast") if (v := ips(result, "vit_vq", p, op))), default=None)
            for op in TARGETS}
    for op, target in TARGETS.items() if result["preset"] == "seed" else ():
        ref = ips(result, "reference", "bf16", op)
        got = best[op]
        if got is None:
            lines.append(f"bf16 {op}: no measurement")
            continue
        verdict = "meets" if got >= target else "misses"
        vs = f", {got / ref:.2f}x the reference ({ref:.0f})" if ref else ""
        lines.append(f"bf16 {op}: best {got:.0f} img/s {verdict} the {target} img/s target{vs}")
    lookup = result["lookup_ms"].get("nearest_code exact")
    for precision in ("bf16+compile", "bf16"):
        enc = ips(result, "vit_vq", precision, "encode")
        if enc and isinstance(lookup, float):
            share = lookup / (1e3 * result["batch"] / enc)
            lines.append(f"lookup (nearest_code exact, {lookup:.2f} ms) is {share:.1%} of the {precision} encode time")
            break
    return lines


def markdown(result: dict[str, Any]) -> str:
    head = (
        f"{result['device']}, torch {result['torch']}, transformers {result['transformers']}, triton {result['triton']}; "
        f"preset `{result['preset']}` ({result['image_size']} px, {result['tokens']} tokens, "
        f"{result['codebook_size']} x {result['codebook_dim']} codebook), batch {result['batch']}, "
        f"lookup backend `{result['lookup_backend']}`."
    )
    lines = [head, "", "| impl | precision | op | img/s | ms / batch | first call (s) |", "|---|---|---|---:|---:|---:|"]
    for r in result["rows"]:
        if "images_per_s" in r:
            lines.append(
                f"| {r['impl']} | {r['precision']} | {r['op']} | {r['images_per_s']:.1f} | {r['ms_per_batch']:.2f} | "
                f"{r['first_call_s']:.1f} |"
            )
        else:
            lines.append(f"| {r['impl']} | {r['precision']} | {r['op']} | {r['error']} | | |")
    lines += ["", "Lookup alone on one batch of latents (ms): "
              + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k}: {v}" for k, v in result["lookup_ms"].items())]
    lines += ["", *[f"- {s}" for s in summary(result)], ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> bool:
    """A bar chart of img/s; False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if "images_per_s" in r]
    labels = [f"{r['impl']} {r['precision']} {r['op']}" for r in rows]
    colors = ["#999999" if r["impl"] == "reference" else "#1f77b4" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2))
    ax.barh(labels[::-1], [r["images_per_s"] for r in rows][::-1], color=colors[::-1])
    if result["preset"] == "seed":
        for op, target in TARGETS.items():
            ax.axvline(target, ls="--", lw=1, color="red" if op == "encode" else "orange", label=f"{op} target {target}")
        ax.legend(loc="lower right", fontsize=8)
    ax.set_xlabel("images / s (higher is better)")
    ax.set_title(f"{result['device']}: preset {result['preset']}, batch {result['batch']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description="Encode/decode throughput: vit_vq vs the reference design.")
    p.add_argument("--out", required=True, help="folder for bench_encode.{json,md,png}")
    p.add_argument("--small", action="store_true", help="tiny preset (for CPU)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--iters", type=int, default=None, help="timed calls per row (default 20 on GPU, 5 on CPU)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on for CUDA, off for CPU")
    p.add_argument("--compile-scope", choices=("blocks", "model"), default="blocks", help="blocks compiles fastest")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode (default: inductor default)")
    p.add_argument("--budget-s", type=float, default=110.0, help="skip the remaining rows after this many seconds")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.compile is None:
        args.compile = args.device.startswith("cuda")
    if args.iters is None:
        args.iters = 20 if args.device.startswith("cuda") else 5

    result = run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_encode.json").write_text(json.dumps(result, indent=2) + "\n")
    md = markdown(result)
    (out / "bench_encode.md").write_text(md)
    written = "json,md,png" if plot(result, out / "bench_encode.png") else "json,md (no matplotlib: no PNG)"
    print(md)
    print(f"wrote {out}/bench_encode.{{{written}}} in {result['wall_s']:.0f} s", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
