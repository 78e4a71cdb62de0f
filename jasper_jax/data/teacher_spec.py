"""`--teacher` values: a bundled name or a folder, then per-teacher options.

`NAME_OR_FOLDER[:head=DIM][:prompt_name=NAME][:prompt=TEXT]`: stella ships several projection
heads (`2_Dense_1024`, `2_Dense_8192`, ...) and the paper distils from the 8192-d one; LLM
embedding teachers (Qwen3-Embedding, NV-Embed) want their own instruction prompts.
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from jasper_jax.errors import UserError
from jasper_jax.models.loading import st_prompts

# Per-teacher options after the name or folder; `prompt=` comes last (its text may hold ':').
SPEC_OPTIONS = ("head", "prompt_name", "prompt")
_OPTION_START = re.compile(r":(head|prompt_name|prompt)=")


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """A `--teacher` value: `NAME_OR_FOLDER[:head=DIM][:prompt_name=NAME][:prompt=TEXT]`.

    head: a projection head of the folder (`8192` or `dense_8192`, e.g. one of stella's
      `2_Dense_<dim>` folders) instead of the one its modules.json runs.
    prompt_name: a prompt of the folder's `config_sentence_transformers.json` ("query").
    prompt: the prompt text itself (everything after `prompt=`).
    """

    source: str
    head: str | None = None
    prompt_name: str | None = None
    prompt: str | None = None


def parse_teacher_spec(text: str) -> TeacherSpec:
    """Splits a `--teacher` value into its source and options (see `TeacherSpec`).

    Raises:
      UserError: an unknown or repeated option, or an empty value.
    """
    start = _OPTION_START.search(text)
    if start is None:
        return TeacherSpec(text)
    options: dict[str, str] = {}
    rest = text[start.start() + 1 :]
    while rest:
        key, _, rest = rest.partition("=")
        if key == "prompt":
            value, rest = rest, ""
        else:
            value, _, rest = rest.partition(":")
        if key not in SPEC_OPTIONS or key in options or (not value and key != "prompt"):
            raise UserError(
                f"--teacher {text!r}: bad option {key + '=' + value!r}; write "
                "NAME_OR_FOLDER[:head=DIM][:prompt_name=NAME][:prompt=TEXT], each option once, "
                "prompt= last"
            )
        options[key] = value
    return TeacherSpec(text[: start.start()], **options)


def teacher_prompt(parsed: TeacherSpec, folder: pathlib.Path, prompt: str | None) -> str | None:
    """The teacher's own prompt (`prompt=`, or `prompt_name=` looked up in the folder's
    sentence-transformers prompts), else the build's."""
    if parsed.prompt is not None:
        return parsed.prompt or None
    if parsed.prompt_name is None:
        return prompt
    prompts, _ = st_prompts(folder)
    if parsed.prompt_name not in prompts:
        raise UserError(
            f"teacher {parsed.source!r}: prompt_name={parsed.prompt_name!r} is not one of its "
            f"prompts {sorted(prompts)} (config_sentence_transformers.json); fix: name one of "
            "them, or give the text with prompt=..."
        )
    return prompts[parsed.prompt_name] or None
