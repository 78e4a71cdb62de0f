"""`--teacher` values: a bundled name or a folder, then per-teacher options.

`NAME_OR_FOLDER[:head=DIM][:prompt_name=NAME][:document_prompt_name=NAME][:prompt=TEXT]
[:document_prompt=TEXT]`: stella ships several projection heads (`2_Dense_1024`,
`2_Dense_8192`, ...) and the paper distils from the 8192-d one; LLM embedding teachers
(Qwen3-Embedding, NV-Embed) want their own instruction prompts. The prompt is the query's (and
every text's in a single-text dataset); the document prompt is for the documents of a pair
dataset (default none: Jasper and NV-Embed give documents no instruction).
"""

from __future__ import annotations

import dataclasses
import pathlib
import re

from jasper_jax.data.pairs import QUERY
from jasper_jax.errors import UserError
from jasper_jax.models.loading import st_prompts

# Per-teacher options after the name or folder. The text options come last (their text may
# hold ':'): the one met first runs to the other's `:NAME=`, if that follows, else to the end.
TEXT_OPTIONS = ("prompt", "document_prompt")
SPEC_OPTIONS = ("head", "prompt_name", "document_prompt_name", *TEXT_OPTIONS)
_OPTION_START = re.compile(r":(head|prompt_name|prompt|document_prompt_name|document_prompt)=")
_FORM = (
    "NAME_OR_FOLDER[:head=DIM][:prompt_name=NAME][:document_prompt_name=NAME][:prompt=TEXT]"
    "[:document_prompt=TEXT]"
)


@dataclasses.dataclass(frozen=True)
class TeacherSpec:
    """A `--teacher` value (module docstring).

    head: a projection head of the folder (`8192` or `dense_8192`, e.g. one of stella's
      `2_Dense_<dim>` folders) instead of the one its modules.json runs.
    prompt_name: a prompt of the folder's `config_sentence_transformers.json` ("query").
    prompt: the prompt text itself (everything after `prompt=`).
    document_prompt_name, document_prompt: the same for document texts (pair datasets).
    """

    source: str
    head: str | None = None
    prompt_name: str | None = None
    prompt: str | None = None
    document_prompt_name: str | None = None
    document_prompt: str | None = None


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
        if key in TEXT_OPTIONS:
            value, rest = _text_value(rest, [f":{k}=" for k in TEXT_OPTIONS if k != key])
        else:
            value, _, rest = rest.partition(":")
        if key not in SPEC_OPTIONS or key in options or (not value and key not in TEXT_OPTIONS):
            raise UserError(
                f"--teacher {text!r}: bad option {key + '=' + value!r}; write {_FORM}, each "
                "option once, prompt= and document_prompt= last"
            )
        options[key] = value
    return TeacherSpec(text[: start.start()], **options)


def _text_value(rest: str, ends: list[str]) -> tuple[str, str]:
    """(a text option's value, what follows it): ``rest`` up to the first of ``ends`` (each
    ``:NAME=``), the rest starting at that option's name; all of it when none occurs."""
    found = [i for i in (rest.find(end) for end in ends) if i >= 0]
    if not found:
        return rest, ""
    return rest[: min(found)], rest[min(found) + 1 :]


def teacher_prompt(
    parsed: TeacherSpec, folder: pathlib.Path, prompt: str | None, role: str = QUERY
) -> str | None:
    """The teacher's own prompt of ``role`` ("query": `prompt=`, or `prompt_name=` looked up
    in the folder's sentence-transformers prompts; "document": `document_prompt=`,
    `document_prompt_name=`), else the build's ``prompt`` of that role."""
    prefix = "" if role == QUERY else "document_"
    text, name = getattr(parsed, f"{prefix}prompt"), getattr(parsed, f"{prefix}prompt_name")
    if text is not None:
        return text or None
    if name is None:
        return prompt
    prompts, _ = st_prompts(folder)
    if name not in prompts:
        raise UserError(
            f"teacher {parsed.source!r}: {prefix}prompt_name={name!r} is not one of its "
            f"prompts {sorted(prompts)} (config_sentence_transformers.json); fix: name one of "
            f"them, or give the text with {prefix}prompt=..."
        )
    return prompts[name] or None
