"""Export a training workdir as a Hugging Face / sentence-transformers folder (safetensors only).

    jasper_jax.export.export_workdir(WORKDIR, OUT)        # what `jasper-jax export` runs
    jasper_jax.export.set_default_head(OUT, 256)          # switch the head modules.json runs

`st_folder.py` writes the folder (layout in its docstring), `model_card.py` its README.md,
`output_folder.py` decides where an export may write and installs it atomically, and
`exporter.py` puts them together. `OUT/jasper_export.json` marks the folder as an export
(source workdir, step): `--overwrite` replaces nothing else.
"""

from jasper_jax.export.exporter import export_workdir
from jasper_jax.export.st_folder import set_default_head

__all__ = ["export_workdir", "set_default_head"]
