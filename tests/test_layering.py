"""One owner per concept (files, fingerprint, registry, json_fields) and the bugs the tangle hid."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import typing
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from vit_vq import VectorQuantizer, ViTVQTokenizer, registry
from vit_vq.config import PIXEL_STATS, PixelConvention
from vit_vq.files import read_umask
from vit_vq.fingerprint import decoder_hash

ROOT = Path(__file__).resolve().parents[1]


# -- the absolute dead-code rule ----------------------------------------------------------------------
def _clustered(gen: torch.Generator, centers: torch.Tensor, n: int) -> torch.Tensor:
    pick = torch.randint(len(centers), (n,), generator=gen)
    return centers[pick] + 0.05 * torch.randn(n, centers.shape[1], generator=gen)


def _restart_counts(rule: str, threshold: float, updates: int = 120) -> tuple[list[int], float]:
    """Codes restarted at each update (counted from `_restart_dead_codes`' own mask), and the final
    quantization MSE on held-out latents of the same clusters."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    centers = torch.randn(64, 8, generator=gen) * 2
    q = VectorQuantizer(codebook_dim=8, codebook_size=256, l2_normalize=False, dead_code_rule=rule,
                        dead_code_threshold=threshold, auto_update=False).train()
    counts = []
    original = q._restart_dead_codes

    def counting() -> None:
        counts.append(int(q.dead_mask().sum()))
        original()

    q._restart_dead_codes = counting
    for _ in range(updates):
        q(_clustered(gen, centers, 512))
        q.update_codebook()
    held_out = _clustered(torch.Generator().manual_seed(9), centers, 2048)
    out = q.eval()(held_out)
    return counts, float((out.quantized - held_out).square().mean())


def test_restart_counts_per_update_on_clustered_data():
    """K=256, D=8, 512 clustered latents an update, threshold 1 latent an update (absolute) or 0.03 x mean.

    Before the fix the absolute rule restarted all 256 codes at every update until update 81
    (17,099 restarts in 120 updates): restarted codes were reset to the mean count, below the threshold.
    """
    (absolute, abs_mse), (relative, rel_mse) = _restart_counts("absolute", 1.0), _restart_counts("relative", 0.03)
    assert abs_mse < 0.1 and rel_mse < 0.1, (abs_mse, rel_mse)
    for counts in (absolute, relative):
        assert len(counts) == 120
        assert 0 < counts[0] < 256  # the first update restarts the codes the first batch left unused, not all
        assert max(counts[10:]) <= 26, counts  # then at most a tenth of the codebook an update
    assert sum(absolute) < 1000, absolute  # 17,099 before the fix
    assert max(absolute[20:]) <= 10 and sum(absolute[20:]) < 200, absolute


def test_empty_training_batch_gives_zero_losses_not_nan():
    q = VectorQuantizer(codebook_dim=8, codebook_size=16).train()
    z = torch.zeros(0, 8, requires_grad=True)
    out = q(z)
    assert out.commit_loss.item() == 0.0 and out.codebook_loss.item() == 0.0
    (out.commit_loss + out.quantized.sum()).backward()
    assert z.grad is not None and z.grad.shape == (0, 8)


@pytest.mark.parametrize("size", [0, -3, 2.5, True])
def test_restart_pool_size_must_be_positive(size):
    with pytest.raises(ValueError, match=f"restart_pool_size must be a positive int .*got {size!r}"):
        VectorQuantizer(codebook_dim=8, codebook_size=16, restart_pool_size=size)


def test_old_keywords_warn_and_build_the_same_quantizer():
    torch.manual_seed(0)
    with pytest.warns(DeprecationWarning) as caught:
        old = VectorQuantizer(dim=8, codebook_size=32, metric="l2", gradient="rotation", restart_pool=64)
    assert {str(w.message).split("(")[1].split("=")[0] for w in caught} == {"dim", "metric", "gradient", "restart_pool"}
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = VectorQuantizer(codebook_dim=8, codebook_size=32, l2_normalize=False, quantizer_gradient="rotation",
                              restart_pool_size=64)
    assert old.config == new.config and old.restart_pool.shape == new.restart_pool.shape == (64, 8)
    assert torch.equal(old.embed, new.embed)
    with pytest.warns(DeprecationWarning), pytest.raises(ValueError, match="restart_pool_size must be a positive int"):
        VectorQuantizer(dim=8, codebook_size=32, restart_pool=0)  # 0 used to mean "the default size" silently
    with pytest.warns(DeprecationWarning), pytest.raises(TypeError, match="both dim= and codebook_dim="):
        VectorQuantizer(dim=8, codebook_dim=8, codebook_size=32)


# -- the umask ----------------------------------------------------------------------------------------
def test_reading_the_umask_never_changes_it_for_other_threads(tmp_path):
    """Before: reading set the umask to 0 for a moment, and 8,020 of 20,000 files another thread
    created at that moment came out group- or world-writable."""
    old = os.umask(0o022)
    try:
        stop = threading.Event()
        seen = set()

        def reader() -> None:
            while not stop.is_set():
                seen.add(read_umask())

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            modes = []
            for i in range(3000):
                path = tmp_path / f"f{i}"
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o666)
                os.close(fd)
                modes.append(os.stat(path).st_mode & 0o777)
        finally:
            stop.set()
            thread.join()
        assert seen == {0o022}
        assert set(modes) == {0o644}, sorted({oct(m) for m in modes})
    finally:
        os.umask(old)


# -- codes metadata ------------------------------------------------------------------------------------
def _codes_file(tmp_path, tiny_tokenizer_dir):
    from vit_vq.pipeline import prepare_for_inference, save_codes

    tok, info = prepare_for_inference(ViTVQTokenizer.from_pretrained(tiny_tokenizer_dir), model_id="m", device="cpu",
                                      precision="fp32")
    path = tmp_path / "c.safetensors"
    save_codes(path, torch.randint(0, 256, (2, 8, 8)), ["a.png", "b.png"], info=info, codebook_size=256,
               image_size=32)
    return path


def _rewrite(path, out, array=None, **changes):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(path), framework="np") as f:
        meta, codes = dict(f.metadata()), f.get_tensor("codes")
    meta.update(changes)
    for key in [k for k, v in meta.items() if v is None]:
        del meta[key]
    save_file({"codes": codes if array is None else array}, str(out), metadata=meta)
    return out


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"names": '"5"'}, r"'names' must be a list of strings, got str '5'"),
        ({"names": '"ab"'}, r"'names' must be a list of strings"),
        ({"names": '{"a": 1, "b": 2}'}, r"'names' must be a list of strings, got dict"),
        ({"names": "[1, 2]"}, r"'names\[0\]' must be a string, got int 1"),
        ({"names": '["a.png", ""]'}, r"'names\[1\]' is empty"),
        ({"names": '["a\\u0000.png", "b"]'}, r"'names\[0\]' holds a NUL"),
        ({"names": "[" * 100_000 + "]" * 100_000}, r"'names' nests JSON too deeply"),
        ({"model_id": "[" * 1000 + "]" * 1000}, r"'model_id' nests JSON too deeply"),
        ({"model_id": '"' + "x" * 5000 + '"'}, r"'model_id' is 5002 characters long; at most 4096 expected"),
        ({"model_id": "5"}, r"'model_id' must be a string, got int 5"),
        ({"config_hash": "null"}, r"'config_hash' must be a string, got NoneType"),
        ({"codebook_size": "9" * 5000}, r"'codebook_size' has 5000 digits; it must be in \[1, \d+\]"),
        ({"image_size": "0"}, r"'image_size' must be in \[1, 4096\], got 0"),
        ({"codebook_size": "abc"}, r"'codebook_size' must be a whole number, got 'abc'"),
        ({"grid": "[8, 9]"}, r"metadata 'grid' is \[8, 9\] but the codes are \[8, 8\]"),
        ({"names": "not json"}, r"'names' is not valid JSON"),
        ({"names": None}, r"codes metadata has no 'names'"),
    ],
)
def test_hostile_codes_metadata_is_a_value_error_naming_the_key(tmp_path, tiny_tokenizer_dir, changes, match):
    from vit_vq.pipeline import load_codes

    bad = _rewrite(_codes_file(tmp_path, tiny_tokenizer_dir), tmp_path / "bad.safetensors", **changes)
    with pytest.raises(ValueError, match=match) as err:
        load_codes(bad)
    assert str(bad) in str(err.value)


def test_uint64_codes_beyond_the_codebook_are_reported_as_they_are(tmp_path, tiny_tokenizer_dir):
    from vit_vq.pipeline import load_codes

    huge = np.full((2, 8, 8), np.iinfo(np.uint64).max, dtype=np.uint64)
    bad = _rewrite(_codes_file(tmp_path, tiny_tokenizer_dir), tmp_path / "u64.safetensors", array=huge)
    top = np.iinfo(np.uint64).max
    with pytest.raises(ValueError, match=rf"codes must lie in \[0, 256\).*got values in \[{top}, {top}\]"):
        load_codes(bad)


def test_extra_tensors_in_a_codes_file_are_refused(tmp_path, tiny_tokenizer_dir):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    from vit_vq.pipeline import load_codes

    path = _codes_file(tmp_path, tiny_tokenizer_dir)
    with safe_open(str(path), framework="np") as f:
        meta, codes = dict(f.metadata()), f.get_tensor("codes")
    save_file({"codes": codes, "payload": np.zeros(3)}, str(tmp_path / "x.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match="holds tensors other than 'codes' \\('payload'\\)"):
        load_codes(tmp_path / "x.safetensors")


def test_names_of_ints_fail_at_load_not_later_in_the_cli(tmp_path, tiny_tokenizer_dir, capsys):
    from vit_vq.cli.main import main

    bad = _rewrite(_codes_file(tmp_path, tiny_tokenizer_dir), tmp_path / "bad.safetensors", names="[1, 2]")
    assert main(["decode", str(bad), "-o", str(tmp_path / "out"), "--model", str(tiny_tokenizer_dir)]) == 2
    err = capsys.readouterr().err
    assert "'names[0]' must be a string" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# -- the registry, names and layers ------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(registry.BUNDLED))
def test_registry_hashes_are_those_of_the_bundled_files(name):
    tok = ViTVQTokenizer.from_pretrained(f"vit_vq:{name}")
    row = registry.BUNDLED[name]
    assert tok.config.config_hash() == row.config_hash
    assert decoder_hash(tok) == row.decoder_hash
    assert registry.bundled_name_for(row.config_hash, row.decoder_hash) == f"vit_vq:{name}"
    assert registry.bundled_model_dir(name).name == row.folder


def test_reading_a_name_never_touches_the_file_system_but_loading_recovers(tmp_path):
    from vit_vq.files import lost_to_a_crash
    from vit_vq.hub import resolve_model_name

    tok = ViTVQTokenizer(dataclasses.replace(ViTVQTokenizer.default().config))
    folder = tmp_path / "m"
    tok.save_pretrained(folder)
    os.replace(folder, tmp_path / ".m.old-1234")  # a crash between the two renames of a save
    before = sorted(p.name for p in tmp_path.iterdir())
    assert resolve_model_name(str(folder)) == folder and lost_to_a_crash(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # reading the name renamed nothing
    loaded = ViTVQTokenizer.from_pretrained(folder)
    assert folder.is_dir() and torch.equal(loaded.quantizer.embed, tok.quantizer.embed)


def test_pixel_conventions_are_listed_once():
    assert tuple(PIXEL_STATS) == typing.get_args(PixelConvention)


def test_library_errors_state_facts_without_flags():
    from vit_vq.pipeline.runtime import pick_device

    for bad in ("nope", "cuda:0" if not torch.cuda.is_available() else "nope2"):
        with pytest.raises(ValueError) as err:
            pick_device(bad)
        assert "--" not in str(err.value) and repr(bad) in str(err.value)


def test_imports_go_one_way():
    tool = ROOT.parent / "shared" / "tools" / "import_graph.py"
    if not tool.is_file():
        pytest.skip("the shared import-graph tool is not beside this checkout")
    out = subprocess.run([sys.executable, str(tool), str(ROOT / "vit_vq")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "0 cycle(s), 0 upward import(s)" in out.stdout, out.stdout + out.stderr


def test_a_revision_for_a_bundled_name_is_refused_not_ignored(capsys, tmp_path, photo_dir):
    from vit_vq.cli.main import main

    with pytest.raises(ValueError, match=r"vit_vq:default is bundled with the package and has no revisions, got revision 'v2'"):
        ViTVQTokenizer.from_pretrained("vit_vq:default", revision="v2")
    code = main(["encode", str(photo_dir), "-o", str(tmp_path / "c.safetensors"), "--revision", "main",
                 "--num-workers", "0", "--device", "cpu"])
    assert code == 2 and "has no revisions" in capsys.readouterr().err


def test_a_5000_digit_integer_in_config_json_names_the_file(tmp_path):
    from vit_vq import ViTVQConfig

    folder = tmp_path / "m"
    ViTVQTokenizer(ViTVQConfig.from_preset("tiny")).save_pretrained(folder)
    text = (folder / "config.json").read_text().replace('"image_size": 32', '"image_size": ' + "9" * 5000)
    (folder / "config.json").write_text(text)
    with pytest.raises(ValueError, match=r"config.json is not valid JSON \(an integer of 5000 digits \(at most 19\)"):
        ViTVQTokenizer.from_pretrained(folder)


def test_training_errors_name_config_fields_and_the_cli_turns_them_into_flags():
    from vit_vq.cli.main import one_line

    message = "stopped; try a lower TrainConfig.lr, TrainConfig.mixed_precision='bf16', TrainConfig.resume='latest'"
    assert one_line(ValueError(message)) == "stopped; try a lower --lr, --mixed-precision bf16, --resume latest"
    from vit_vq.training.losses import _unavailable_message

    text = _unavailable_message("no file", 0.5)
    assert "--" not in text and "TrainConfig.perceptual_weight=0" in text  # the library speaks of fields
    assert "--perceptual-weight 0" in one_line(ValueError(text))  # the command line of flags


def test_a_format_1_file_without_decoder_hash_still_warns(tmp_path, tiny_tokenizer_dir):
    """Claiming format 1 must not switch the weights check off silently (attacker review)."""
    from vit_vq.pipeline import load_codes

    bad = _rewrite(_codes_file(tmp_path, tiny_tokenizer_dir), tmp_path / "v1.safetensors", format_version="1",
                   decoder_hash=None)
    with pytest.warns(UserWarning, match=r"codes format 1\) with no decoder_hash; the decoder weights cannot be checked"):
        load_codes(bad)


def test_a_grid_without_tokens_is_refused_at_load(tmp_path, tiny_tokenizer_dir):
    from vit_vq.pipeline import load_codes

    empty = np.zeros((2, 0, 8), np.uint8)
    bad = _rewrite(_codes_file(tmp_path, tiny_tokenizer_dir), tmp_path / "z.safetensors", array=empty, grid="[0, 8]")
    with pytest.raises(ValueError, match=r"hold grids with no tokens"):
        load_codes(bad)


def test_output_names_from_someone_elses_file_stay_inside_and_apart():
    from vit_vq.cli.common import MAX_NAME_DEPTH, output_names

    names = ["..", ".", "a", "a.png/b", "/etc/passwd", "../../x.png", "d/" * 2000 + "e", "n" * 300, "a"]
    out = output_names(names)
    assert len(set(out)) == len(out) == len(names)
    for path in out:
        assert not path.is_absolute() and ".." not in path.parts and "." not in path.parts
        assert len(path.parts) <= MAX_NAME_DEPTH + 1 and all(len(p.encode()) <= 255 for p in path.parts)
    files = set(out)
    assert not any(parent in files for path in out for parent in path.parents)  # no name is another's folder
    assert out[2] == Path("a.png") and out[8] == Path("a-1.png") and out[4] == Path("passwd.png")
