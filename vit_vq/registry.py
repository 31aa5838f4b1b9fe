"""The tokenizers bundled with the package, as one table.

A bundled tokenizer is named `vit_vq:<name>` and lives in `vit_vq/assets/<folder>/`. Its config
hash and decoder hash are pinned here (a test recomputes them from the assets), so finding the
bundled model that made some codes is a table lookup that loads no model. `aliases` are other
model ids that codes files have recorded for it (vit_vq 0.1 recorded its default as `default`).

To bundle a new default: add a row, point `DEFAULT_NAME`'s row at it, keep the old rows so
their codes still decode.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

NAME_PREFIX = "vit_vq:"


@dataclass(frozen=True)
class Bundled:
    """One bundled tokenizer: its folder under `vit_vq/assets/` and the hashes of what it decodes with."""

    folder: str
    config_hash: str  # ViTVQConfig.config_hash()
    decoder_hash: str  # vit_vq.fingerprint.decoder_hash of the weights as stored
    aliases: tuple[str, ...] = ()
    description: str = ""


BUNDLED: dict[str, Bundled] = {
    "default": Bundled("default", "72bc3d5a4b2c3c80", "e7de8e5bf7118ba7", description="the current default (v2)"),
    "default-v1": Bundled(
        "default_v1", "86fd93c4e8075ac7", "9a004f57f3eff907", aliases=("default",), description="the default of vit_vq 0.1",
    ),
}
DEFAULT_NAME = "default"
DEFAULT_MODEL = NAME_PREFIX + DEFAULT_NAME  # what every command uses when no model is named
SAMPLES_FOLDER = "samples"


def is_bundled_name(name: object) -> bool:
    """Whether `name` is spelled `vit_vq:<something>` (known or not)."""
    return isinstance(name, str) and name.startswith(NAME_PREFIX)


def bundled_entry(name: str) -> tuple[str, Bundled]:
    """`(short name, row)` for `vit_vq:<name>`.

    Raises:
        ValueError: an unknown bundled name; the message lists the known ones.
    """
    short = name.removeprefix(NAME_PREFIX)
    if short not in BUNDLED:
        known = ", ".join(NAME_PREFIX + n for n in BUNDLED)
        raise ValueError(f"unknown bundled model {name!r}; known names: {known}")
    return short, BUNDLED[short]


def asset_folder(folder: str, what: str) -> Path:
    """A folder inside the installed package's `assets/` (vit_vq installs as plain files, never zipped).

    Raises:
        FileNotFoundError: the package was installed without it.
    """
    path = Path(str(resources.files("vit_vq").joinpath("assets", folder)))
    if not path.is_dir():
        raise FileNotFoundError(f"{what} is missing ({path}); reinstall vit_vq from a wheel or sdist")
    return path


def bundled_model_dir(name: str) -> Path:
    """The folder of the bundled model `vit_vq:<name>` (or `<name>`).

    Raises:
        ValueError: an unknown name.
        FileNotFoundError: the package was installed without its assets.
    """
    short, row = bundled_entry(name if is_bundled_name(name) else NAME_PREFIX + name)
    what = "the packaged default tokenizer" if short == DEFAULT_NAME else f"the bundled tokenizer {NAME_PREFIX}{short}"
    return asset_folder(row.folder, what)


def bundled_name_for(config_hash: object, decoder_hash: object = None) -> str | None:
    """`vit_vq:<name>` of the bundled model with this config hash and, when given, this decoder hash; else None.

    Values that are not strings (they come from someone else's file) match nothing.
    """
    if not isinstance(config_hash, str) or not isinstance(decoder_hash, str | None):
        return None
    for short, row in BUNDLED.items():
        if row.config_hash == config_hash and decoder_hash in (None, row.decoder_hash):
            return NAME_PREFIX + short
    return None


def bundled_name_for_id(model_id: str, config_hash: object, decoder_hash: object) -> str | None:
    """The bundled model that a codes file recording `model_id` and these hashes means, or None.

    A recorded bundled name (or alias) is looked up by the hashes, since the default it meant may
    since have been replaced; an alias without a hash match maps to the row that owns it.
    """
    short = model_id.removeprefix(NAME_PREFIX) if is_bundled_name(model_id) else None
    owners = [NAME_PREFIX + n for n, row in BUNDLED.items() if model_id in row.aliases]
    if short not in BUNDLED and not owners:
        return None
    return bundled_name_for(config_hash, decoder_hash) or (owners[0] if owners else model_id)


def bundled_hint(config_hash: object, decoder_hash: object, model: object) -> str:
    """"; they match the bundled vit_vq:X" when the hashes some codes record (taken as given: they come
    from someone else's file) belong to a bundled model other than `model`, else ""."""
    match = bundled_name_for(config_hash, decoder_hash)
    return f"; they match the bundled {match}" if match and match != model else ""


__all__ = [
    "Bundled", "BUNDLED", "NAME_PREFIX", "DEFAULT_NAME", "DEFAULT_MODEL", "SAMPLES_FOLDER",
    "is_bundled_name", "bundled_hint", "bundled_entry", "asset_folder", "bundled_model_dir", "bundled_name_for",
    "bundled_name_for_id",
]
