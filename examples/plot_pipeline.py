"""Draw the docs' front-page figure: image -> code grid -> image, with the bundled tokenizer.

    python examples/plot_pipeline.py --out docs/img/pipeline.png

The code grid is coloured by a 3-D PCA of the code vectors, so similar codes get similar colours.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vit_vq import ViTVQTokenizer  # noqa: E402
from vit_vq.default_model import sample_photos  # noqa: E402


def code_colours(tok: ViTVQTokenizer, codes: torch.Tensor) -> torch.Tensor:
    """`[h, w]` codes -> `[h, w, 3]` colours in [0, 1] from a PCA of the codebook."""
    book = tok.quantizer.codebook()
    centred = book - book.mean(0)
    _, _, v = torch.pca_lowrank(centred, q=3, center=False)
    proj = centred @ v  # (K, 3)
    proj = (proj - proj.amin(0)) / (proj.amax(0) - proj.amin(0)).clamp(min=1e-8)
    return proj[codes]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="pipeline.png", help="output PNG")
    parser.add_argument("--photo", default=None, help="an image file (default: a bundled held-out photo)")
    args = parser.parse_args(argv)

    tok = ViTVQTokenizer.default()
    photo = Path(args.photo) if args.photo else sample_photos()[0]
    x = tok.preprocess(Image.open(photo))
    codes = tok.encode(x)
    recon = tok.decode(codes)
    g = tok.config.grid_size

    fig, axes = plt.subplots(1, 3, figsize=(9, 3.3))
    axes[0].imshow(x[0].permute(1, 2, 0).numpy())
    axes[0].set_title(f"image {tok.config.image_size}x{tok.config.image_size}")
    axes[1].imshow(code_colours(tok, codes[0]).numpy(), interpolation="nearest")
    axes[1].set_title(f"{g}x{g} codes of {tok.config.codebook_size}")
    axes[2].imshow(recon[0].permute(1, 2, 0).numpy())
    axes[2].set_title("decoded")
    for ax in axes:
        ax.axis("off")
    fig.suptitle("encode → integer code grid → decode  (vit_vq default tokenizer)", fontsize=10)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
