"""Packaging contract: a light import and the public names."""

import subprocess
import sys


def test_import_is_light():
    code = (
        "import sys, vit_vq\n"
        "heavy = [m for m in ('transformers', 'accelerate', 'triton', 'torchvision', 'datasets') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"import vit_vq pulled in: {out.stdout.strip()}"


def test_public_names():
    import vit_vq
    from vit_vq.ops import nearest_code

    for name in vit_vq.__all__:
        assert getattr(vit_vq, name) is not None
    assert callable(nearest_code)
    assert vit_vq.ViTVQTokenizer.__doc__ and vit_vq.ViTVQConfig.__doc__
