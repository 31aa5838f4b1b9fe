"""Loading a hostile or broken folder: the weights are checked before the config may allocate.

Each test edits a real saved folder (config.json / model.safetensors written and read back)
and checks the refusal, and that no model was built before it (construction is counted).
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from vit_vq import ViTVQConfig, ViTVQTokenizer


@pytest.fixture
def folder(tmp_path):
    torch.manual_seed(0)
    ViTVQTokenizer(ViTVQConfig.from_preset("tiny")).save_pretrained(tmp_path / "m")
    return tmp_path / "m"


@pytest.fixture
def constructions(monkeypatch):
    """How many ViTVQTokenizer objects were built, on any device (meta included)."""
    count = []
    init = ViTVQTokenizer.__init__

    def counting(self, *args, **kwargs):
        count.append(torch.get_default_device().type)
        init(self, *args, **kwargs)

    monkeypatch.setattr(ViTVQTokenizer, "__init__", counting)
    return count


def _edit_config(folder, **fields):
    path = folder / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **fields}))


def test_a_million_layer_config_is_refused_before_any_model_is_built(folder, constructions):
    _edit_config(folder, encoder_depth=1_000_000)
    with pytest.raises(ValueError, match=r"encoder_depth must be <= 256 \(vit_vq\.config\.MAX_SIZES\), got 1000000"):
        ViTVQTokenizer.from_pretrained(folder)
    assert constructions == []


def test_a_depth_within_bounds_is_checked_against_the_stored_blocks_before_building(folder, constructions):
    _edit_config(folder, decoder_depth=200)
    with pytest.raises(ValueError, match=r"decoder_depth=200 but the weights hold 2 blocks under decoder\.transformer\.blocks"):
        ViTVQTokenizer.from_pretrained(folder)
    assert constructions == []


def test_codebook_size_3e8_is_refused_naming_the_limit():
    with pytest.raises(ValueError, match=r"codebook_size must be <= 4194304 \(vit_vq\.config\.MAX_SIZES\), got 300000000"):
        ViTVQConfig.from_preset("tiny", codebook_size=300_000_000)
    with pytest.raises(ValueError, match=r"codebook_size \* codebook_dim must be <= 268435456"):
        ViTVQConfig.from_preset("tiny", codebook_size=2**22, codebook_dim=128)


def test_sizes_within_bounds_are_checked_against_stored_shapes_on_meta_only(folder, constructions):
    _edit_config(folder, codebook_size=2**22)  # 4M codes x 8: would allocate 400 MB of buffers
    with pytest.raises(ValueError, match=r"quantizer\.embed: file \(256, 8\) vs config \(4194304, 8\)"):
        ViTVQTokenizer.from_pretrained(folder)
    assert constructions == ["meta"]


def test_mismatch_messages_are_capped(folder):
    state = load_file(folder / "model.safetensors")
    extra = {f"junk.{i:04d}": torch.zeros(1) for i in range(3000)}
    save_file({**state, **extra}, folder / "model.safetensors")
    with pytest.raises(ValueError) as info:
        ViTVQTokenizer.from_pretrained(folder)
    message = str(info.value)
    assert "unexpected keys [junk.0000, junk.0001, junk.0002, junk.0003, junk.0004, ...] (3000 in all)" in message
    assert len(message) < 500 and "\n" not in message


def test_non_finite_weights_are_refused_naming_the_tensor(folder):
    state = load_file(folder / "model.safetensors")
    state["quantizer.embed"][3, 1] = float("nan")
    state["decoder.to_pixels.weight"][0, :2] = float("inf")
    save_file(state, folder / "model.safetensors")
    named = r"decoder\.to_pixels\.weight \(2 of 3072\), quantizer\.embed \(1 of 2048\)"
    with pytest.raises(ValueError, match=rf"NaN/Inf weights in \[{named}\]"):
        ViTVQTokenizer.from_pretrained(folder)


def test_float64_beyond_float32_range_is_refused_after_the_cast(folder):
    state = load_file(folder / "model.safetensors")
    state["decoder.to_pixels.weight"] = state["decoder.to_pixels.weight"].double()
    state["decoder.to_pixels.weight"][0, :3] = 1e300  # finite in float64, Inf in float32
    save_file(state, folder / "model.safetensors")
    assert torch.isfinite(load_file(folder / "model.safetensors")["decoder.to_pixels.weight"]).all()
    named = r"\[decoder\.to_pixels\.weight \(3 of 3072\)\]"
    with pytest.raises(ValueError, match=rf"NaN/Inf weights once cast to the model's dtype .* in {named}"):
        ViTVQTokenizer.from_pretrained(folder)


def test_float64_within_range_loads_as_the_float32_it_rounds_to(folder):
    state = load_file(folder / "model.safetensors")
    wide = {k: v.double() if v.is_floating_point() else v for k, v in state.items()}
    save_file(wide, folder / "model.safetensors")
    loaded = ViTVQTokenizer.from_pretrained(folder).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize("dtype", [torch.int32, torch.uint8, torch.bool])
def test_an_integer_tensor_for_a_float_parameter_is_refused_naming_it(folder, dtype):
    state = load_file(folder / "model.safetensors")
    state["quantizer.embed"] = state["quantizer.embed"].to(dtype)
    save_file(state, folder / "model.safetensors")
    name = str(dtype).removeprefix("torch.")
    with pytest.raises(ValueError, match=rf"dtypes the model cannot take: \[quantizer\.embed: file {name} vs model float32\]"):
        ViTVQTokenizer.from_pretrained(folder)


def test_a_float_tensor_for_the_bool_buffer_is_refused(folder):
    state = load_file(folder / "model.safetensors")
    state["quantizer.initialized"] = state["quantizer.initialized"].float()
    save_file(state, folder / "model.safetensors")
    with pytest.raises(ValueError, match=r"\[quantizer\.initialized: file float32 vs model bool\]"):
        ViTVQTokenizer.from_pretrained(folder)


def test_weights_beyond_the_range_of_torch_dtype_are_refused(folder):
    state = load_file(folder / "model.safetensors")
    state["encoder.patch_embed.weight"][0, 0, 0, 0] = 1e5  # float32 fine, float16 Inf
    save_file(state, folder / "model.safetensors")
    assert ViTVQTokenizer.from_pretrained(folder, torch_dtype=torch.bfloat16) is not None
    with pytest.raises(ValueError, match=r"once cast to torch_dtype=torch\.float16 .* \[encoder\.patch_embed\.weight \(1 of"):
        ViTVQTokenizer.from_pretrained(folder, torch_dtype=torch.float16)


def test_the_packaged_default_stores_float16_and_still_loads_bit_for_bit():
    from vit_vq.default_model import default_model_dir

    stored = load_file(default_model_dir() / "model.safetensors")
    assert {v.dtype for v in stored.values()} >= {torch.float16, torch.float32}
    loaded = ViTVQTokenizer.from_pretrained("vit_vq:default").state_dict()
    assert loaded.keys() == stored.keys()
    assert all(loaded[k].dtype == (torch.bool if v.dtype == torch.bool else torch.float32) for k, v in stored.items())
    assert all(torch.equal(loaded[k], v.to(loaded[k].dtype)) for k, v in stored.items())


@pytest.mark.parametrize(
    "text, match",
    [
        ("[" * 100_000 + "]" * 100_000, "nests JSON too deeply"),
        ('{"a": ' * 50_000 + "1" + "}" * 50_000, "nests JSON too deeply"),
        ('{"image_size": ', "is not valid JSON"),
        (b"\xff\xfe{}", "is not valid JSON"),
        ("[1, 2]", "must hold a JSON object, got list"),
    ],
)
def test_unparseable_configs_are_one_line_value_errors(folder, text, match):
    path = folder / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ValueError, match=match) as info:
        ViTVQTokenizer.from_pretrained(folder)
    assert "\n" not in str(info.value) and len(str(info.value)) < 500


@pytest.mark.parametrize(
    "fields, match",
    [
        ({"format_version": "1"}, r"format_version must be a positive integer, got '1'"),
        ({"format_version": True}, r"format_version must be a positive integer, got True"),
        ({"format_version": -7}, r"format_version must be a positive integer, got -7"),
        ({"encoder_depth": True}, r"encoder_depth must be a positive int, got True"),
        ({"encoder_depth": -7}, r"encoder_depth must be a positive int, got -7"),
        ({"codebook_size": 3e8}, r"codebook_size must be a positive int, got 300000000\.0"),
        ({"l2_normalize": "false"}, r"l2_normalize must be true or false, got 'false'"),
        ({"use_ema": 0}, r"use_ema must be true or false, got 0"),
        ({"image_size": 4096, "patch_size": 8}, r"image_size // patch_size must be <= 256 tokens per side"),
        ({"mlp_ratio": 1e6}, r"mlp_ratio must be in \(0, 64\.0\]"),
    ],
)
def test_wrong_json_types_and_values_are_refused_naming_the_field(folder, constructions, fields, match):
    _edit_config(folder, **fields)
    with pytest.raises(ValueError, match=match):
        ViTVQTokenizer.from_pretrained(folder)
    assert constructions == []


def test_an_oversized_config_file_is_refused_unread(folder):
    (folder / "config.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(ValueError, match=r"config\.json is 2097154 bytes; a vit_vq config\.json is under 1048576 bytes"):
        ViTVQTokenizer.from_pretrained(folder)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("name", ["model.safetensors", "config.json"])
def test_a_fifo_in_place_of_a_file_is_reported_as_a_fifo_without_blocking(folder, name):
    (folder / name).unlink()
    os.mkfifo(folder / name)
    with pytest.raises(ValueError, match=rf"{name.replace('.', '[.]')} is a FIFO \(named pipe\)"):
        ViTVQTokenizer.from_pretrained(folder)


def test_a_dangling_link_is_reported_as_such(folder):
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(folder / "gone.safetensors")
    with pytest.raises(FileNotFoundError, match=r"model\.safetensors does not exist \(or is a link to nothing\)"):
        ViTVQTokenizer.from_pretrained(folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_an_unreadable_weights_file_is_a_permission_error_not_truncation(folder):
    os.chmod(folder / "model.safetensors", 0)
    with pytest.raises(PermissionError, match=r"cannot read .*model\.safetensors: permission denied"):
        ViTVQTokenizer.from_pretrained(folder)



def test_config_errors_stay_short_whatever_the_config_holds(folder):
    _edit_config(folder, **{f"bogus_{i}": i for i in range(3000)})
    first = r"\['bogus_0', 'bogus_1', 'bogus_10', 'bogus_100', 'bogus_1000'\]"
    with pytest.raises(ValueError, match=rf"unknown ViTVQConfig keys {first} \(3000 in all\)") as info:
        ViTVQTokenizer.from_pretrained(folder)
    assert len(str(info.value)) < 1000
    (folder / "config.json").write_text(json.dumps({"pixel_convention": "x" * 500_000}))
    with pytest.raises(ValueError, match=r"pixel_convention must be one of .*\.\.\. \(500\d{3} characters\)$") as info:
        ViTVQTokenizer.from_pretrained(folder)
    assert len(str(info.value)) < 1000
